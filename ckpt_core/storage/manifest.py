"""``manifest.json``: what a committed step holds, and checks against it.

Every committed ``step-<N>`` folder carries a manifest (shared format, version 1)::

    {"format_version": 1, "kind": "checkpoint" | "export", "step": N, "world_size": W,
     "mesh": ..., "converters": [...], "model": {...} | null,
     "versions": {"ckpt_core": ..., "torch": ...},
     "files": {"<relative path>": {"size": bytes, "checksum": "crc32:<8 hex>"}},
     "created": <unix time>}

Checksums are CRC-32 (``zlib.crc32``, ~6 GB/s on one core). The DCP writer in
:mod:`ckpt_core.storage.dcp_io` computes them *while the bytes are written*, so a
save never reads its files back; :func:`file_entries` reads files only for those
a writer did not checksum. Checking sizes (:func:`check_sizes`) costs one ``stat``
per file and runs before every load; checking checksums (:func:`verify`) reads
everything and is what ``ckpt verify`` does.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ckpt_core.errors import DamagedCheckpointError
from ckpt_core.storage import layout
from ckpt_core.storage.paths import MAX_OFFSET, UnsafePathError, check_name, resolve_inside

MANIFEST_NAME = "manifest.json"
#: Written beside the manifest by :mod:`ckpt_core.storage.signing`; never listed in it.
SIGNATURE_NAME = "signature.json"
FORMAT_VERSION = 1
CHECKSUM_ALGO = "crc32"
_CHUNK = 16 << 20


def crc32_hex(value: int) -> str:
    """``"crc32:<8 hex digits>"`` for a running CRC-32 value."""
    return f"{CHECKSUM_ALGO}:{value & 0xFFFFFFFF:08x}"


def _size(path: str) -> int | None:
    fs, inner = layout.filesystem(path)
    try:
        return os.path.getsize(inner) if fs is None else int(fs.size(inner))
    except (OSError, FileNotFoundError):
        return None


def file_checksum(path: str, progress: Callable[[int], None] | None = None) -> str:
    """CRC-32 of a file, read in 16 MiB chunks; ``progress(nbytes)`` after each."""
    crc = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with layout.open_file(path, "rb") as f:
        while True:
            n = f.readinto(buf) if hasattr(f, "readinto") else None
            if n is None:
                chunk = f.read(_CHUNK)
                n = len(chunk)
                crc = zlib.crc32(chunk, crc)
            else:
                crc = zlib.crc32(view[:n], crc)
            if not n:
                break
            if progress is not None:
                progress(n)
    return crc32_hex(crc)


def list_files(folder: str) -> list[str]:
    """Relative paths (``/``-separated) of every file under ``folder``, sorted."""
    fs, inner = layout.filesystem(folder)
    out = []
    if fs is None:
        for root, _dirs, files in os.walk(inner):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), inner)
                out.append(rel.replace(os.sep, "/"))
    else:
        base = inner.rstrip("/")
        for path in fs.find(base):
            out.append(path[len(base) :].lstrip("/"))
    return sorted(p for p in out if p not in (MANIFEST_NAME, SIGNATURE_NAME))


def file_entries(
    folder: str, known: Mapping[str, tuple[int, str]] | None = None
) -> dict[str, dict[str, Any]]:
    """``files`` section for every file under ``folder``.

    ``known`` maps relative paths to ``(size, checksum)`` computed while writing;
    those are trusted when the size on disk agrees, the rest are read and hashed.
    """
    known = known or {}
    entries: dict[str, dict[str, Any]] = {}
    for rel in list_files(folder):
        path = layout.join(folder, rel)
        size = _size(path)
        if rel in known and known[rel][0] == size:
            checksum = known[rel][1]
        else:
            checksum = file_checksum(path)
        entries[rel] = {"size": size, "checksum": checksum}
    return entries


def build(
    *,
    kind: str,
    step: int,
    files: dict[str, dict[str, Any]],
    world_size: int = 1,
    mesh: Any = None,
    converters: list[dict[str, Any]] | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest dict in the shared format."""
    import torch

    from ckpt_core._version import __version__

    if kind not in ("checkpoint", "export"):
        raise ValueError(f"manifest kind must be 'checkpoint' or 'export', got {kind!r}.")
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "step": step,
        "world_size": world_size,
        "mesh": mesh,
        "converters": converters or [],
        "model": model,
        "versions": {"ckpt_core": __version__, "torch": torch.__version__},
        "files": files,
        "created": time.time(),
    }


