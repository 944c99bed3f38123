"""Writing Hugging Face safetensors folders tensor by tensor through one reused buffer.

Every rank calls :func:`write_hf_folder` with the same groups in the same
order. Tensor by tensor, a DTensor is gathered with ``full_tensor()`` (a
collective) and the writing rank casts it into a reused write buffer and
streams the bytes to the file (O_DIRECT where the file system allows, with
the cast of one half of the buffer overlapping the write of the other); so
peak extra memory is one gathered tensor plus the buffer, never a second copy
of the model. Headers are planned from
shapes and dtypes before any data, which lets each file be written in one
pass. Integer and float8 tensors are written as they are (DCP's consolidation
in torch 2.13 calls ``torch.finfo`` on them and fails; nothing here does).

Files: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` listing exactly the keys written, each with
``{"format": "pt"}`` metadata; ``config.json``; and for adapters with a
``subfolder``, ``<subfolder>/<file_name()>`` and their ``extra_files()``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_core.dtensor_utils import full_tensor, with_local
from ckpt_core.errors import ConfigError, ExportContentError
from ckpt_core.export_spec import HFGroup, cast_dtype
from ckpt_core.rank_zero import distributed_on
from ckpt_core.storage import layout
from ckpt_core.storage.manifest import crc32_hex

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DEFAULT_BUFFER_BYTES = 64 * 1024**2

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@dataclass
class _Entry:
    name: str
    tensor: Any
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def _plan(tensors: dict[str, Any], target: torch.dtype | None) -> list[_Entry]:
    """Entries to write, one per name.

    Names whose tensors share memory (a model tied by hand: ``output.weight`` is
    ``tok_embeddings.weight``) are each written: ``safetensors.save_file`` refuses
    shared memory, but this writer copies bytes, and dropping a name would leave a
    loader (transformers with an untied ``config.json``) to initialize it randomly.
    Tied embeddings proper never reach here twice: the model adapter emits no
    ``lm_head.weight`` for a tied model.
    """
    entries = []
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ExportContentError(
                f"{name!r} is a {type(value).__name__}; safetensors holds tensors. Drop it from "
                "the export view (a converter's state_dict_transform) or export as 'dcp'."
            )
        if (
            value.dtype not in SAFETENSORS_DTYPES
            and cast_dtype(value.dtype, target) not in SAFETENSORS_DTYPES
        ):
            raise ExportContentError(
                f"{name!r}: dtype {value.dtype} cannot be stored in safetensors. Cast it in a "
                "converter's state_dict_transform or export as 'dcp'."
            )
        entries.append(_Entry(name, value, cast_dtype(value.dtype, target), tuple(value.shape)))
    return entries


def _split(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    files: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if files[-1] and size + e.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(e)
        size += e.nbytes
    return files


def _header(entries: list[_Entry]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": SAFETENSORS_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


ALIGN = 4096


class _Staging:
    """One reused, page-aligned byte buffer: tensors are cast into it, then written."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(2 * ALIGN, nbytes - nbytes % ALIGN)
        self._raw: torch.Tensor | None = None
        self._data: torch.Tensor | None = None

    @property
    def data(self) -> torch.Tensor:
        if self._data is None:
            self._raw = torch.empty(self.nbytes + ALIGN, dtype=torch.uint8)
            skip = -self._raw.data_ptr() % ALIGN
            self._data = self._raw[skip : skip + self.nbytes]
        return self._data


def _open_direct(path: str, *, truncate: bool = True) -> tuple[int | None, Any, bool]:
    """``(fd, file, direct)``: an O_DIRECT descriptor when the file system allows it."""
    fs, inner = layout.filesystem(path)
    if fs is not None:
        return None, fs.open(inner, "wb"), False
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    if hasattr(os, "O_DIRECT") and os.environ.get("CKPT_HF_DIRECT_IO", "1") != "0":
        try:
            return os.open(inner, flags | os.O_DIRECT, 0o644), None, True
        except OSError:
            pass  # tmpfs and some network file systems refuse O_DIRECT
    return os.open(inner, flags, 0o644), None, False


