"""One line for an object store's refusal that reached a ``ckpt`` command.

s3fs passes some botocore errors through untranslated (no credentials found,
the endpoint unreachable) and turns others into ``OSError``\\ s whose ``errno``
is the server's message, not a number. :func:`object_store_line` finds such an
error in the exception's chain and says, in one line, which URI of the command
it concerns, what the store answered and the fix; exit 2, since credentials,
bucket names and endpoints are the user's to fix. botocore is matched by class
name and ``response`` shape, so this module imports nothing from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

#: botocore exception class name → the fix.
_BOTOCORE_FIXES = {
    "NoCredentialsError": (
        "no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
        "or checkpoint.storage_options"
    ),
    "PartialCredentialsError": (
        "the credentials are incomplete; set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE)"
    ),
    "EndpointConnectionError": (
        "the endpoint does not answer; check AWS_ENDPOINT_URL (or storage_options.endpoint_url) "
        "and the network"
    ),
    "ProfileNotFound": "the AWS profile does not exist; check AWS_PROFILE and ~/.aws/config",
}

#: S3 error code → the fix.
_CODE_FIXES = {
    "NoSuchBucket": "the bucket does not exist; create it or fix the bucket name",
    "AccessDenied": "access denied; grant these credentials s3:ListBucket, s3:GetObject, "
    "s3:PutObject and s3:DeleteObject on the prefix",
    "AllAccessDisabled": "access to the bucket is disabled; use another bucket",
    "InvalidAccessKeyId": "the access key is not known to the store; check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret key does not match the access key; "
    "check AWS_SECRET_ACCESS_KEY",
    "ExpiredToken": "the session token expired; refresh the credentials",
    "InvalidToken": "the session token is invalid; refresh the credentials",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        return str(code) if code is not None else None
    return None


def object_store_line(exc: BaseException, uris: Iterable[str] = ()) -> str | None:
    """``"<uri>: <what the store said>; <fix>."`` when ``exc`` is an object store's refusal.

    ``uris`` are the command's URIs (its arguments); the first names the error.
    None when no link of the chain is a known credentials/bucket/endpoint error.
    """
    where = next(iter(uris), "the object store")
    for link in _chain(exc):
        name = type(link).__name__
        if name in _BOTOCORE_FIXES and type(link).__module__.startswith("botocore"):
            return f"{where}: {_BOTOCORE_FIXES[name]} ({name})."
        code = _code(link)
        if code in _CODE_FIXES:
            return f"{where}: {_CODE_FIXES[code]} ({code})."
    return None
