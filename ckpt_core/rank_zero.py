"""Run one step on rank 0 and let every rank see how it ended.

Locks, pre-flight probes, temporary folders and commits happen on rank 0 only.
If rank 0 then failed and simply raised, the other ranks would wait forever in
their next collective. :func:`on_rank_zero` runs the step on rank 0 and
broadcasts its :class:`~ckpt_core.errors.CkptError` or ``OSError`` (or ``None``) on
the given process group, so all ranks raise the same one-line error together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ckpt_core.errors import CheckpointError, CkptError

T = TypeVar("T")


def distributed_on() -> bool:
    """Whether ``torch.distributed`` is built in and its default process group initialized."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def on_rank_zero(fn: Callable[[], T], rank: int, group: Any = None) -> T | None:
    """``fn()`` on rank 0 (its result; ``None`` elsewhere); collective on ``group``.

    A :class:`CkptError` raised by ``fn`` is raised on every rank. An ``OSError``
    (a full disk, a folder that cannot be made) is raised as is on rank 0 and as
    an ``OSError`` of the same errno, message and file on the others, so that
    callers turn it into the same error everywhere (``save_errors.as_save_error``).
    Any other exception is raised as is on rank 0 and as a :class:`CheckpointError`
    naming it on the others. Without a group (one process) this is ``fn()``.
    """
    if group is None:
        return fn() if rank == 0 else None
    import torch.distributed as dist

    result: T | None = None
    error: BaseException | None = None
    shared: CkptError | OSError | None = None
    if rank == 0:
        try:
            result = fn()
        except CkptError as exc:
            error, shared = exc, exc
        except OSError as exc:
            error = exc
            filename = None if exc.filename is None else str(exc.filename)
            shared = (
                OSError(exc.errno, exc.strerror, filename)
                if exc.errno is not None
                else CheckpointError(f"rank 0 failed: {type(exc).__name__}: {exc}")
            )
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the broadcast
            error = exc
            shared = CheckpointError(f"rank 0 failed: {type(exc).__name__}: {exc}")
    box: list[Any] = [shared]
    dist.broadcast_object_list(box, src=0, group=group)
    if error is not None:
        raise error
    if box[0] is not None:
        raise box[0]
    return result