class _StagedFile:
    """A file written sequentially through the staging buffer, with a running CRC-32.

    The buffer is used as two halves: while a helper thread writes one half (and
    extends the CRC), the caller casts the next tensor chunk into the other, so
    the cast and the write overlap. Local files use O_DIRECT where possible (full
    aligned halves; the tail is padded to the page size and the file truncated
    back), which skips the page cache: faster durable writes, no cache pressure.

    ``piece=True`` writes bytes of a file from offset ``start`` (a multiple of
    the page size) without truncating it, so several processes can fill one
    file (``ckpt convert --workers``); ``close(file_size)`` cuts the file's
    padded tail, done by the piece that ends it. The CRC covers the piece.
    """

    def __init__(
        self,
        path: str,
        staging: _Staging,
        pool: ThreadPoolExecutor,
        *,
        start: int = 0,
        piece: bool = False,
    ) -> None:
        if start % ALIGN:
            raise ValueError(f"a piece of a file starts on a page boundary, not at {start}")
        if start and layout.is_uri(path):
            raise ConfigError(
                f"{path}: an object in an object store is written whole by one writer, from its "
                f"start (not from byte {start}); write it with one worker (--workers 1)."
            )
        self.fd, self.file, self.direct = _open_direct(path, truncate=not piece)
        self.piece = piece
        self.pool = pool
        half = staging.nbytes // 2
        half -= half % ALIGN
        self.halves = [staging.data[:half], staging.data[half : 2 * half]]
        self.pending: list[Future | None] = [None, None]
        self.cur = 0
        self.buf = self.halves[0]
        self.pos = 0  # bytes pending in the current half
        self.crc = 0
        self.start = start
        self.size = 0  # bytes of the piece so far (flushed + pending)
        self._at = start  # file offset of the next write (on the helper thread)

    def _write_out(self, buf: torch.Tensor, length: int, valid: int) -> None:
        """On the helper thread: write ``buf[:length]``, CRC over ``buf[:valid]``."""
        view = memoryview(buf[:length].numpy())
        if self.file is not None:
            self.file.write(view)
        else:
            done = 0
            while done < length:
                done += os.pwrite(self.fd, view[done:length], self._at + done)
        self._at += valid
        self.crc = zlib.crc32(view[:valid], self.crc)

    def _flush(self, final: bool = False) -> None:
        if self.pos:
            length = self.pos
            if final and self.direct:
                length += -length % ALIGN
            job = self.pool.submit(self._write_out, self.buf, length, self.pos)
            self.pending[self.cur] = job
            self.cur = 1 - self.cur
            self.buf, self.pos = self.halves[self.cur], 0
        waiting = self.pending if final else [self.pending[self.cur]]
        for job in waiting:
            if job is not None:
                job.result()  # the half is free again (raises the write's error)
        if final:
            self.pending = [None, None]
        else:
            self.pending[self.cur] = None

    def write_bytes(self, data: bytes | torch.Tensor) -> None:
        if not len(data):
            return
        view = (
            data
            if isinstance(data, torch.Tensor)
            else torch.frombuffer(bytearray(data), dtype=torch.uint8)
        )
        start = 0
        while start < view.numel():
            n = min(view.numel() - start, self.buf.numel() - self.pos)
            self.buf[self.pos : self.pos + n].copy_(view[start : start + n])
            self.pos, start, self.size = self.pos + n, start + n, self.size + n
            if self.pos == self.buf.numel():
                self._flush()

    def write_tensor(
        self, tensor: torch.Tensor, dtype: torch.dtype, lo: int = 0, hi: int | None = None
    ) -> None:
        """Cast ``tensor`` to ``dtype`` into the buffer, chunk by chunk, and write it.

        ``lo``/``hi``: only bytes ``[lo, hi)`` of the cast tensor (a piece's share).
        """
        flat = tensor.detach().reshape(-1)
        item = dtype.itemsize
        at, hi = lo, flat.numel() * item if hi is None else hi
        while at < hi:
            if at % item or (self.start + self.size) % item or hi - at < item:
                # Cut mid-element, or after an odd-sized tensor: through bytes, 1 MiB at a time.
                first = at // item
                last = min(-(-hi // item), first + max(1, (1 << 20) // item))
                raw = flat[first:last].to(device="cpu", dtype=dtype).contiguous()
                raw = raw.view(torch.uint8)[at - first * item : hi - first * item]
                self.write_bytes(raw)
                at += raw.numel()
                continue
            room = (self.buf.numel() - self.pos) // item
            if room == 0:
                self._flush()
                continue
            first = at // item
            chunk = flat[first : first + min(room, (hi - at) // item)]
            out = self.buf[self.pos : self.pos + chunk.numel() * item].view(dtype)
            out.copy_(chunk)
            self.pos += chunk.numel() * item
            self.size += chunk.numel() * item
            at += chunk.numel() * item
            if self.pos == self.buf.numel():
                self._flush()

    def close(self, file_size: int | None = None) -> tuple[int, str]:
        """Flush and close; returns ``(bytes of the piece, crc32)``.

        A whole file is cut to its size; a piece only when it ends the file and
        says so with ``file_size``.
        """
        try:
            self._flush(final=True)
        finally:
            self.abort(truncate=file_size if self.piece else self.size)
        return self.size, crc32_hex(self.crc)

    def abort(self, truncate: int | None = None) -> None:
        """Close (after a failure: without flushing)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        elif self.fd is not None and self.fd >= 0:
            try:
                if truncate is not None:
                    os.ftruncate(self.fd, truncate)
            finally:
                os.close(self.fd)
                self.fd = -1


def _gather(value: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor) and value.dtype.is_floating_point and value.dtype.itemsize == 1:
        # gloo cannot all-gather float8 ("Invalid scalar type"): gather the same bytes as uint8.
        as_bytes = with_local(value, value.to_local().view(torch.uint8))
        return as_bytes.full_tensor().view(value.dtype)
    return full_tensor(value)


def _write_file(
    path: str,
    entries: list[_Entry],
    staging: _Staging,
    pool: ThreadPoolExecutor | None,
    progress: Callable[[int], None] | None,
) -> tuple[int, str] | None:
    """Write one safetensors file (on the writing rank; others only gather).

    A write that fails stops the writing, not the gathering: with several ranks, the
    writing rank still takes part in every gather of the file (so no other rank waits
    for it), then raises; alone, it raises at once.
    """
    out = _StagedFile(path, staging, pool) if pool is not None else None
    failure: OSError | None = None
    alone = not distributed_on()
    try:
        if out is not None:
            out.write_bytes(_header(entries))
    except OSError as exc:
        failure = exc
    for e in entries:
        if failure is not None and alone:
            break
        full = _gather(e.tensor)
        if out is not None and failure is None:
            try:
                out.write_tensor(full, e.dtype)
            except OSError as exc:
                failure = exc
        del full
        if progress is not None and failure is None:
            progress(e.nbytes)
    if failure is not None:
        out.abort()
        raise failure
    return out.close() if out is not None else None


def _write_json(path: str, obj: Any) -> tuple[int, str]:
    return _write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")


def _write_bytes(path: str, data: bytes) -> tuple[int, str]:
    with layout.open_file(path, "wb") as f:
        f.write(data)
    return len(data), crc32_hex(zlib.crc32(data))


def total_bytes(groups: Iterable[HFGroup], target: torch.dtype | None) -> int:
    """Bytes of tensor data an export of ``groups`` writes."""
    return sum(e.nbytes for g in groups for e in _plan(g.tensors, target))


def _write_group_extras(
    folder: str, group: HFGroup, entries: list, names: list[str], files: list, sub: str
) -> dict[str, tuple[int, str]]:
    """A group's index (several model files) or its subfolder's extra files."""
    written = {}
    if group.subfolder is None and len(files) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.name: n for n, part in zip(names, files) for e in part},
        }
        written[INDEX_NAME] = _write_json(layout.join(folder, INDEX_NAME), index)
    if group.subfolder is not None:
        for extra, content in group.adapter.extra_files().items():
            data = content.encode() if isinstance(content, str) else bytes(content)
            written[sub + extra] = _write_bytes(layout.join(folder, sub + extra), data)
    return written


def write_hf_folder(
    folder: str,
    groups: list[HFGroup],
    *,
    dtype: torch.dtype | None,
    config: dict[str, Any] | None,
    is_writer: bool,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    progress: Callable[[int], None] | None = None,
) -> dict[str, tuple[int, str]]:
    """Write the groups as an HF folder into existing ``folder`` (collective).

    Returns ``relative path → (size, crc32)`` of the files written (on the
    writing rank; other ranks return ``{}``).
    """
    written: dict[str, tuple[int, str]] = {}
    staging = _Staging(buffer_bytes)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-crc") if is_writer else None
    # With several ranks, the writer's first failure; it then only gathers, raises at the end.
    failure: OSError | None = None
    alone = not distributed_on()
    try:
        for group in groups:
            entries = _plan(group.tensors, dtype)
            if group.subfolder is None:
                files = _split(entries, max_shard_bytes)
                names = (
                    ["model.safetensors"]
                    if len(files) == 1
                    else [
                        f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                        for i in range(len(files))
                    ]
                )
                sub = ""
            else:
                files, names = [entries], [group.adapter.file_name()]
                sub = group.subfolder.strip("/") + "/"
                if is_writer and failure is None:
                    try:
                        layout.makedirs(layout.join(folder, group.subfolder))
                    except OSError as exc:
                        if alone:
                            raise
                        failure = exc
            for name, part in zip(names, files):
                writer = pool if failure is None else None
                try:
                    result = _write_file(
                        layout.join(folder, sub + name), part, staging, writer, progress
                    )
                except OSError as exc:
                    if alone:
                        raise
                    failure, result = exc, None
                if result is not None:
                    written[sub + name] = result
            if not is_writer or failure is not None:
                continue
            try:
                written.update(_write_group_extras(folder, group, entries, names, files, sub))
            except OSError as exc:
                if alone:
                    raise
                failure = exc
        if failure is not None:
            raise failure
        if is_writer and config is not None:
            written["config.json"] = _write_json(layout.join(folder, "config.json"), config)
    finally:
        if pool is not None:
            pool.shutdown()
    return written
