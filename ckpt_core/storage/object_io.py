"""Moving DCP bytes to and from an object store: parallel multipart uploads, ranged reads.

Writes: s3fs uploads a file's parts one after another. :class:`PartUploadStream`
keeps up to ``concurrency`` parts of ``part_size`` bytes in flight at once (one
multipart upload per data file), so a rank's memory holds at most
``(concurrency + 1) * part_size`` bytes of upload buffers per open file, never
a second copy of its state. A file smaller than one part is a single PUT. A
failed or interrupted upload is aborted (best effort); one the process did not
live to abort is removed by retention (:func:`abandoned_uploads`).

Reads: :func:`read_ranges` fetches the byte ranges DCP asks for, several at a
time, in batches of at most ``max_batch_bytes``: exactly the items' bytes, no
read-ahead, no whole-file read.

Tuning: ``CKPT_S3_PART_MB`` (default 16), ``CKPT_S3_CONCURRENCY`` (default 4).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

MIN_PART = 5 << 20  # S3's smallest part (all but the last)


def part_size() -> int:
    """Bytes per uploaded part (``CKPT_S3_PART_MB``, at least 5 MiB)."""
    return max(MIN_PART, int(float(os.environ.get("CKPT_S3_PART_MB", "16")) * (1 << 20)))


def concurrency() -> int:
    """Parts in flight per file, and ranges fetched at once (``CKPT_S3_CONCURRENCY``)."""
    return max(1, int(os.environ.get("CKPT_S3_CONCURRENCY", "4")))


def supports_multipart(fs: Any) -> bool:
    """Whether ``fs`` is an S3 client this module drives directly (s3fs)."""
    return hasattr(fs, "call_s3") and hasattr(fs, "split_path")


class PartUploadStream:
    """A write-only file that uploads itself as a multipart upload, parts in parallel."""

    def __init__(self, fs: Any, path: str, *, size: int | None = None, workers: int | None = None):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_size = size or part_size()
        self.workers = workers or concurrency()
        self._buf = bytearray()
        self._pos = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._slots = threading.BoundedSemaphore(self.workers)
        self._pool: ThreadPoolExecutor | None = None
        self.closed = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        """Nothing to do: parts go out as they fill."""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        start = 0
        while start < n:
            room = self.part_size - len(self._buf)
            self._buf += view[start : start + room]
            start += room
            if len(self._buf) >= self.part_size:
                self._send_part()
        self._pos += n
        return n

    def _send_part(self) -> None:
        if self._upload_id is None:
            out = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self._upload_id = out["UploadId"]
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ckpt-s3-part")
        body, self._buf = bytes(self._buf), bytearray()
        number = len(self._parts) + 1
        self._slots.acquire()  # at most `workers` parts held in flight
        assert self._pool is not None
        self._parts.append(self._pool.submit(self._upload, number, body))

    def _upload(self, number: int, body: bytes) -> dict[str, Any]:
        try:
            out = self.fs.call_s3(
                "upload_part",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
            return {"PartNumber": number, "ETag": out["ETag"]}
        finally:
            self._slots.release()

    def close(self) -> None:
        """Send what is left and complete the upload (a single PUT for a small file)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._upload_id is None:
                self.fs.call_s3(
                    "put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self._buf)
                )
                return
            if self._buf:
                self._send_part()
            parts = [f.result() for f in self._parts]
            self.fs.call_s3(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            self.abort()
            raise
        finally:
            self._buf = bytearray()
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Drop the upload: its parts are deleted and no object appears (best effort)."""
        self.closed = True
        if self._upload_id is None:
            return
        for f in self._parts:
            f.cancel()
        wait(self._parts)  # a part landing after the abort would keep the upload alive
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        try:
            self.fs.call_s3(
                "abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id
            )
        except Exception as exc:  # noqa: BLE001 - retention removes it later
            logger.debug("could not abort the upload of %s: %s", self.key, exc)


class MultipartFS:
    """Wraps DCP's fsspec ``FileSystem``: files opened for writing are :class:`PartUploadStream`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        fs = self._inner.fs
        if "w" not in mode or not supports_multipart(fs):
            with self._inner.create_stream(path, mode) as stream:
                yield stream
            return
        stream = PartUploadStream(fs, str(path))
        try:
            yield stream
        except BaseException:
            stream.abort()
            raise
        stream.close()
        fs.invalidate_cache(str(path).rsplit("/", 1)[0])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def read_ranges(
    fs: Any,
    path: str,
    ranges: Sequence[tuple[int, int]],
    *,
    max_batch_bytes: int = 256 << 20,
) -> Iterator[tuple[int, bytes]]:
    """``(index, bytes)`` of each ``(offset, length)`` range of ``path``, fetched in parallel.

    At most ``max_batch_bytes`` (or one range, if larger) are held at a time. A range
    past the end of the object comes back short (the caller refuses it).
    """
    batch: list[int] = []
    held = 0
    for index, (_offset, length) in enumerate(ranges):
        if batch and held + length > max_batch_bytes:
            yield from _fetch(fs, path, ranges, batch)
            batch, held = [], 0
        batch.append(index)
        held += length
    if batch:
        yield from _fetch(fs, path, ranges, batch)


def _fetch(
    fs: Any, path: str, ranges: Sequence[tuple[int, int]], batch: list[int]
) -> Iterator[tuple[int, bytes]]:
    starts = [ranges[i][0] for i in batch]
    ends = [ranges[i][0] + ranges[i][1] for i in batch]
    kwargs: dict[str, Any] = {}
    if supports_multipart(fs):
        kwargs = {"batch_size": concurrency() * 2, "on_error": "return"}
    try:
        got = fs.cat_ranges([path] * len(batch), starts, ends, **kwargs)
    except (OSError, ValueError) as exc:
        got = [exc] * len(batch)
    for index, data in zip(batch, got):
        if isinstance(data, BaseException):
            data = b""  # e.g. a range starting past the end: refused as short by the caller
        yield index, data


def abandoned_uploads(folder: str) -> list[tuple[str, str]]:
    """``(key, upload id)`` of unfinished multipart uploads under the URI ``folder`` (S3 only).

    Empty for stores that have none or when the listing is not allowed.
    """
    from ckpt_core.storage import layout

    fs, inner = layout.filesystem(folder)
    if fs is None or not supports_multipart(fs):
        return []
    bucket, prefix, _ = fs.split_path(inner)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    try:
        out = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    except Exception as exc:  # noqa: BLE001 - not allowed or not supported: nothing to do
        logger.debug("cannot list multipart uploads under %s: %s", folder, exc)
        return []
    return [(u["Key"], u["UploadId"]) for u in out.get("Uploads", []) or []]


def abort_upload(folder: str, key: str, upload_id: str) -> None:
    """Abort one unfinished multipart upload of ``folder``'s bucket."""
    from ckpt_core.storage import layout

    fs, inner = layout.filesystem(folder)
    bucket = fs.split_path(inner)[0]
    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)


