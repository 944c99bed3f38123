"""One JSON object per training step, appended to ``metrics.path`` by rank 0.

Each line is ``{"step", "loss", "tokens", "seconds", "lr", "tokens_per_s"}``;
``loss`` is the global mean loss of the step (every rank's mean, averaged), so
runs on different world sizes are comparable. Lines are flushed as they are
written: after a crash the file holds every step that finished, and a resumed
run appends to it (so steps redone after the last committed checkpoint appear
twice, with equal values on a bit-exact resume).
"""

from __future__ import annotations

import json
import os
from typing import IO, Any


class MetricsWriter:
    """Appends metric lines; a no-op on ranks other than 0."""

    def __init__(self, path: str, *, enabled: bool = True, fresh: bool = False) -> None:
        self.path = path
        self._file: IO[str] | None = None
        if not enabled:
            return
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        if fresh:
            self._file = open(path, "w")  # noqa: SIM115 - closed in close()
        else:
            _drop_partial_last_line(path)
            self._file = open(path, "a")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        """Write one record as a line and flush it."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _drop_partial_last_line(path: str) -> None:
    """Cut a line a killed run left half written, so the next line starts clean."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Every complete line of a metrics file, in order (duplicated steps included)."""
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                out.append(json.loads(line))
    return out
