"""Worker processes of a streamed ``ckpt convert`` and the plain-data frames they exchange.

``--workers N`` cuts the planned files into N shares (:func:`ckpt_core.convert.write.split_pieces`);
the parent writes the first share while a worker process writes each other one. A
worker answers on a pipe with length-prefixed JSON frames: progress first,
``["ok", results]`` or ``["error", details]`` last. Where the platform has fork, a
worker is a fork of the planned parent (nothing to import or plan again; one intra-op
thread, since the workers are the parallelism); elsewhere, or with
``CKPT_CONVERT_WORKERS=spawn``, it is ``python -m ckpt_core.convert.workers`` reading a
JSON ``{"request": ..., "pieces": ...}`` on stdin, which redoes the same deterministic
plan (and never re-runs the caller's ``__main__``). Nothing here unpickles: a frame is
JSON, so a worker's answer can only ever be data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ckpt_core.convert.write import (
    Conversion,
    Piece,
    PieceResult,
    Reporter,
    Request,
    split_pieces,
)
from ckpt_core.errors import CheckpointError, CkptError
from ckpt_core.storage import layout

logger = logging.getLogger(__name__)

WORKERS_ENV = "CKPT_CONVERT_WORKERS"


# -- frames: plain JSON both ways ---------------------------------------------------------


def _send(stream: Any, frame: list) -> None:
    data = json.dumps(frame, separators=(",", ":")).encode()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _frames(stream: Any) -> Iterator[list]:
    while True:
        head = stream.read(8)
        if len(head) < 8:
            return
        (length,) = struct.unpack("<Q", head)
        yield json.loads(stream.read(length))


def encode_request(request: Request, pieces: list[Piece]) -> bytes:
    """What a spawned worker reads on stdin: the request, its share and the fsspec
    options of the parent's URIs (``--storage-option``), as JSON."""
    from ckpt_core.storage import layout

    return json.dumps(
        {
            "request": dataclasses.asdict(request),
            "pieces": [_piece(p) for p in pieces],
            "storage_options": layout.storage_option_table(),
        }
    ).encode()


def decode_request(data: bytes) -> tuple[Request, list[Piece]]:
    """The inverse of :func:`encode_request` (the storage options are set for this process)."""
    from ckpt_core.storage import layout

    value = json.loads(data)
    for prefix, options in (value.get("storage_options") or {}).items():
        layout.set_storage_options(prefix, options)
    fields = dict(value["request"])
    if fields.get("base") is not None:
        fields["base"] = tuple(fields["base"])
    return Request(**fields), [Piece(*p) for p in value["pieces"]]


def _piece(piece: Piece) -> list[int]:
    return [piece.file, piece.start, piece.end]


def encode_result(result: PieceResult) -> dict[str, Any]:
    """A :class:`PieceResult` as JSON values (its DCP ``WriteResult`` s field by field)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    writes = []
    for w in result.writes:
        info = w.storage_data
        if not isinstance(info, _StorageInfo):
            raise TypeError(f"convert: a write result holds a {type(info).__name__}")
        writes.append(
            {
                "fqn": w.index.fqn,
                "offset": None if w.index.offset is None else list(w.index.offset),
                "index": w.index.index,
                "size": w.size_in_bytes,
                "path": info.relative_path,
                "at": info.offset,
                "length": info.length,
                "transforms": None
                if info.transform_descriptors is None
                else list(info.transform_descriptors),
            }
        )
    return {
        "piece": _piece(result.piece),
        "crc": result.crc,
        "size": result.size,
        "writes": writes,
    }


def decode_result(value: dict[str, Any]) -> PieceResult:
    """The inverse of :func:`encode_result`."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.storage import WriteResult

    writes = [
        WriteResult(
            index=MetadataIndex(
                w["fqn"], None if w["offset"] is None else torch.Size(w["offset"]), w["index"]
            ),
            size_in_bytes=w["size"],
            storage_data=_StorageInfo(w["path"], w["at"], w["length"], w["transforms"]),
        )
        for w in value["writes"]
    ]
    return PieceResult(Piece(*value["piece"]), value["crc"], value["size"], writes)


# -- workers ---------------------------------------------------------------------------


