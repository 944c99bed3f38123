"""One JSON object per training step, appended to ``metrics.path`` by rank 0.

Each line is ``{"step", "loss", "tokens", "seconds", "lr", "tokens_per_s"}``;
``loss`` is the global mean loss of the step (every rank's mean, averaged), so
runs on different world sizes are comparable. Lines are flushed as they are
written: after a crash the file holds every step that finished, and a resumed
run appends to it (so steps redone after the last committed checkpoint appear
twice, with equal values on a bit-exact resume).

An object store cannot append, so a ``metrics.path`` that is a URI (as under
``job.folder = "s3://bucket/run"``) is *spooled*: lines go to a local file,
``ckpt-spool/<scheme>/<bucket>/<prefix>/<name>`` under the working directory
(:func:`spool_path`), flushed per step as above, and the whole file is copied to
the URI when the writer closes (the run's end, a preemption exit or an error).
A run that starts on a machine without the spool file but with the URI's copy
continues that copy. After a ``kill -9`` the URI holds the copy of the last
clean exit and the local spool file holds every finished step.
"""

from __future__ import annotations

import json
import logging
import os
from typing import IO, Any

logger = logging.getLogger(__name__)

#: Local folder (under the working directory) holding metrics bound for a URI.
SPOOL_DIR = "ckpt-spool"


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def spool_path(path: str) -> str:
    """The local file metric lines go to: ``path`` itself, or its spool file for a URI."""
    if not _is_uri(path):
        return path
    scheme, rest = path.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return os.path.join(os.getcwd(), SPOOL_DIR, scheme, *parts)


class MetricsWriter:
    """Appends metric lines; a no-op on ranks other than 0."""

    def __init__(self, path: str, *, enabled: bool = True, fresh: bool = False) -> None:
        self.remote = path if _is_uri(path) else None
        self.path = path = spool_path(path)
        self._file: IO[str] | None = None
        if not enabled:
            return
        if self.remote is not None:
            logger.info(
                "metrics.path %s is in an object store, which cannot append: lines go to %s "
                "and are copied to %s when the run ends",
                self.remote,
                path,
                self.remote,
            )
            if not fresh and not os.path.exists(path):
                _fetch(self.remote, path)  # continue the copy a run on another machine left
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
        """Close the file and copy it to the URI, if any (idempotent).

        A failed copy is a warning naming the local file, never an error that
        would hide the run's own outcome.
        """
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self.remote is not None:
            try:
                _upload(self.path, self.remote)
            except Exception as exc:  # noqa: BLE001 - the run's result matters more
                logger.warning(
                    "could not copy the metrics to %s (%s); they are in %s",
                    self.remote,
                    exc,
                    self.path,
                )


def _fetch(uri: str, local: str) -> None:
    """Copy the metrics object ``uri`` to ``local`` when it exists."""
    from ckpt_core.storage import layout

    fs, inner = layout.filesystem(uri)
    if not fs.exists(inner):
        return
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fs.get_file(inner, local)
    logger.info("continuing the metrics of %s (copied to %s)", uri, local)


def _upload(local: str, uri: str) -> None:
    """Copy the local metrics file to the object ``uri`` (one PUT)."""
    from ckpt_core.storage import layout

    fs, inner = layout.filesystem(uri)
    fs.put_file(local, inner)


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
    """Every complete line of a metrics file (local or URI), in order (repeated steps too)."""
    if _is_uri(path):
        from ckpt_core.storage import layout

        fs, inner = layout.filesystem(path)
        lines = fs.cat_file(inner).decode("utf-8").splitlines(keepends=True)
    else:
        with open(path) as f:
            lines = f.readlines()
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]
