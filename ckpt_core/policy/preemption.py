"""Preemption: turn a scheduler's "stop soon" signal into one last saved step.

Spot instances and cluster schedulers send SIGTERM (Slurm: any signal chosen with
``--signal``, e.g. SIGUSR1) some seconds before they kill a job. The protocol:

1. :class:`PreemptionHandler` catches those signals. The first one only sets a
   flag: nothing else runs inside the handler.
2. The training loop asks :meth:`CheckpointManager.preemption_requested
   <ckpt_core.policy.manager.CheckpointManager.preemption_requested>` once per step; the
   manager all-reduces the flag (MAX), so every rank stops after the same step
   even when only one of them got the signal.
3. Every rank finishes the step, ``save_now(step)`` saves it synchronously, and
   ``ckpt train`` exits with :data:`PREEMPTED_EXIT` (75, ``EX_TEMPFAIL``).
4. A second signal means "now": the process leaves at once through ``os._exit``
   with ``128 + signum`` (143 for SIGTERM). A save cut short leaves only its
   ``.tmp-step-<N>`` folder, which is never loaded: the last committed step stays
   whole. Once the preemption save is committed, a further signal exits with 75.

A repeat within :data:`DUPLICATE_WINDOW_S` of the first signal is the same notice,
not a second one: ``ckpt train --nproc N`` forwards the launcher's signal to every
rank, and a scheduler that signals every process of a job reaches a rank twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

#: Exit status of a run stopped by preemption after saving its step (sysexits' EX_TEMPFAIL).
PREEMPTED_EXIT = 75
#: Seconds after the first signal during which a repeat counts as the same notice.
DUPLICATE_WINDOW_S = 0.2
#: Signals that cannot be caught, or that mean a crash rather than a notice.
_REFUSED = {"SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"}


def parse_signals(value: Any) -> tuple[signal.Signals, ...]:
    """Signal names to signals: ``"SIGTERM"``, ``"term"``, ``"SIGTERM,SIGUSR1"``, a list,
    or ``"none"`` / ``[]`` (no handler).

    Raises ``ValueError`` naming the value that is not a catchable signal.
    """
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[signal.Signals] = []
    for item in items:
        name = str(item).strip().upper()
        if name in ("", "NONE"):
            continue
        if not name.startswith("SIG"):
            name = "SIG" + name
        sig = getattr(signal.Signals, name, None)
        if sig is None or name in _REFUSED:
            catchable = ", ".join(s for s in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"))
            raise ValueError(
                f"{item!r} is not a signal a job can be warned with; use one of {catchable} "
                "(or 'none')."
            )
        if sig not in out:
            out.append(sig)
    return tuple(out)


def signal_names(signals: Iterable[signal.Signals]) -> list[str]:
    """``["SIGTERM", ...]`` (the config's spelling)."""
    return [signal.Signals(s).name for s in signals]


class PreemptionHandler:
    """Catches preemption signals for one process; see the module docstring.

    ``install()`` must run on the main thread (Python delivers signals there).
    The manager calls :meth:`saving` and :meth:`saved` around its preemption save
    so that a later signal picks the right exit status.
    """

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self.signals = tuple(signals)
        self._first: float | None = None
        self._signum: int | None = None
        self._saved = False
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a preemption signal arrived (this process only)."""
        return self._first is not None

    @property
    def signal_name(self) -> str | None:
        """The first signal received, e.g. ``"SIGTERM"``; None before any."""
        return None if self._signum is None else signal.Signals(self._signum).name

    def install(self) -> None:
        """Catch :attr:`signals` from now on (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            from ckpt_core.errors import ConfigError

            raise ConfigError(
                "checkpoint.preemption_signal: signal handlers can only be installed from "
                "the main thread; build the manager there, or set preemption_signal = 'none'."
            )
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        logger.debug("preemption: catching %s", ", ".join(signal_names(self.signals)))

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def saved(self) -> None:
        """The preemption save is committed: a further signal exits with PREEMPTED_EXIT."""
        self._saved = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first, self._signum = now, signum
            return
        if now - self._first < DUPLICATE_WINDOW_S:
            return  # the same notice, delivered twice
        code = PREEMPTED_EXIT if self._saved else 128 + signum
        name = signal.Signals(signum).name
        what = (
            "the preemption save is committed"
            if self._saved
            else ("stopping the save; the last committed step is intact")
        )
        os.write(2, f"ckpt: second {name}: exiting now with {code} ({what})\n".encode())
        os._exit(code)


def pause_before_commit() -> None:
    """Sleep ``CKPT_TEST_SAVE_DELAY_S`` seconds (unset: none) between a save's data and
    its commit: a test hook that holds a save at its most fragile point, so a test can
    signal or kill it there."""
    delay = float(os.environ.get("CKPT_TEST_SAVE_DELAY_S") or 0)
    if delay > 0:
        time.sleep(delay)