class _PipeReporter(Reporter):
    """Progress frames to the parent (from the writer and the reader thread)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def read(self, nbytes: int) -> None:
        with self.lock:
            _send(self.stream, ["read", nbytes, 0])

    def wrote(self, nbytes: int, tensors: int) -> None:
        with self.lock:
            _send(self.stream, ["wrote", nbytes, tensors])


def _serve(conversion_or_request: Conversion | Request, pieces: list[Piece], out: Any) -> None:
    """A worker's whole life: write ``pieces``, answer on ``out`` (never raises)."""
    try:
        if isinstance(conversion_or_request, Request):
            conversion = Conversion(conversion_or_request)
        else:
            conversion = conversion_or_request
            conversion.release()
        reporter = _PipeReporter(out)
        conversion.reporter = reporter
        results = conversion.write(pieces)
        with reporter.lock:
            _send(out, ["ok", [encode_result(r) for r in results]])
    except BaseException as exc:  # noqa: BLE001 - sent to the parent, raised there
        filename = getattr(exc, "filename", None)
        details = [
            type(exc).__module__,
            type(exc).__qualname__,
            str(exc),
            getattr(exc, "errno", None),
            None if filename is None else str(filename),
            getattr(exc, "strerror", None),
        ]
        _send(out, ["error", details])


def _worker_main() -> None:
    """Entry of a spawned worker process."""
    import sys

    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write frames
    request, pieces = decode_request(sys.stdin.buffer.read())
    _serve(request, pieces, out)


def _fork(conversion: Conversion, pieces: list[Piece]) -> tuple[Callable[[], int], Any]:
    """A forked worker: ``(wait for it → exit status, its answer stream)``."""
    import os

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one intra-op thread, answer, leave without cleanup handlers
        try:
            os.close(read_fd)
            torch.set_num_threads(1)
            with os.fdopen(write_fd, "wb") as out:
                _serve(conversion, pieces, out)
        finally:
            os._exit(0)
    os.close(write_fd)
    return (lambda: os.waitpid(pid, 0)[1]), os.fdopen(read_fd, "rb")


def _spawn(request: Request, pieces: list[Piece]) -> tuple[Callable[[], int], Any]:
    """A fresh interpreter as worker: ``(wait for it → exit code, its answer stream)``."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt_core.convert.workers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    proc.stdin.write(encode_request(request, pieces))
    proc.stdin.close()
    return proc.wait, proc.stdout


def _raise_remote(info: list) -> None:
    """Raise in the parent what a worker raised (CkptError classes by name, OSErrors whole)."""
    import importlib

    module, qualname, message, errno, filename, strerror = info
    if errno is not None and strerror is not None:
        raise OSError(errno, strerror, filename)
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, CkptError):
        try:
            error = cls(message)
        except TypeError:
            error = CheckpointError(message)
        raise error
    raise CheckpointError(f"convert: a worker failed: {qualname}: {message}")


def write_all(
    conversion: Conversion, request: Request, workers: int, reporter: Reporter
) -> list[PieceResult]:
    """Write every output file; with ``workers`` > 1 shares go to spawned processes too."""
    sizes = conversion.file_sizes()
    splittable = [
        request.fmt == "hf" and not layout.is_uri(request.out) for _ in conversion.plan.files
    ]
    if layout.is_uri(request.out) and workers > 1:
        logger.info("convert: --workers needs a local destination; writing in one process")
        workers = 1
    shares = [s for s in split_pieces(sizes, splittable, max(1, workers)) if s]
    conversion.reporter = reporter
    if len(shares) <= 1:
        return conversion.write(shares[0] if shares else [])
    return _write_in_processes(conversion, request, shares, reporter)


def _write_in_processes(
    conversion: Conversion, request: Request, shares: list[list[Piece]], reporter: Reporter
) -> list[PieceResult]:
    """The parent writes the first share while a worker process writes each other one."""
    import os

    spawn = not hasattr(os, "fork") or os.environ.get(WORKERS_ENV, "fork") == "spawn"
    workers = [
        _spawn(request, share) if spawn else _fork(conversion, share) for share in shares[1:]
    ]
    finals: list[list | None] = [None] * len(workers)

    def listen(i: int, stream: Any) -> None:
        with stream:
            for frame in _frames(stream):
                if frame[0] == "read":
                    reporter.read(frame[1])
                elif frame[0] == "wrote":
                    reporter.wrote(frame[1], frame[2])
                else:
                    finals[i] = frame

    listeners = [
        threading.Thread(target=listen, args=(i, stream), daemon=True)
        for i, (_, stream) in enumerate(workers)
    ]
    for listener in listeners:
        listener.start()
    try:
        results = conversion.write(shares[0])
    finally:  # the workers finish (or fail) on their own; their files are discarded on failure
        statuses = []
        for listener, (wait, _) in zip(listeners, workers):
            listener.join()
            statuses.append(wait())
    for status, final in zip(statuses, finals):
        if final is None:
            raise CheckpointError(
                f"convert: a worker process ended without an answer (status {status}); "
                "see its output above."
            )
        if final[0] == "error":
            _raise_remote(final[1])
        results.extend(decode_result(r) for r in final[1])
    return results


if __name__ == "__main__":
    # A spawned worker: run the imported module's copy (its classes are the ones used).
    from ckpt_core.convert.workers import _worker_main as main

    main()
