"""DCP storage writers and readers for local paths and fsspec URIs.

One small protocol for both kinds of storage: :func:`storage_writer` and
:func:`storage_reader` take a path string (a local folder or ``proto://...``)
and return torch's own ``FileSystemWriter`` / ``FsspecWriter`` (local data files
go out with ``O_DIRECT``, :mod:`ckpt_core.storage.fast_writer`) and readers that
unpickle ``.metadata`` safely (:mod:`ckpt_core.storage.safe_metadata`; local
folders read tensors in place, :mod:`ckpt_core.storage.fast_reader`). What they
write is plain DCP that torch's tools read.

The writer's file system is wrapped by :class:`ChecksummingFS`: every file DCP
writes passes through a stream that computes its CRC-32 *while* the bytes are
written (on large writes the CRC runs on a helper thread next to the write
syscall; ``zlib.crc32`` releases the GIL), so the manifest needs no second read.
"""

from __future__ import annotations

import os
import threading
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from ckpt_core.storage import layout
from ckpt_core.storage.manifest import crc32_hex

# A single-process save/load (no process group) is a supported use here, not a mistake:
# DCP warns about it on every call, so silence exactly that message.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)

_PARALLEL_CRC_MIN = 1 << 20
_CRC_POOL: ThreadPoolExecutor | None = None
_CRC_POOL_LOCK = threading.Lock()


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads: start afresh.
    global _CRC_POOL, _CRC_POOL_LOCK
    _CRC_POOL = None
    _CRC_POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _crc_pool() -> ThreadPoolExecutor:
    global _CRC_POOL
    with _CRC_POOL_LOCK:
        if _CRC_POOL is None:
            _CRC_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-crc")
        return _CRC_POOL


class _ChecksumStream:
    """Write-only stream proxy that keeps a running CRC-32 and byte count."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.crc = 0
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _PARALLEL_CRC_MIN:
            future = _crc_pool().submit(zlib.crc32, view, self.crc)
            written = self.raw.write(view)
            self.crc = future.result()
        else:
            written = self.raw.write(view)
            self.crc = zlib.crc32(view, self.crc)
        if written is not None and written != view.nbytes:
            raise OSError(f"short write: {written} of {view.nbytes} bytes")
        self.size += view.nbytes
        return view.nbytes

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, ...
        return getattr(self.raw, name)


class ChecksummingFS:
    """Wraps a DCP ``FileSystemBase``; records ``name -> (size, crc)`` of written files."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.records: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with self._inner.create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _ChecksumStream(raw)
            yield stream
            with self._lock:
                self.records[_name(path)] = (stream.size, crc32_hex(stream.crc))

    def rename(self, path: Any, new_path: Any) -> None:
        self._inner.rename(path, new_path)
        with self._lock:
            record = self.records.pop(_name(path), None)
            if record is not None:
                self.records[_name(new_path)] = record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _name(path: Any) -> str:
    return os.path.basename(os.fspath(path).rstrip("/"))


def storage_writer(path: str, *, thread_count: int = 1, direct_io: bool = True) -> Any:
    """A DCP writer for ``path`` whose ``fs.records`` holds each written file's checksum.

    Local folders are written with ``O_DIRECT`` through a reused aligned buffer
    (:mod:`ckpt_core.storage.fast_writer`; same DCP bytes) unless ``direct_io`` is
    False or ``CKPT_DIRECT_IO=0``.

    Local folders are fsync'd (data files and ``.metadata``; the commit fsyncs the
    folder); fsspec storage has no fsync and is durable on close.
    """
    if layout.is_uri(path):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        from ckpt_core.storage.object_io import MultipartFS

        writer = FsspecWriter(
            path, sync_files=False, thread_count=thread_count, **layout.fsspec_options(path)
        )
        writer.fs = MultipartFS(writer.fs)  # S3: parts uploaded in parallel
    else:
        from torch.distributed.checkpoint import FileSystemWriter

        from ckpt_core.storage import fast_writer

        writer = FileSystemWriter(
            layout.filesystem(path)[1], sync_files=True, thread_count=thread_count
        )
        if direct_io and fast_writer.enabled():
            writer.fs = fast_writer.DirectFileSystem()
    writer.fs = ChecksummingFS(writer.fs)
    return writer


def written_checksums(writer: Any) -> dict[str, tuple[int, str]]:
    """``name -> (size, checksum)`` for the files ``writer`` wrote (empty if unknown)."""
    fs = getattr(writer, "fs", None)
    return dict(fs.records) if isinstance(fs, ChecksummingFS) else {}


def storage_reader(path: str, metadata: Any = None) -> Any:
    """A DCP reader for ``path`` (local or URI) that reads only checked data.

    ``metadata``: already read by :func:`ckpt_core.storage.safe_metadata.read_metadata`.
    Loading goes through :func:`ckpt_core.storage.safe_metadata.safe_load`.
    """
    from ckpt_core.storage.safe_metadata import safe_reader

    return safe_reader(path, metadata)
