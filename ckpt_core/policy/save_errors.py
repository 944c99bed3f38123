"""A save that fails on the storage: one line, the last committed step kept, the temp cleaned.

A disk that fills up (``ENOSPC``, ``EFBIG``), a mount that turns read-only
(``EROFS``) or disappears (``ENOENT``, ``ESTALE``, ``EIO``) makes DCP raise a
``CheckpointException`` with one traceback per rank, or the commit raise a plain
``OSError``. :func:`as_save_error` turns those into one
:class:`~ckpt_core.errors.SaveError` line that names the step, the folder, the
cause and the last committed step (which a failed save never touches: only a
successful commit renames into ``step-<N>``). Failures that are not the
storage's (a bug, a bad state dict) are left as they are.

What happens next is ``checkpoint.on_save_error``: ``"stop"`` raises the error
(``ckpt train`` exits 1); ``"retry"`` logs it as one WARNING line and saves
again at the next interval, except for the last step, whose failure always
raises (the run would otherwise end without its final state).
"""

from __future__ import annotations

import errno as errno_codes
import logging

from ckpt_core.errors import SaveError
from ckpt_core.storage import layout, object_errors

logger = logging.getLogger(__name__)

ON_SAVE_ERROR = ("stop", "retry")


def root_os_error(exc: BaseException) -> OSError | None:
    """The storage error behind ``exc``: itself, a DCP rank failure, or a cause."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, SaveError):
            return current
        if isinstance(current, OSError):
            return current
        converted = object_errors.as_os_error(current)  # an object store gone away
        if converted is not None:
            return converted
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            todo.extend(pair[0] for pair in failures.values() if isinstance(pair, tuple))
        todo.extend([current.__cause__, current.__context__])
    return None


def reason(exc: OSError) -> str:
    """``No space left on device (ENOSPC): /path`` from an ``OSError``."""
    if isinstance(exc, SaveError):
        return str(exc)
    code = errno_codes.errorcode.get(exc.errno or -1)
    text = exc.strerror or str(exc) or type(exc).__name__
    if code:
        text += f" ({code})"
    if exc.filename:
        text += f": {exc.filename}"
    return text


def last_committed(folder: str) -> str:
    """``step 12`` / ``none yet`` / ``unknown`` (the folder cannot be listed)."""
    try:
        steps = layout.committed_steps(folder)
    except Exception:  # noqa: BLE001 - the storage is failing: say so, do not raise
        return "unknown (the folder cannot be listed)"
    return f"step {steps[-1]}" if steps else "none yet"


def as_save_error(exc: BaseException, doing: str, folder: str) -> SaveError | None:
    """One-line :class:`SaveError` for a storage failure while ``doing``; None otherwise.

    ``doing`` reads like ``"saving step 12 to /ckpt/.tmp-step-12"``.
    """
    if isinstance(exc, SaveError):
        return exc
    cause = root_os_error(exc)
    if cause is None:
        return None
    error = SaveError(
        f"{doing} failed: {reason(cause)}. The last committed checkpoint "
        f"({last_committed(folder)}) is intact; free space or fix the storage, then restart "
        "to resume from it."
    )
    error.errno = cause.errno
    return error


def cleanup(path: str) -> None:
    """Remove a failed save's temporary folder, best effort (the storage may be gone)."""
    try:
        layout.remove_tree(path)
    except Exception as exc:  # noqa: BLE001 - the next save at this step removes it too
        logger.debug("could not remove %s after a failed save: %s", path, exc)


def handle(exc: SaveError, policy: str, *, final: bool) -> None:
    """Raise ``exc`` (policy ``"stop"``, or the run's last save) or log it (``"retry"``)."""
    if policy != "retry":
        raise exc
    if final:
        raise SaveError(
            f"{exc} (checkpoint.on_save_error = 'retry' does not apply to the last step: "
            "the run would end without its final state)"
        ) from exc
    logger.warning("%s Retrying at the next save (checkpoint.on_save_error = 'retry').", exc)
