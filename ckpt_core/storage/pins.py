"""Pins and reader locks: what retention must not delete.

Neither changes a committed step's files (``ckpt verify`` and signatures still
cover exactly what was saved):

* ``<folder>/pins.json``: ``{"format_version": 1, "pinned": {"<step>": {"time": ..,
  "note": ..}}}``, written by ``ckpt pin`` / ``ckpt unpin`` (replaced atomically).
  It survives restarts and is shown by ``ckpt inspect``; it works on object stores.
* Reader locks: a reader of another run's step (a DCP initial load, ``ckpt convert``,
  ``ckpt pin``) holds a shared ``flock`` on the ``step-<N>`` directory itself while it
  reads; purge deletes a step only while holding it exclusively, so the two never
  overlap. No lock files are created. Local file systems only: object stores have no
  locks (pin a step there to keep it), and where ``flock`` is not supported (some
  NFS mounts refuse it on directories) reads and deletes go on unlocked.
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


@contextlib.contextmanager
def _flock_dir(path: str, exclusive: bool, blocking: bool) -> Iterator[bool]:
    """Hold ``flock`` on directory ``path``; yields False only when another holder
    blocks a non-blocking attempt (no lock where there is none to take)."""
    if layout.is_uri(path):
        yield True
        return
    import fcntl

    try:
        fd = os.open(layout.filesystem(path)[1], os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield True  # gone or unreadable: nothing to hold
        return
    try:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                yield False
                return
            logger.debug("no flock on %s (%s): going on unlocked", path, exc)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _same_dir(path: str, before: os.stat_result | None) -> bool:
    try:
        now = os.stat(layout.filesystem(path)[1])
    except OSError:
        return False
    return before is None or (now.st_ino, now.st_dev) == (before.st_ino, before.st_dev)


@contextlib.contextmanager
def reading_step(folder: str, step: int) -> Iterator[None]:
    """Hold ``step``'s shared reader lock: purge does not delete it meanwhile.

    Waits while a purge is deleting that step, then raises :class:`CheckpointError`
    (the step is gone).
    """
    path = layout.step_dir(folder, step)
    before = None if layout.is_uri(path) else _stat(path)
    with _flock_dir(path, exclusive=False, blocking=True):
        if before is not None and not _same_dir(path, before):
            raise CheckpointError(
                f"{path} was deleted by its run's retention while this process waited to "
                f"read it; pick a step that exists (ckpt inspect {folder}), or pin it first."
            )
        yield


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(layout.filesystem(path)[1])
    except OSError:
        return None


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
    with _flock_dir(layout.step_dir(folder, step), exclusive=True, blocking=False) as held:
        yield held


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """Serializes ``pins.json`` read-modify-write between ``ckpt pin`` processes."""
    with _flock_dir(folder, exclusive=True, blocking=True):
        yield
