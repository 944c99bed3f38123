"""How ``ckpt`` reports a failed command: one line on stderr and an exit code.

* a :class:`~ckpt_core.errors.CkptError`: its message, exit ``exc.exit_code``
  (2 for bad input, 1 for damaged data);
* an ``OSError`` (disk full, read-only mount, no permission, missing path):
  the path, the system's words for the errno and a fix, exit 2 when the user's
  path or permissions are wrong, 1 when the storage failed;
* an object store's refusal (no credentials, no such bucket, access denied):
  the command's URI and the fix, exit 2 (:mod:`ckpt_core.storage.object_errors`);
* anything else: ``internal error: <type>: <message>``, exit 1.

A failure inside ``torch.distributed.checkpoint`` arrives wrapped in its
``CheckpointException`` (whose text is a traceback): the first rank's own
exception is reported instead. ``--debug`` or ``CKPT_DEBUG=1`` also prints
the traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Sequence

from ckpt_core.errors import CkptError

DEBUG_ENV = "CKPT_DEBUG"

#: errno → (exit code, fix). Exit 2: the path or its permissions are the user's to fix.
_OS_FIXES = {
    errno.ENOSPC: (1, "free space on that filesystem or write somewhere else"),
    errno.EDQUOT: (1, "free space within your quota or write somewhere else"),
    errno.EROFS: (2, "the filesystem is mounted read-only; write to a writable folder"),
    errno.EACCES: (2, "check the permissions of the path (and of the folders above it)"),
    errno.EPERM: (2, "check the permissions and ownership of the path"),
    errno.ENOENT: (2, "check the path; a folder on the way may not exist"),
    errno.ENOTDIR: (2, "a file stands where a folder is expected; check the path"),
    errno.EISDIR: (2, "a folder stands where a file is expected; check the path"),
    errno.EEXIST: (2, "remove it or choose another path"),
    errno.ENAMETOOLONG: (2, "use a shorter path"),
    errno.ELOOP: (2, "the path goes through a symlink loop; check it"),
    errno.EIO: (1, "the storage reported an I/O error; check the disk or mount"),
}


def debug_enabled(flag: bool) -> bool:
    """Whether tracebacks are shown: ``--debug`` or ``CKPT_DEBUG`` set to a true value."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined (``"; "``, or a space after a colon)."""
    out = ""
    for part in (p.strip() for p in str(text).splitlines()):
        if not part:
            continue
        out += part if not out else (" " if out.endswith(":") else "; ") + part
    return out


def unwrap(exc: BaseException) -> BaseException:
    """The exception that caused ``exc``: DCP's per-rank wrapper is opened."""
    failures = getattr(exc, "failures", None)
    if type(exc).__name__ == "CheckpointException" and isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            return unwrap(inner)
    return exc


def _os_error_line(exc: OSError) -> tuple[int, str]:
    code, fix = _OS_FIXES.get(exc.errno, (1, "check the storage and the path"))
    where = exc.filename if exc.filename is not None else "(path unknown)"
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    words = exc.strerror or str(exc)
    return code, f"{where}: {words}{f' ({name})' if name else ''}; {fix}."


def describe(exc: BaseException, uris: Sequence[str] = ()) -> tuple[int, str]:
    """``(exit code, one-line message)`` for an exception that ended a command.

    ``uris``: the command's object-store URIs, named by an object store's refusal
    (no credentials, no bucket, access denied: exit 2).
    """
    exc = unwrap(exc)
    if isinstance(exc, CkptError):
        return exc.exit_code, "error: " + one_line(str(exc))
    if uris:
        from ckpt_core.storage.object_errors import explain

        store = explain(exc, uris[0])
        if store is not None:
            return 2, "error: " + one_line(store)
    if isinstance(exc, OSError) and exc.errno is not None:
        code, line = _os_error_line(exc)
        return code, "error: " + line
    return 1, (
        f"internal error: {type(exc).__name__}: {one_line(str(exc))} "
        "(rerun with --debug for the traceback)"
    )


def report(command: str, exc: BaseException, *, debug: bool, uris: Sequence[str] = ()) -> int:
    """Print ``exc`` for ``ckpt <command>`` (one line, or the traceback first with ``debug``)."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    code, line = describe(exc, uris)
    print(f"ckpt {command}: {line}", file=sys.stderr)
    return code
