"""Retention: keep the newest ``k`` intact steps, delete older ones in the background.

Rules (each one a lesson from a lost checkpoint):

* Purge runs only *after* a new step is committed, on one rank, in a thread.
* "Intact" means committed with a manifest whose files are all present with
  the listed sizes; damaged or manifest-less steps never count toward ``k``,
  so a crash can never make purge delete the last good step.
* The newest committed step and any ``protected`` step (the one being loaded)
  are never deleted.
* A failed delete is logged and retried at the next purge; it never raises.
* Leftover ``.tmp-step-<N>`` folders from a crash are removed when they are
  older than the newest committed step and not in flight (``in_flight``): a
  save of a newer step may be writing its temporary folder while purge runs.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable

from ckpt_core.storage import layout, manifest

logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r"^\.tmp-step-(\d+)$")


def intact_steps(folder: str) -> list[int]:
    """Committed steps whose manifest exists and whose files have the listed sizes."""
    steps = layout.committed_steps(folder)
    return [s for s in steps if not manifest.check_sizes(layout.step_dir(folder, s))]


def plan_purge(
    folder: str,
    keep_latest_k: int,
    protected: Iterable[int] = (),
    in_flight: Iterable[int] = (),
) -> tuple[list[int], list[str]]:
    """``(steps to delete, stale tmp folder names to delete)`` without deleting anything."""
    if keep_latest_k <= 0:
        steps: list[int] = []
    else:
        committed = layout.committed_steps(folder)
        intact = intact_steps(folder)
        keep = set(intact[-keep_latest_k:]) | set(protected)
        if committed:
            keep.add(committed[-1])
        # Only steps older than the oldest kept intact step may go: a damaged step
        # newer than that is left for a human to look at.
        cutoff = min(intact[-keep_latest_k:]) if len(intact) >= keep_latest_k else -1
        steps = [s for s in committed if s < cutoff and s not in keep]
    flying = {int(s) for s in in_flight}
    newest = max(layout.committed_steps(folder), default=-1)
    tmps = []
    for name in layout.listdir(folder):
        m = _TMP_RE.match(name)
        if m and int(m.group(1)) < newest and int(m.group(1)) not in flying:
            tmps.append(name)
    return steps, tmps


def purge(
    folder: str,
    keep_latest_k: int,
    protected: Iterable[int] = (),
    in_flight: Iterable[int] = (),
) -> list[str]:
    """Delete what :func:`plan_purge` names; returns the paths deleted. Never raises."""
    try:
        steps, tmps = plan_purge(folder, keep_latest_k, protected, in_flight)
    except Exception:  # noqa: BLE001 - listing failed: try again next time
        logger.warning("checkpoint purge: could not list %s", folder, exc_info=True)
        return []
    deleted = []
    paths = [layout.step_dir(folder, s) for s in steps] + [layout.join(folder, t) for t in tmps]
    for path in paths:
        try:
            layout.remove_tree(path)
            deleted.append(path)
            logger.info("checkpoint purge: deleted %s", path)
        except Exception as exc:  # noqa: BLE001 - a failed delete must not stop training
            logger.warning("checkpoint purge: could not delete %s (%s); will retry", path, exc)
    return deleted


class Purger:
    """Runs :func:`purge` in one background thread at a time."""

    def __init__(self, folder: str, keep_latest_k: int) -> None:
        self.folder = folder
        self.keep_latest_k = keep_latest_k
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
            name="ckpt-purge",
            daemon=True,
        )
        self._thread.start()

    def join(self) -> None:
        """Wait for the running purge, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
