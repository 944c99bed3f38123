"""Names that a checkpoint gives for its own files, checked before anything is opened.

A checkpoint names its files in several places: DCP's ``.metadata`` (each data
item's ``relative_path``, offset and length), ``manifest.json`` (its ``files``)
and an HF ``index.json`` (its ``weight_map``). Whoever wrote the folder chose
those names, so each is checked here before it is opened:

* :func:`check_name` - a relative name: not empty, not absolute, no ``..``;
* :func:`resolve_inside` - the name, joined to its folder, stays inside it once
  symlinks are resolved (or, with ``symlinks=False``, passes through none), and
  is a regular file, not a FIFO, a device or a folder (``stat`` opens nothing,
  so a FIFO cannot block);
* :func:`check_length` - an ``offset`` and ``length`` lie inside the file's real
  size, so nothing is read or allocated beyond what the file holds;
* :func:`open_regular` - opens a checked local file without following a symlink
  and checks again what was opened (the folder may change between the checks).

Local folders and fsspec URIs are both handled; an object store has no symlinks
or FIFOs, so a URI gets the name rules and the size from ``fs.info``.
"""

from __future__ import annotations

import os
import re
import stat
from typing import BinaryIO

from ckpt_core.errors import DamagedCheckpointError
from ckpt_core.storage import layout

_DRIVE = re.compile(r"^[A-Za-z]:")
_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}
#: Largest offset or length accepted (a signed 64-bit file offset).
MAX_OFFSET = (1 << 63) - 1


class UnsafePathError(DamagedCheckpointError):
    """A file name from a checkpoint that must not be opened; ``reason`` says why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _refuse(what: str, name: object, why: str) -> UnsafePathError:
    return UnsafePathError(
        f"{what} names {name!r}, which {why}; the folder is damaged or was crafted: do not "
        "load it (a checkpoint names only plain files inside its own folder).",
        why,
    )


def check_name(name: object, *, what: str) -> str:
    """``name`` if it is a relative ``/``-separated path without ``..``; else an error.

    ``what`` says where the name came from (``"step-5/.metadata entry model.w"``).
    """
    if not isinstance(name, str) or not name:
        raise _refuse(what, name, "is not a file name (a non-empty string)")
    if "\x00" in name:
        raise _refuse(what, name, "holds a NUL byte")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise _refuse(what, name, "is an absolute path")
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        raise _refuse(what, name, "climbs out of the folder with '..'")
    if all(p in ("", ".") for p in parts):
        raise _refuse(what, name, "names the folder itself, not a file")
    return name


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def resolve_inside(folder: str, name: str, *, what: str, symlinks: bool = True) -> str:
    """The checked path of file ``name`` in ``folder`` (a local path or an fsspec URI).

    Refuses (:class:`DamagedCheckpointError`, one line naming ``what`` and ``name``) an
    absolute name, ``..``, a symlink that leads out of ``folder`` (any symlink
    with ``symlinks=False``), a missing file, and anything but a regular file.
    Local paths come back resolved (``realpath``); URIs come back joined.
    """
    check_name(name, what=what)
    if layout.is_uri(folder):
        path = layout.join(folder, name)
        fs, inner = layout.filesystem(path)
        try:
            info = fs.info(inner)
        except (OSError, FileNotFoundError) as exc:
            raise _refuse(what, name, f"cannot be found in {folder} ({exc})") from None
        if info.get("type") != "file":
            raise _refuse(what, name, f"is a {info.get('type')}, not a file")
        return path
    root = os.path.realpath(layout.filesystem(folder)[1])
    joined = os.path.join(root, name)
    if not symlinks:
        _no_symlink_below(root, name, what)
    real = os.path.realpath(joined)
    if real != root and os.path.commonpath([root, real]) != root:
        raise _refuse(what, name, f"leads out of {root} (to {real}) through a symlink")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise _refuse(what, name, f"does not exist in {root}") from None
    except OSError as exc:
        raise _refuse(what, name, f"cannot be examined ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(what, name, f"is {_kind(st.st_mode)}, not a regular file")
    return real


def _no_symlink_below(root: str, name: str, what: str) -> None:
    path = root
    for part in re.split(r"[/\\]", name):
        if part in ("", "."):
            continue
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return  # missing: reported by the caller's own check
        except OSError as exc:
            raise _refuse(what, name, f"cannot be examined ({exc.strerror})") from None
        if stat.S_ISLNK(mode):
            raise _refuse(what, name, f"passes through the symlink {path}")


def file_size(path: str, *, what: str) -> int:
    """Size in bytes of the file at ``path`` (local or URI); an error if it has none."""
    fs, inner = layout.filesystem(path)
    try:
        return os.stat(inner).st_size if fs is None else int(fs.info(inner)["size"])
    except (OSError, FileNotFoundError, KeyError, TypeError, ValueError) as exc:
        raise DamagedCheckpointError(
            f"{what}: cannot read the size of {path} ({exc}); the checkpoint is incomplete."
        ) from None


def check_length(path: str, offset: int, length: int, *, what: str) -> None:
    """``offset`` and ``length`` are plain non-negative ints ending inside the file at ``path``."""
    for field, value in (("offset", offset), ("length", length)):
        if type(value) is not int or not 0 <= value <= MAX_OFFSET:
            raise DamagedCheckpointError(
                f"{what} declares {field} {value!r} in {path}; a {field} is a non-negative "
                "integer. The folder is damaged or was crafted: do not load it."
            )
    size = file_size(path, what=what)
    if offset + length > size:
        raise DamagedCheckpointError(
            f"{what} declares bytes {offset}..{offset + length} of {path}, which holds only "
            f"{size} bytes; the file is truncated or the metadata was crafted: do not load it."
        )


def open_regular(path: str, *, what: str) -> BinaryIO:
    """Open a local file for reading, refusing a symlink and anything but a regular file.

    Opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat``, so a file
    swapped for a symlink or a FIFO after :func:`resolve_inside` neither leads
    out nor blocks.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DamagedCheckpointError(
            f"{what}: cannot open {path} as a plain file ({exc.strerror}); it is missing or "
            "was replaced by a symlink. Do not load this folder."
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DamagedCheckpointError(
                f"{what}: {path} is {_kind(mode)}, not a regular file; do not load this folder."
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
