"""Console progress: a rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("ckpt_core.trainer")


class Progress:
    """Shows step, loss and tokens/s on rank 0; silent elsewhere.

    On a terminal (``stdout.isatty()``) a rich progress bar; otherwise one
    ``logging`` line every ``log_every`` steps and at the last step.
    """

    def __init__(
        self, total: int, start: int = 0, *, enabled: bool = True, log_every: int = 10
    ) -> None:
        self.total = total
        self.log_every = log_every
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []
        self._stderr = sys.stderr
        if enabled and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task(
                "train", total=total, completed=start, loss="-", tps="-"
            )
            self._bar.start()
            # Log lines go through rich's proxy, above the bar, instead of through it.
            for handler in logging.getLogger().handlers:
                if type(handler) is logging.StreamHandler and handler.stream is self._stderr:
                    self._handlers.append((handler, handler.setStream(sys.stderr)))

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        """Report a finished step."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(
                self._task, completed=step, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}"
            )
        elif step % self.log_every == 0 or step == self.total:
            logger.info(
                "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s",
                step,
                self.total,
                loss,
                lr,
                tokens_per_s,
            )

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self._bar is not None:
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._handlers.clear()
            self._bar.stop()
            self._bar = None
