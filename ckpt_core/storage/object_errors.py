"""Object-store failures as one line: what went wrong with which URI, and the fix.

s3fs raises some failures as ``OSError`` subclasses (a missing bucket is
``FileNotFoundError``, access denied ``PermissionError``) and lets others through
as botocore exceptions (no credentials, endpoint unreachable), which are not
``OSError``. :func:`explain` names both kinds; :func:`as_os_error` turns the second
kind into an ``OSError`` so that the save-failure path treats an object store
that goes away like a disk that does.
"""

from __future__ import annotations

import errno

_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound")
_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
)


def _names(exc: BaseException) -> set[str]:
    return {t.__name__ for t in type(exc).__mro__}


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in out and len(out) < 10:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def explain(exc: BaseException, uri: str) -> str | None:
    """One line for a known object-store failure at ``uri``; None for anything else."""
    if "://" not in uri or uri.startswith("file://"):
        return None
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    for err in _chain(exc):
        names, text = _names(err), str(err)
        if names & set(_NO_CREDENTIALS):
            return (
                f"no credentials for {uri} ({text}). Set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or checkpoint.storage_options "
                "(e.g. profile = '...')."
            )
        if names & set(_UNREACHABLE):
            return (
                f"cannot reach the object store for {uri} ({text}). Check AWS_ENDPOINT_URL "
                "or checkpoint.storage_options.endpoint_url and the network."
            )
        if isinstance(err, FileNotFoundError) and "bucket" in text.lower():
            return (
                f"bucket {bucket!r} of {uri} does not exist ({text}). Create it, or fix the "
                "bucket name in the folder."
            )
        if isinstance(err, PermissionError) or "AccessDenied" in text:
            return (
                f"access denied to {uri} ({text}). Grant these credentials s3:ListBucket, "
                "s3:GetObject, s3:PutObject and s3:DeleteObject on the prefix, or use others."
            )
    return None


def as_os_error(exc: BaseException) -> OSError | None:
    """An ``OSError`` standing for an object-store client failure (botocore, aiohttp)."""
    names = _names(exc)
    if names & set(_UNREACHABLE):
        return ConnectionError(errno.ECONNREFUSED, f"object store unreachable: {exc}")
    if names & set(_NO_CREDENTIALS):
        return PermissionError(errno.EACCES, f"no object-store credentials: {exc}")
    if "BotoCoreError" in names or "ClientError" in names:
        return OSError(errno.EIO, f"object store error: {exc}")
    return None


def is_precondition_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is S3's answer to a conditional write that did not hold (412)."""
    text = str(exc)
    return "pre-condition" in text or "PreconditionFailed" in text or "412" in text
