"""Writing a streamed conversion: byte ranges of safetensors files, DCP data files.

* pieces of safetensors files (bytes ``[start, end)`` at their offsets, so
  several processes fill one planned file at once) go through
  :class:`ckpt_core.storage.hf_writer._StagedFile` with ``start``;
* :func:`crc32_combine`: the CRC-32 of two concatenated pieces from theirs,
  so the manifest gets each file's checksum without reading it again.
* :func:`write_dcp_items`: one DCP data file, tensor by tensor, with the bytes
  ``torch.distributed.checkpoint`` writes (one ``torch.save`` archive per
  item), returning the storage records its ``.metadata`` needs.

Nothing here knows what the tensors mean (storage never imports content).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ckpt_core.storage import layout

_CRC_POLY = 0xEDB88320


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib's method)."""
    op = [_CRC_POLY] + [1 << n for n in range(31)]  # the operator appending one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # 2, 4, then 8 zero bits: one zero byte
    while len2 > 0:  # append len2 zero bytes to A's CRC, by the bits of len2
        if len2 & 1:
            crc1 = _gf2_times(op, crc1)
        len2 >>= 1
        if len2:
            op = _gf2_square(op)
    return crc1 ^ crc2


def write_dcp_items(
    fs: Any,
    path: str,
    relative: str,
    items: Iterable[tuple[Any, Callable[[], torch.Tensor]]],
    on_item: Callable[[int], None] | None = None,
) -> list[Any]:
    """Write one DCP data file: each item's tensor as its own ``torch.save`` archive.

    ``fs`` is the file system of a DCP writer (``storage_writer(folder).fs``);
    ``items`` yields ``(MetadataIndex, make_tensor)``, the tensor made only when
    its turn comes and dropped after it is written. Returns DCP ``WriteResult`` s.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    results = []
    with fs.create_stream(path, "wb") as stream:
        for index, make in items:
            tensor = make().detach().cpu()
            if tensor.untyped_storage().nbytes() != tensor.nbytes:
                tensor = tensor.clone()  # torch.save writes whole storages: only this tensor's
            offset = stream.tell()
            torch.save(tensor, stream)
            length = stream.tell() - offset
            del tensor
            results.append(
                WriteResult(
                    index=index,
                    size_in_bytes=length,
                    storage_data=_StorageInfo(relative, offset, length),
                )
            )
            if on_item is not None:
                on_item(length)
        if not layout.is_uri(path):
            os.fsync(stream.fileno())  # a DirectStream writes its padded tail here
    return results