def encode(manifest: Mapping[str, Any]) -> bytes:
    """The bytes :func:`write` puts in ``manifest.json`` (what a signature covers)."""
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def write(folder: str, manifest: Mapping[str, Any]) -> str:
    """Write ``manifest.json`` into ``folder`` (fsync'd when local); returns its path."""
    return write_bytes(folder, encode(manifest))


def write_bytes(folder: str, data: bytes) -> str:
    """Write :func:`encode`'s ``data`` as ``folder``'s ``manifest.json``; returns its path."""
    path = layout.join(folder, MANIFEST_NAME)
    fs, inner = layout.filesystem(path)
    if fs is None:
        with open(inner, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        with fs.open(inner, "wb") as f:
            f.write(data)
    return path


def read(folder: str) -> dict[str, Any] | None:
    """The checked manifest of ``folder``, or ``None`` when it has none.

    A ``manifest.json`` that is there but not a plain file inside the folder, not
    JSON, or not of the shared format (:func:`check`) is a
    :class:`~ckpt_core.errors.DamagedCheckpointError` naming the field.
    """
    path = layout.join(folder, MANIFEST_NAME)
    if not _lexists(path):
        return None
    checked = resolve_inside(folder, MANIFEST_NAME, what=folder, symlinks=False)
    try:
        with layout.open_file(checked, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        raise DamagedCheckpointError(
            f"{path} is not readable JSON ({exc}); the step is damaged: restore it or remove it."
        ) from None
    return check(data, path)


def _lexists(path: str) -> bool:
    fs, inner = layout.filesystem(path)
    return os.path.lexists(inner) if fs is None else fs.exists(inner)


#: Optional top-level fields and the JSON types they must have when present.
_FIELDS: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "kind": (str,),
    "step": (int,),
    "world_size": (int,),
    "converters": (list,),
    "model": (dict, type(None)),
    "versions": (dict, type(None)),
    "created": (int, float),
    "base": (dict, type(None)),
}
_ENTRY_FIELDS = {"model": {"adapter": str, "config": dict}, "base": {"path": str, "format": str}}


def _bad(source: str, field: str, value: Any, want: str) -> DamagedCheckpointError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return DamagedCheckpointError(
        f"{source}: field {field} is {shown}, not {want}; the manifest is damaged or was "
        "crafted: restore the step or remove it."
    )


def _is_int(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_OFFSET


def check(data: Any, source: str = MANIFEST_NAME) -> dict[str, Any]:
    """``data`` if it is a manifest of the shared format, else a one-line error naming the field.

    ``files`` must map plain relative names (:func:`ckpt_core.storage.paths.check_name`)
    to ``{"size": int, "checksum": str}``; the other known fields must have their
    types when present (``model``: ``adapter`` and ``config``; ``base``: ``path``,
    ``format`` and a ``checksum`` string).
    """
    if not isinstance(data, dict):
        raise _bad(source, "(the whole file)", type(data).__name__, "a JSON object")
    files = data.get("files")
    if not isinstance(files, dict):
        raise _bad(source, "files", files, "an object of file entries")
    for name, entry in files.items():
        check_name(name, what=f"{source} files entry")
        if not isinstance(entry, dict):
            raise _bad(source, f"files[{name!r}]", entry, "an object")
        if not _is_int(entry.get("size")):
            raise _bad(source, f"files[{name!r}].size", entry.get("size"), "a byte count")
        if not isinstance(entry.get("checksum"), str):
            raise _bad(source, f"files[{name!r}].checksum", entry.get("checksum"), "a string")
    for field, types in _FIELDS.items():
        value = data.get(field)
        if field in data and (not isinstance(value, types) or isinstance(value, bool)):
            raise _bad(source, field, value, "a " + " or ".join(t.__name__ for t in types))
        if types == (int,) and field in data and not _is_int(abs(value)):
            raise _bad(source, field, value, "an integer of at most 63 bits")
    for field, wanted in _ENTRY_FIELDS.items():
        entry = data.get(field)
        for key, kind in wanted.items():
            if entry and not isinstance(entry.get(key), kind):
                raise _bad(source, f"{field}.{key}", entry.get(key), f"a {kind.__name__}")
    base = data.get("base")
    if base and base.get("checksum") is not None and not isinstance(base["checksum"], str):
        raise _bad(source, "base.checksum", base["checksum"], "a string")
    return data


@dataclass
class Problem:
    """One file that does not match its manifest entry."""

    file: str
    reason: str  # "missing" | "unsafe" | "truncated" | "size" | "checksum" | "unlisted"
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason} ({self.detail})"


def locate(folder: str, rel: str) -> tuple[str, int] | Problem:
    """``(checked path, size)`` of manifest entry ``rel``, or why it is not read.

    An entry is read only when it is a regular file inside ``folder`` reached
    through no symlink (:func:`ckpt_core.storage.paths.resolve_inside`); anything
    else is an ``unsafe`` problem, so a crafted manifest cannot make ``ckpt
    verify`` report the size or checksum of a file outside the step.
    """
    if not _lexists(layout.join(folder, rel)):
        return Problem(rel, "missing", "not in the step folder")
    try:
        path = resolve_inside(folder, rel, what=f"{folder} manifest entry", symlinks=False)
    except UnsafePathError as exc:
        return Problem(rel, "unsafe", f"not read: it {exc.reason}")
    size = _size(path)
    return Problem(rel, "missing", "vanished while checked") if size is None else (path, size)


def check_sizes(folder: str, manifest: Mapping[str, Any] | None = None) -> list[Problem]:
    """Missing, unsafe and wrongly sized files (a ``stat`` each); no manifest is a problem."""
    manifest = manifest if manifest is not None else read(folder)
    if manifest is None:
        return [Problem(MANIFEST_NAME, "missing", "the step has no readable manifest.json")]
    problems = []
    for rel, entry in sorted(manifest["files"].items()):
        found = locate(folder, rel)
        want = int(entry["size"])
        if isinstance(found, Problem):
            if found.reason == "missing":
                found.detail = f"expected {want} bytes"
            problems.append(found)
            continue
        size = found[1]
        if size < want:
            problems.append(Problem(rel, "truncated", f"{size} of {want} bytes"))
        elif size != want:
            problems.append(Problem(rel, "size", f"{size} bytes, manifest says {want}"))
    return problems


def verify(
    folder: str,
    manifest: Mapping[str, Any] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> list[Problem]:
    """Every file against the manifest: missing, truncated, size, checksum.

    ``progress(file, nbytes)`` is called as bytes are hashed. Files on disk that
    the manifest does not list are reported as ``unlisted``.
    """
    manifest = manifest if manifest is not None else read(folder)
    problems = check_sizes(folder, manifest)
    if manifest is None:
        return problems
    bad = {p.file for p in problems}
    for rel, entry in sorted(manifest["files"].items()):
        found = None if rel in bad else locate(folder, rel)
        if not isinstance(found, tuple):
            continue
        got = file_checksum(
            found[0],
            None if progress is None else (lambda n, rel=rel: progress(rel, n)),
        )
        if got != entry["checksum"]:
            problems.append(Problem(rel, "checksum", f"{got}, manifest says {entry['checksum']}"))
    listed = set(manifest["files"])
    for rel in list_files(folder):
        if rel not in listed:
            problems.append(Problem(rel, "unlisted", "file is not in manifest.json"))
    return problems


def total_bytes(manifest: Mapping[str, Any], files: Iterable[str] | None = None) -> int:
    """Sum of the listed file sizes (of ``files`` when given)."""
    entries = manifest["files"]
    names = entries if files is None else files
    return sum(int(entries[n]["size"]) for n in names if n in entries)