def read_items(reader: Any, plan: Any, planner: Any) -> None:
    """DCP ``read_data`` for an fsspec reader: each file's items as parallel ranged reads.

    ``reader`` is the safe reader of :mod:`ckpt_core.storage.safe_metadata`; every
    item still goes through its checked ``_read_item``. An item whose range runs
    past the end of its object is refused.
    """
    import io
    from types import SimpleNamespace

    from ckpt_core.errors import DamagedCheckpointError

    per_file: dict[str, list[Any]] = {}
    for req in plan.items:
        per_file.setdefault(reader.storage_data[req.storage_index].relative_path, []).append(req)
    fs = reader.fs.fs
    for relative_path, reqs in per_file.items():
        path = str(reader.fs.concat_path(reader.path, relative_path))
        reqs.sort(key=lambda r: reader.storage_data[r.storage_index].offset)
        items = [reader.storage_data[r.storage_index] for r in reqs]
        ranges = [(int(i.offset), int(i.length)) for i in items]
        for index, data in read_ranges(fs, path, ranges):
            item = items[index]
            if len(data) != item.length:
                raise DamagedCheckpointError(
                    f"{path}: entry {reqs[index].storage_index.fqn!r} spans bytes "
                    f"{item.offset}..{item.offset + item.length} but only {len(data)} of them "
                    "exist; the checkpoint is damaged or crafted: do not load it."
                )
            view = SimpleNamespace(offset=0, length=item.length)
            reader._read_item(io.BytesIO(data), reqs[index], view, planner)
