"""Pins and reader locks: what retention must not delete, kept beside the steps.

Both live in the checkpoint folder, outside every ``step-<N>`` (a committed step
is never modified, so ``ckpt verify`` and signatures still cover exactly what was
saved):

* ``<folder>/pins.json``: ``{"format_version": 1, "pinned": {"<step>": {"time": ..,
  "note": ..}}}``, written by ``ckpt pin`` / ``ckpt unpin`` (replaced atomically).
  It survives restarts and is shown by ``ckpt inspect``; it works on object stores.
* ``<folder>/.readers/step-<N>``: empty lock files. A reader (resume, initial load,
  ``ckpt convert``, ``ckpt pin``) holds a shared ``flock`` on one while it reads
  that step; purge deletes a step only while holding the exclusive lock, so the
  two never overlap. Local folders only: object stores have no locks (pin a step
  there to keep it), and a read-only folder needs none (nothing can delete it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from ckpt_core.errors import CheckpointError
from ckpt_core.storage import layout

logger = logging.getLogger(__name__)

PINS_NAME = "pins.json"
READERS_DIR = ".readers"
_STEP_PATH_RE = re.compile(r"^(.*)[/\\]step-(\d+)[/\\]?$")


def read_pins(folder: str) -> dict[int, dict[str, Any]]:
    """Pinned steps of ``folder`` (empty when there is no ``pins.json``).

    A malformed file is a :class:`CheckpointError` naming it: purge then deletes
    nothing rather than guess.
    """
    path = layout.join(folder, PINS_NAME)
    if not layout.exists(path):
        return {}
    try:
        with layout.open_file(path, "rb") as f:
            data = json.loads(f.read(1 << 20).decode())
        pinned = data["pinned"]
        return {int(step): dict(info or {}) for step, info in pinned.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} is not a pins file ({exc}); fix or delete it (ckpt pin rewrites it)."
        ) from exc


def _write_pins(folder: str, pins: dict[int, dict[str, Any]]) -> None:
    data = {
        "format_version": 1,
        "pinned": {str(step): pins[step] for step in sorted(pins)},
    }
    layout.write_file(layout.join(folder, PINS_NAME), json.dumps(data, indent=1).encode())


def set_pin(folder: str, step: int, pinned: bool, note: str | None = None) -> None:
    """Pin (or unpin) committed ``step`` of ``folder``.

    Pinning holds the step's reader lock while it checks the step and writes
    ``pins.json``, so a purge running at the same time either sees the pin or has
    already deleted the step (then this raises, naming the committed steps).
    """
    if not layout.exists(folder):
        raise CheckpointError(f"{folder} does not exist; pass a checkpoint folder.")
    with _folder_lock(folder), reading_step(folder, step):
        committed = layout.committed_steps(folder)
        pins = read_pins(folder)
        if pinned:
            if step not in committed:
                raise CheckpointError(
                    f"{folder} has no committed step {step} to pin; committed steps: {committed}."
                )
            pins[step] = {"time": round(time.time(), 3), **({"note": note} if note else {})}
        elif pins.pop(step, None) is None:
            logger.info("step %d of %s was not pinned", step, folder)
            return
        _write_pins(folder, pins)


def _lock_path(folder: str, step: int) -> str | None:
    """``<folder>/.readers/step-<N>`` (created), or None where no lock can be taken."""
    if layout.is_uri(folder):
        return None
    local = layout.filesystem(folder)[1]
    if not os.path.isdir(local):
        return None
    try:
        os.makedirs(os.path.join(local, READERS_DIR), exist_ok=True)
    except OSError:
        return None  # read-only or missing folder: nothing can delete its steps here
    return os.path.join(local, READERS_DIR, f"{layout.STEP_PREFIX}{step}")


@contextlib.contextmanager
def _flock(path: str | None, exclusive: bool, blocking: bool) -> Iterator[bool]:
    """Hold ``flock`` on ``path``; yields whether it is held (always True when blocking)."""
    if path is None:
        yield True
        return
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield True  # cannot create the lock file: read-only, as above
        return
    try:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def reading_step(folder: str, step: int) -> Iterator[None]:
    """Hold ``step``'s shared reader lock: purge does not delete it meanwhile.

    Waits while a purge is deleting that step (the caller then finds it gone).
    """
    with _flock(_lock_path(folder, step), exclusive=False, blocking=True):
        yield


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """:func:`reading_step` for a step folder path ``.../step-<N>``; no-op for other paths."""
    m = _STEP_PATH_RE.match(path)
    if m is None:
        yield
        return
    with reading_step(m.group(1) or ".", int(m.group(2))):
        yield


@contextlib.contextmanager
def deleting_step(folder: str, step: int) -> Iterator[bool]:
    """Try to take ``step``'s lock exclusively; yields False while anyone reads it."""
    with _flock(_lock_path(folder, step), exclusive=True, blocking=False) as held:
        yield held


def remove_lock(folder: str, step: int) -> None:
    """Remove a deleted step's lock file (a reader still holding it then finds no step)."""
    path = _lock_path(folder, step)
    if path is not None:
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """Serializes ``pins.json`` read-modify-write between ``ckpt pin`` processes."""
    path = None
    if not layout.is_uri(folder):
        local = layout.filesystem(folder)[1]
        if os.path.isdir(local):
            with contextlib.suppress(OSError):
                os.makedirs(os.path.join(local, READERS_DIR), exist_ok=True)
            path = os.path.join(local, READERS_DIR, "pins.lock")
    with _flock(path, exclusive=True, blocking=True):
        yield
