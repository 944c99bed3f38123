"""A faster DCP reader for local folders: file bytes straight into the live tensors.

torch's ``FileSystemReader`` loads each tensor item with ``torch.load`` (a new
tensor in freshly allocated memory, slow to touch here), then copies it into
the destination. The on-disk item is a small ``torch.save`` archive whose
storage record is stored uncompressed, so when the saved tensor is contiguous,
has the destination's dtype, and the requested region is one contiguous byte
range, this reader finds the record with torch's own archive reader
(``get_record_offset``), reads the tensor's layout from ``data.pkl`` with an
unpickler that resolves nothing but the rebuild call and storage types, and
``preadv``\\s the bytes directly into the destination tensor's memory. Every
other item (objects, dtype casts, strided items) goes through the checked
item reader of :mod:`ckpt_core.storage.safe_metadata` (torch's own steps, with
``weights_only=True``). ``CKPT_FAST_READ=0`` turns the fast path off.

What it reads was checked first: the metadata's paths, offsets and lengths
(:func:`ckpt_core.storage.metadata_checks.check_metadata`), each data file
again when opened (:func:`ckpt_core.storage.paths.open_regular`: no symlink,
a regular file), each item's archive (:func:`~ckpt_core.storage.safe_metadata.check_archive`),
and the bytes copied into a tensor lie inside their item.
"""

from __future__ import annotations

import collections
import ctypes
import io
import os
import pickle
import sys
from typing import Any

import torch
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from ckpt_core.errors import DamagedCheckpointError
from ckpt_core.storage.paths import open_regular
from ckpt_core.storage.safe_metadata import SafeFileSystemReader, _ItemView, check_archive


def enabled() -> bool:
    """Whether the fast path is allowed (``CKPT_FAST_READ`` not set to ``0``)."""
    return os.environ.get("CKPT_FAST_READ", "1") != "0"


class _Unsupported(Exception):
    pass


def _rebuild(storage, storage_offset, size, stride, *_args) -> tuple:
    return (storage, int(storage_offset), tuple(size), tuple(stride))


def _storage_dtypes() -> dict[str, torch.dtype]:
    from torch.storage import _dtype_to_storage_type_map

    return {name: dtype for dtype, name in _dtype_to_storage_type_map().items()}


_STORAGE_DTYPES = _storage_dtypes()


class _StorageType:
    """Stands for a legacy storage class in ``data.pkl``: only its dtype matters."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _LayoutUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` of a one-tensor archive as (storage id, offset, size, stride)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid  # ('storage', storage type, key, location, numel)


def _layout(view: Any) -> tuple[torch.dtype, int, tuple, tuple, int] | None:
    """(dtype, element offset, size, stride, byte offset of data in the item) or None."""
    try:
        archive = torch._C.PyTorchFileReader(view)
        if bytes(archive.get_record("byteorder")).decode() != sys.byteorder:
            return None
        storage, offset, size, stride = _LayoutUnpickler(
            io.BytesIO(bytes(archive.get_record("data.pkl")))
        ).load()
        _tag, storage_type, key, _location, _numel = storage
        return storage_type.dtype, offset, size, stride, archive.get_record_offset(f"data/{key}")
    except Exception:  # noqa: BLE001 - anything unexpected: torch's own path
        return None


def _contiguous_strides(size: tuple) -> tuple:
    strides, acc = [], 1
    for d in reversed(size):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def _region_start(size: tuple, offsets: Any, lengths: Any) -> int | None:
    """Element offset of a narrowed region if it is one contiguous range, else None."""
    dims = len(size)
    k = 0
    while k < dims and lengths[k] == 1:
        k += 1
    for j in range(k + 1, dims):
        if offsets[j] != 0 or lengths[j] != size[j]:
            return None
    strides = _contiguous_strides(size)
    return sum(int(o) * s for o, s in zip(offsets, strides))


def _read_into(fd: int, target: torch.Tensor, offset: int) -> None:
    nbytes = target.numel() * target.element_size()
    if nbytes == 0:
        return
    buf = (ctypes.c_char * nbytes).from_address(target.data_ptr())
    view = memoryview(buf).cast("B")
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise DamagedCheckpointError(
                f"unexpected end of file reading {nbytes} bytes at {offset}; the checkpoint "
                "was truncated while being read."
            )
        done += n


class FastFileSystemReader(SafeFileSystemReader):
    """Safe DCP reader that reads contiguous tensors straight into their destinations."""

    def read_data(self, plan: Any, planner: Any) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for relative_path, reqs in per_file.items():
            path = self.fs.concat_path(self.path, relative_path)
            with open_regular(str(path), what=f"{self.checkpoint or self.path}") as stream:
                fd = stream.fileno()
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    item = self.storage_data[req.storage_index]
                    if not (enabled() and self._fast(fd, stream, req, item, planner)):
                        self._torch_path(stream, req, item, planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _fast(self, fd: int, stream: Any, req: Any, item: Any, planner: Any) -> bool:
        if req.type == LoadItemType.BYTE_IO or item.transform_descriptors:
            return False
        view = _ItemView(stream, item.offset, item.length)
        check_archive(
            view,
            item.length,
            what=f"{self.checkpoint or self.path} entry {req.storage_index.fqn!r}",
        )
        layout = _layout(view)
        if layout is None:
            return False
        dtype, storage_offset, size, stride, data_offset = layout
        if stride != _contiguous_strides(size) and any(d > 1 for d in size):
            return False
        start = _region_start(size, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if (
            start is None
            or target.dtype != dtype
            or target.device.type != "cpu"
            or not target.is_contiguous()
            or tuple(target.shape) != tuple(int(n) for n in req.lengths)
        ):
            return False
        byte_start = (storage_offset + start) * target.element_size()
        if data_offset + byte_start + target.numel() * target.element_size() > item.length:
            return False  # the layout claims bytes beyond the item: torch's checks report it
        _read_into(fd, target, item.offset + data_offset + byte_start)
        planner.commit_tensor(req, target)
        return True

    def _torch_path(self, stream: Any, req: Any, item: Any, planner: Any) -> None:
        """An item the fast path does not take: the shared checked item reader."""
        self._read_item(stream, req, item, planner)
