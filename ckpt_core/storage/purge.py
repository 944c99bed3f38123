"""Retention: which committed steps to keep, and deleting the rest in the background.

Rules (each one a lesson from a lost checkpoint):

* Purge runs only *after* a new step is committed, on one rank, in a thread.
  ``keep_latest_k = 0`` keeps everything; the other rules add steps to keep.
* Kept: the newest ``k`` **intact** steps (committed, a manifest whose files all
  have their listed sizes) — damaged or manifest-less steps never count toward
  ``k``, so a crash can never make purge delete the last good step; every step
  divisible by ``keep_every_n_steps``; the steps in ``keep_steps``; the steps
  pinned in ``pins.json`` (``ckpt pin``); the newest committed step; and any
  ``protected`` step (the one this run loaded).
* Only steps older than the oldest of the newest ``k`` intact ones may go: a
  damaged step newer than that is left for a human to look at.
* A step someone reads (a shared ``flock`` on its directory, see
  :mod:`ckpt_core.storage.pins`) is skipped and retried at the next purge.
* A step is first renamed to ``.deleting-step-<N>`` (local) or loses its manifest
  first (object stores), so a delete cut short never leaves a step that looks
  committed; leftovers of either kind are removed by the next purge.
* A failed delete is logged and retried at the next purge; it never raises.
* Leftover ``.tmp-step-<N>`` folders from a crash are removed when they are
  older than the newest committed step and not in flight (``in_flight``): a
  save of a newer step may be writing its temporary folder while purge runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence

from ckpt_core.errors import CheckpointError
from ckpt_core.storage import layout, manifest, pins
from ckpt_core.storage.store import DELETING_PREFIX, store_for

logger = logging.getLogger(__name__)

__all__ = [
    "DELETING_PREFIX",
    "Purger",
    "delete_step",
    "intact_steps",
    "plan_purge",
    "purge",
    "select_deletions",
]


def intact_steps(folder: str) -> list[int]:
    """Committed steps whose manifest exists and whose files have the listed sizes."""
    steps = []
    for s in layout.committed_steps(folder):
        try:
            if not manifest.check_sizes(layout.step_dir(folder, s)):
                steps.append(s)
        except CheckpointError as exc:  # a malformed manifest: not intact, never counted
            logger.warning("checkpoint purge: step %d is not intact: %s", s, exc)
    return steps


def select_deletions(
    committed: Sequence[int],
    intact: Sequence[int],
    keep_latest_k: int,
    *,
    keep_every_n_steps: int = 0,
    keep: Iterable[int] = (),
) -> list[int]:
    """The retention rules over plain lists (no I/O): committed steps to delete.

    ``keep`` gathers every step kept by name: ``keep_steps``, pins, protected.
    """
    if keep_latest_k <= 0 or not committed:
        return []
    committed, intact = sorted(committed), sorted(intact)
    latest = intact[-keep_latest_k:]
    kept = set(latest) | {int(s) for s in keep} | {committed[-1]}
    if keep_every_n_steps > 0:
        kept |= {s for s in committed if s % keep_every_n_steps == 0}
    cutoff = min(latest) if len(intact) >= keep_latest_k else -1
    return [s for s in committed if s < cutoff and s not in kept]


def plan_purge(
    folder: str,
    keep_latest_k: int,
    protected: Iterable[int] = (),
    in_flight: Iterable[int] = (),
    *,
    keep_every_n_steps: int = 0,
    keep_steps: Iterable[int] = (),
) -> tuple[list[int], list[str]]:
    """``(steps to delete, leftover paths to delete)`` without deleting anything.

    Leftovers come from the store (:meth:`ckpt_core.storage.store.LocalStore.leftovers`):
    staging folders and, on object stores, partial ``step-<N>/`` prefixes and unfinished
    multipart uploads, older than the newest committed step and not in flight.

    Reads the folder listing, the manifests' sizes and ``pins.json``; a malformed
    ``pins.json`` raises (nothing is deleted until it is fixed).
    """
    steps: list[int] = []
    committed = layout.committed_steps(folder)
    if keep_latest_k > 0:
        keep = {*protected, *keep_steps, *pins.read_pins(folder)}
        steps = select_deletions(
            committed,
            intact_steps(folder),
            keep_latest_k,
            keep_every_n_steps=keep_every_n_steps,
            keep=keep,
        )
    return steps, store_for(folder).leftovers(in_flight)


def delete_step(folder: str, step: int) -> bool:
    """Delete committed ``step`` unless it is read or pinned now; True when deleted.

    Raises on I/O errors (the caller logs and retries later).
    """
    with pins.deleting_step(folder, step) as free:
        if not free:
            logger.info("checkpoint purge: step %d is being read; keeping it for now", step)
            return False
        if step in pins.read_pins(folder):  # pinned since the plan was made
            return False
        store_for(folder).remove_step(step)
    return True


def purge(
    folder: str,
    keep_latest_k: int,
    protected: Iterable[int] = (),
    in_flight: Iterable[int] = (),
    *,
    keep_every_n_steps: int = 0,
    keep_steps: Iterable[int] = (),
) -> list[str]:
    """Delete what :func:`plan_purge` names; returns the paths deleted. Never raises."""
    try:
        steps, leftovers = plan_purge(
            folder,
            keep_latest_k,
            protected,
            in_flight,
            keep_every_n_steps=keep_every_n_steps,
            keep_steps=keep_steps,
        )
    except Exception as exc:  # noqa: BLE001 - listing failed: try again next time
        logger.warning("checkpoint purge: nothing deleted in %s (%s)", folder, exc)
        return []
    deleted = []
    for step in steps:
        path = layout.step_dir(folder, step)
        try:
            if delete_step(folder, step):
                deleted.append(path)
                logger.info("checkpoint purge: deleted %s", path)
        except Exception as exc:  # noqa: BLE001 - a failed delete must not stop training
            logger.warning("checkpoint purge: could not delete %s (%s); will retry", path, exc)
    store = store_for(folder)
    for path in leftovers:
        try:
            store.remove_leftover(path)
            deleted.append(path)
            logger.info("checkpoint purge: deleted %s", path)
        except Exception as exc:  # noqa: BLE001
            logger.warning("checkpoint purge: could not delete %s (%s); will retry", path, exc)
    return deleted


class Purger:
    """Runs :func:`purge` in one background thread at a time."""

    def __init__(
        self,
        folder: str,
        keep_latest_k: int,
        *,
        keep_every_n_steps: int = 0,
        keep_steps: Iterable[int] = (),
    ) -> None:
        self.folder = folder
        self.keep_latest_k = keep_latest_k
        self.keep_every_n_steps = keep_every_n_steps
        self.keep_steps = tuple(keep_steps)
        self._thread: threading.Thread | None = None
        self.started = 0  # how many purges this object started (tests: rank 0 only)

    def start(self, protected: Iterable[int] = (), in_flight: Iterable[int] = ()) -> None:
        """Start a purge unless one is still running (that one will catch up next time)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.started += 1
        self._thread = threading.Thread(
            target=purge,
            args=(self.folder, self.keep_latest_k, tuple(protected), tuple(in_flight)),
            kwargs={"keep_every_n_steps": self.keep_every_n_steps, "keep_steps": self.keep_steps},
            name="ckpt-purge",
            daemon=True,
        )
        self._thread.start()

    def join(self) -> None:
        """Wait for the running purge, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
