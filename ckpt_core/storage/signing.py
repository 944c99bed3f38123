"""Signed folders: an ed25519 signature over SHA-256 digests of every file.

The manifest's CRC-32s catch accidents, but whoever can write a folder can
rewrite both a data file and ``manifest.json``. A signature made with a private
key the writer of the folder does not hold closes that gap. ``signature.json``
sits beside ``manifest.json``::

    {"format_version": 1, "algorithm": "ed25519", "key_id": "ed25519:<32 hex>",
     "manifest": {"size": bytes, "sha256": "<64 hex>"},
     "files": {"<relative path>": {"size": bytes, "sha256": "<64 hex>"}},
     "created": <unix time>,
     "signature": "<base64 of 64 bytes>"}

The signature covers the canonical JSON (sorted keys, no spaces, ASCII) of
every field but ``signature``. Checking (:func:`check_folder`) verifies the
signature first, then the manifest's digest, then every file's size and
SHA-256, and refuses any file the signature does not cover (a loader could read
it), a path that leaves the folder, and a signed ``step-<N>`` stored under
another step's name. Only I/O and crypto live here; no tensor is read.

``cryptography`` is optional (``pip install 'ckpt-core[sign]'``) and imported
only when a key is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckpt_core.errors import CheckpointError, ConfigError, first_of
from ckpt_core.storage import layout, manifest, paths
from ckpt_core.storage.manifest import MANIFEST_NAME, SIGNATURE_NAME, Problem

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ALGORITHM = "ed25519"
SIGN_KEY_ENV = "CKPT_SIGN_KEY"
VERIFY_KEY_ENV = "CKPT_VERIFY_KEY"
INSTALL_HINT = "pip install 'ckpt-core[sign]'"

#: A signature file larger than this is refused before it is parsed.
MAX_SIGNATURE_BYTES = 64 << 20
_CHUNK = 16 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_STEP_RE = re.compile(r"^step-(\d+)$")


# -- keys -------------------------------------------------------------------------


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError(
            f"signing needs the 'cryptography' package, which is not installed: {INSTALL_HINT}"
        ) from None
    return ed25519


def _serialization() -> Any:
    _crypto()
    from cryptography.hazmat.primitives import serialization

    return serialization


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError as exc:
        raise ConfigError(
            f"cannot read key file {path!r} ({exc.strerror or exc}); pass the PEM file that "
            "`ckpt keygen` wrote."
        ) from None


def _load_key(path: str, private: bool) -> Any:
    ed25519 = _crypto()
    s = _serialization()
    data = _read_key_file(path)
    kind = "private" if private else "public"
    try:
        key = (
            s.load_pem_private_key(data, password=None) if private else s.load_pem_public_key(data)
        )
    except TypeError:
        raise ConfigError(
            f"{path} is an encrypted private key; ckpt reads unencrypted PEM keys only. Keep "
            "the key file readable by the training user alone (mode 0600)."
        ) from None
    except ValueError:
        raise ConfigError(
            f"{path} is not a PEM {kind} key; pass the "
            f"{'KEYFILE' if private else 'KEYFILE.pub'} file `ckpt keygen` wrote."
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; ckpt uses ed25519 keys only.")
    return key


def load_private_key(path: str) -> Any:
    """The ed25519 private key in the PEM file ``path`` (unencrypted PKCS#8)."""
    return _load_key(path, private=True)


def load_public_key(path: str) -> Any:
    """The ed25519 public key in ``path``; a private key file gives its public half."""
    if b"PRIVATE KEY" in _read_key_file(path):
        return _load_key(path, private=True).public_key()
    return _load_key(path, private=False)


def key_id(public_key: Any) -> str:
    """``ed25519:<first 32 hex digits of SHA-256 of the raw public key>``."""
    s = _serialization()
    raw = public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    return f"{ALGORITHM}:{hashlib.sha256(raw).hexdigest()[:32]}"


def generate_key(path: str) -> tuple[str, str, str]:
    """Write a new private key to ``path`` (mode 0600) and its public key to ``path.pub``.

    Refuses to overwrite either file. Returns ``(private path, public path, key id)``.
    """
    ed25519 = _crypto()
    s = _serialization()
    public_path = f"{path}.pub"
    for p in (path, public_path):
        if os.path.lexists(p):
            raise ConfigError(f"{p} already exists; refusing to overwrite a key. Pick a new path.")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    public_pem = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    os.chmod(path, 0o600)  # also when the umask would have left it wider
    with open(public_path, "wb") as f:
        f.write(public_pem)
    return path, public_path, key_id(key.public_key())


# -- digests ----------------------------------------------------------------------


def canonical(payload: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, ASCII only."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _safe_name(rel: Any) -> bool:
    try:
        paths.check_name(rel, what="a signed or listed file")
    except CheckpointError:
        return False
    return True


def _open_regular(path: str) -> Any:
    """Open a file for reading: an fsspec object, or a local regular file not via a symlink."""
    fs, inner = layout.filesystem(path)
    if fs is not None:
        return fs.open(inner, "rb")
    return paths.open_regular(inner, what="signing")


def file_digest(path: str, progress: Callable[[int], None] | None = None) -> tuple[int, str, str]:
    """``(size, sha256 hex, "crc32:<hex>")`` of a file, read once in 16 MiB chunks."""
    sha = hashlib.sha256()
    crc = 0
    size = 0
    with _open_regular(path) as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return size, sha.hexdigest(), manifest.crc32_hex(crc)


_Failed = OSError | CheckpointError


def _digests(
    folder: str, names: list[str], progress: Callable[[str, int], None] | None
) -> dict[str, tuple[int, str, str] | _Failed]:
    """Digest of each name, or the error that kept it from being read.

    A name must be a plain file inside ``folder`` reached through no symlink
    (:func:`ckpt_core.storage.paths.resolve_inside`), so a FIFO, a device or a
    link out of the folder is an error here, never read.
    """

    def one(rel: str) -> tuple[int, str, str] | _Failed:
        try:
            path = paths.resolve_inside(folder, rel, what=f"{folder}: {rel}", symlinks=False)
            return file_digest(path, None if progress is None else (lambda n: progress(rel, n)))
        except (OSError, CheckpointError) as exc:
            return exc

    workers = max(1, min(4, len(names), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-sha") as pool:
        return dict(zip(names, pool.map(one, names)))


# -- signing ----------------------------------------------------------------------


def sign_folder(
    folder: str,
    key: Any,
    progress: Callable[[str, int], None] | None = None,
    *,
    manifest_bytes: bytes | None = None,
) -> dict[str, Any]:
    """Write ``signature.json`` into ``folder``; ``key`` is a private key or its PEM path.

    ``manifest_bytes``: the manifest about to be written (an object store signs
    before its manifest commits the step); read from ``folder`` when not given.

    Every file ``manifest.json`` lists is read once: its size and CRC-32 must
    match the manifest (a damaged folder is not signed) and its SHA-256 is
    signed. A file on disk that the manifest does not list is refused too.
    Returns the signature document.
    """
    key = load_private_key(key) if isinstance(key, str) else key
    manifest_path = layout.join(folder, MANIFEST_NAME)
    try:
        if manifest_bytes is None:
            with _open_regular(manifest_path) as f:
                manifest_bytes = f.read()
    except (OSError, CheckpointError):
        raise CheckpointError(
            f"{folder} has no readable {MANIFEST_NAME}; only folders written by ckpt (a "
            "committed step or export) can be signed."
        ) from None
    try:
        files = json.loads(manifest_bytes)["files"]
        names = sorted(files)
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"{manifest_path} is not a ckpt manifest (no 'files' table); refusing to sign it."
        ) from None
    bad = [n for n in names if not _safe_name(n) or n == SIGNATURE_NAME]
    if bad:
        raise CheckpointError(
            f"{manifest_path} lists {bad[0]!r}, a path outside the folder; refusing to sign it."
        )
    unlisted = sorted(set(manifest.list_files(folder)) - set(names))
    if unlisted:
        raise CheckpointError(
            f"{layout.join(folder, unlisted[0])} is not listed in {MANIFEST_NAME}; remove it "
            "(or re-save the step) before signing."
        )
    entries = {}
    for rel, got in _digests(folder, names, progress).items():
        path = layout.join(folder, rel)
        if not isinstance(got, tuple):
            raise CheckpointError(f"cannot read {path} ({got}); refusing to sign {folder}.")
        size, sha, crc = got
        want = files[rel]
        if not isinstance(want, dict) or want.get("size") != size or want.get("checksum") != crc:
            raise CheckpointError(
                f"{path} does not match {MANIFEST_NAME} (size {size}, {crc}); the folder is "
                "damaged: run `ckpt verify` and sign an intact step only."
            )
        entries[rel] = {"size": size, "sha256": sha}
    payload = {
        "format_version": FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "manifest": {
            "size": len(manifest_bytes),
            "sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        },
        "files": entries,
        "created": time.time(),
    }
    document = dict(payload, signature=base64.b64encode(key.sign(canonical(payload))).decode())
    data = json.dumps(document, indent=1, sort_keys=True).encode()
    layout.write_file(layout.join(folder, SIGNATURE_NAME), data)
    logger.debug("Signed %s (%d files, key %s)", folder, len(entries), payload["key_id"])
    return document


# -- checking ---------------------------------------------------------------------


def has_signature(folder: str) -> bool:
    """Whether ``folder`` holds a ``signature.json`` (checked or not)."""
    return layout.exists(layout.join(folder, SIGNATURE_NAME))


def read_signature(folder: str) -> dict[str, Any]:
    """The parsed ``signature.json`` of ``folder`` (structure checked, signature not)."""
    path = layout.join(folder, SIGNATURE_NAME)
    try:
        with _open_regular(path) as f:
            data = f.read(MAX_SIGNATURE_BYTES + 1)
    except (OSError, CheckpointError):
        raise _Invalid(Problem(SIGNATURE_NAME, "unsigned", "the folder has no signature")) from None
    if len(data) > MAX_SIGNATURE_BYTES:
        raise _Invalid(Problem(SIGNATURE_NAME, "signature", "larger than 64 MiB"))
    try:
        doc = json.loads(data)
    except ValueError:
        raise _Invalid(Problem(SIGNATURE_NAME, "signature", "not valid JSON")) from None
    ok = (
        isinstance(doc, dict)
        and doc.get("format_version") == FORMAT_VERSION
        and doc.get("algorithm") == ALGORITHM
        and isinstance(doc.get("key_id"), str)
        and isinstance(doc.get("signature"), str)
        and isinstance(doc.get("manifest"), dict)
        and isinstance(doc.get("files"), dict)
        and all(_entry_ok(e) for e in [doc["manifest"], *doc["files"].values()])
    )
    if not ok:
        raise _Invalid(
            Problem(SIGNATURE_NAME, "signature", f"not a format-{FORMAT_VERSION} ed25519 signature")
        )
    return doc


def _entry_ok(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and type(entry.get("size")) is int
        and entry["size"] >= 0
        and isinstance(entry.get("sha256"), str)
        and bool(_HEX64.match(entry["sha256"]))
    )


class _Invalid(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _check_signature(doc: dict[str, Any], public_key: Any) -> None:
    from cryptography.exceptions import InvalidSignature

    want = key_id(public_key)
    if doc["key_id"] != want:
        raise _Invalid(
            Problem(SIGNATURE_NAME, "signature", f"signed by {doc['key_id']}, not by key {want}")
        )
    payload = {k: v for k, v in doc.items() if k != "signature"}
    try:
        public_key.verify(base64.b64decode(doc["signature"], validate=True), canonical(payload))
    except (InvalidSignature, ValueError):
        raise _Invalid(
            Problem(SIGNATURE_NAME, "signature", "the signature does not match its contents")
        ) from None


def check_folder(
    folder: str, key: Any, progress: Callable[[str, int], None] | None = None
) -> list[Problem]:
    """Problems of ``folder`` against its signature and ``key`` (a public key or its path).

    Empty when the signature is by ``key``, matches its contents, and every file
    in the folder is covered by it with the signed size and SHA-256.
    """
    key = load_public_key(key) if isinstance(key, str) else key
    try:
        doc = read_signature(folder)
        _check_signature(doc, key)
    except _Invalid as bad:
        return [bad.problem]
    problems = []
    names = sorted(doc["files"])
    unsafe = [n for n in names if not _safe_name(n) or n in (MANIFEST_NAME, SIGNATURE_NAME)]
    if unsafe:
        return [Problem(str(unsafe[0]), "signature", "a signed path that leaves the folder")]
    entries = {MANIFEST_NAME: doc["manifest"], **doc["files"]}
    for rel, got in _digests(folder, sorted(entries), progress).items():
        want = entries[rel]
        if not isinstance(got, tuple):
            reason = "unreadable" if layout.exists(layout.join(folder, rel)) else "missing"
            problems.append(Problem(rel, reason, f"signed with {want['size']} bytes ({got})"))
        elif got[0] != want["size"]:
            problems.append(Problem(rel, "size", f"{got[0]} bytes, signed with {want['size']}"))
        elif got[1] != want["sha256"]:
            problems.append(Problem(rel, "sha256", "content differs from the signed SHA-256"))
    for rel in manifest.list_files(folder):
        if rel not in entries:
            problems.append(Problem(rel, "unsigned", "file is not covered by the signature"))
    if not problems:
        problems.extend(_step_name_problems(folder))
    return problems


def _step_name_problems(folder: str) -> list[Problem]:
    """A signed step moved under another step's name (replaying an old step as new)."""
    name = folder.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    m = _STEP_RE.match(name)
    found = manifest.read(folder)
    if not m or found is None:
        return []
    step = found.get("step")
    if type(step) is int and step >= 0 and step != int(m.group(1)):
        return [Problem(MANIFEST_NAME, "step", f"signed as step {step}, stored as {name}")]
    return []


def require_valid(folder: str, key_path: str | None) -> None:
    """Raise :class:`CheckpointError` unless ``folder`` is validly signed by ``key_path``.

    No-op when ``key_path`` is None (signatures not required). Called before any
    tensor of ``folder`` is read.
    """
    if not key_path:
        return
    problems = check_folder(folder, key_path)
    if problems:
        raise CheckpointError(
            f"{folder} failed signature verification with {key_path}: "
            f"{first_of(problems, 1)}. Refusing to "
            "load it: sign it with `ckpt sign` if you trust it, load another step, or unset "
            "checkpoint.verify_key."
        )
    logger.info("Signature of %s verified (%s)", folder, key_path)
