"""Checks on an unpickled ``.metadata`` before DCP acts on any of it.

The restricted unpickler (:mod:`ckpt_core.storage.safe_metadata`) makes sure
``.metadata`` holds only DCP's own classes; it cannot tell whether their
*values* are sane. :func:`check_metadata` looks at them once, right after
unpickling and against the folder they describe:

* every entry is a tensor (``TensorStorageMetadata`` with a dtype, a size of
  non-negative ints and chunks inside it) or a bytes entry;
* every storage record names a file inside the folder
  (:func:`ckpt_core.storage.paths.resolve_inside`: no absolute path, no ``..``,
  no symlink out, a regular file) and an ``offset``/``length`` inside that
  file's real size;
* a tensor chunk's declared bytes fit in its record, so nothing is allocated
  for data the file does not hold;
* no record asks for a stream transform (compression): ckpt never writes one,
  and a decompressor would let a small file expand without bound.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ckpt_core.errors import DamagedCheckpointError
from ckpt_core.storage import layout
from ckpt_core.storage.paths import MAX_OFFSET, file_size, resolve_inside


def _refuse(source: str, what: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"{source}: {what}; the checkpoint is damaged or was crafted: do not load it."
    )


def _dims(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple of non-negative ints (a shape or an offset), else None."""
    if not isinstance(value, (tuple, list, torch.Size)):
        return None
    dims = tuple(value)
    if all(type(d) is int and 0 <= d <= MAX_OFFSET for d in dims):
        return dims
    return None


def _check_tensor(
    fqn: str, entry: TensorStorageMetadata, source: str, chunk_bytes: dict[tuple, int]
) -> None:
    props = entry.properties
    if not isinstance(props, TensorProperties) or not isinstance(props.dtype, torch.dtype):
        raise _refuse(source, f"entry {fqn!r} has no valid dtype")
    size = _dims(entry.size)
    if size is None:
        raise _refuse(source, f"entry {fqn!r} declares size {entry.size!r}")
    if not isinstance(entry.chunks, list):
        raise _refuse(source, f"entry {fqn!r} declares chunks {type(entry.chunks).__name__}")
    for chunk in entry.chunks:
        if not isinstance(chunk, ChunkStorageMetadata):
            raise _refuse(source, f"entry {fqn!r} has a chunk of type {type(chunk).__name__}")
        offsets, sizes = _dims(chunk.offsets), _dims(chunk.sizes)
        if (
            offsets is None
            or sizes is None
            or not len(offsets) == len(sizes) == len(size)
            or any(o + n > d for o, n, d in zip(offsets, sizes, size))
        ):
            raise _refuse(
                source,
                f"entry {fqn!r} (size {list(size)}) has a chunk at {chunk.offsets!r} of "
                f"{chunk.sizes!r}, outside the tensor",
            )
        chunk_bytes[(fqn, offsets)] = math.prod(sizes) * props.dtype.itemsize


def _check_entries(metadata: Metadata, source: str, chunk_bytes: dict[tuple, int]) -> None:
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        raise _refuse(source, f"state_dict_metadata is a {type(entries).__name__}")
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise _refuse(source, f"an entry is keyed by {fqn!r}, not a string")
        if isinstance(entry, TensorStorageMetadata):
            _check_tensor(fqn, entry, source, chunk_bytes)
        elif not isinstance(entry, BytesStorageMetadata):
            raise _refuse(source, f"entry {fqn!r} is a {type(entry).__name__}")
    meta = getattr(metadata, "storage_meta", None)
    if meta is not None and not isinstance(meta, StorageMeta):
        raise _refuse(source, f"storage_meta is a {type(meta).__name__}")


def _check_record(
    folder: str,
    index: Any,
    info: Any,
    sizes: dict[str, tuple[str, int]],
    source: str,
) -> None:
    if (
        not isinstance(index, MetadataIndex)
        or not isinstance(index.fqn, str)
        or (index.offset is not None and _dims(index.offset) is None)
    ):
        raise _refuse(source, f"storage_data is keyed by {index!r}")
    what = f"{source} entry {index.fqn!r}"
    if not isinstance(info, _StorageInfo):
        raise _refuse(source, f"entry {index.fqn!r} has storage of type {type(info).__name__}")
    if info.transform_descriptors:
        raise _refuse(
            source,
            f"entry {index.fqn!r} asks for stream transforms {info.transform_descriptors!r} "
            "(ckpt writes none and reads none)",
        )
    name = info.relative_path
    if name not in sizes:
        path = resolve_inside(folder, name, what=what)
        sizes[name] = (path, file_size(path, what=what))
    path, real = sizes[name]
    for field in ("offset", "length"):
        value = getattr(info, field)
        if type(value) is not int or not 0 <= value <= MAX_OFFSET:
            raise _refuse(source, f"entry {index.fqn!r} declares {field} {value!r}")
    if info.offset + info.length > real:
        raise _refuse(
            source,
            f"entry {index.fqn!r} declares bytes {info.offset}..{info.offset + info.length} of "
            f"{name}, which holds only {real} bytes",
        )


def check_metadata(metadata: Metadata, folder: str, *, source: str | None = None) -> Metadata:
    """``metadata`` after checking its entries and storage records against ``folder``.

    Raises :class:`DamagedCheckpointError` (one line naming the entry) on the first value
    that a DCP save of ckpt or torch would not have written; opens no data file.
    """
    source = source or layout.join(folder, ".metadata")
    chunk_bytes: dict[tuple, int] = {}
    _check_entries(metadata, source, chunk_bytes)
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise _refuse(source, f"storage_data is a {type(storage).__name__}")
    sizes: dict[str, tuple[str, int]] = {}
    for index, info in storage.items():
        _check_record(folder, index, info, sizes, source)
        if index.offset is not None:
            need = chunk_bytes.get((index.fqn, tuple(index.offset)))
            if need is not None and need > info.length:
                raise _refuse(
                    source,
                    f"entry {index.fqn!r} declares a chunk of {need} bytes at "
                    f"{list(index.offset)} stored in only {info.length} bytes",
                )
    return metadata
