"""Safetensors files on an object store (``s3://`` ...), read by ranged requests.

:func:`open_remote` gives the handle :mod:`ckpt_core.storage.hf_reader` reads
through (``keys``, ``get_slice(name)`` with ``get_shape`` / ``get_dtype`` /
``[slices]``, ``get_tensor``), as ``safetensors.safe_open`` does locally, and
checks the header by the same rules before any tensor byte is fetched:

* the 8-byte header length is at most :data:`MAX_HEADER_BYTES` and lies inside
  the object's real size, so the header read is bounded by both;
* the header is a JSON object; every tensor has a known dtype, a shape of
  non-negative integers and ``data_offsets`` inside the data section, whose
  length is ``numel × item size``; the tensors cover the data section exactly.

A refusal is the same one line as for a local file
(:func:`ckpt_core.storage.hf_reader.unreadable`). A tensor read fetches only the
rows of its first dimension that the caller's slice needs, in parallel ranged
GETs of at most :data:`CHUNK_BYTES` (:func:`ckpt_core.storage.object_io.read_ranges`);
a file is never fetched whole.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from ckpt_core.errors import CheckpointError, DamagedCheckpointError
from ckpt_core.storage import layout

#: Largest header read, as the safetensors library allows.
MAX_HEADER_BYTES = 100_000_000
#: Bytes per ranged GET of a tensor's data.
CHUNK_BYTES = 16 << 20

#: A header entry: dtype, shape, begin and end in the data section.
_Entry = tuple[torch.dtype, list[int], int, int]
_BAD_HEADER = "Error while deserializing header: "
_BAD_ENTRY = _BAD_HEADER + "invalid shape, data type, or offset for tensor"


def _dtypes() -> dict[str, torch.dtype]:
    from ckpt_core.storage.hf_writer import SAFETENSORS_DTYPES

    return {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class RemoteSafetensors:
    """One safetensors object, its header checked; tensors fetched on demand."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.inner = layout.filesystem(uri)
        self.size = int(self.fs.size(self.inner))
        self.entries, self.data_start = self._read_header()

    def _refuse(self, reason: str) -> DamagedCheckpointError:
        from ckpt_core.storage.hf_reader import unreadable

        return unreadable(self.uri, reason)

    def _fetch(self, start: int, end: int) -> bytes:
        data = self.fs.cat_file(self.inner, start=start, end=end)
        if len(data) != end - start:  # changed or cut short since its size was read
            raise self._refuse(f"{_BAD_HEADER}object shorter than its header says")
        return data

    def _read_header(self) -> tuple[dict[str, _Entry], int]:
        if self.size < 8:
            raise self._refuse(_BAD_HEADER + "header too small")
        length = int.from_bytes(self._fetch(0, 8), "little")
        if length > MAX_HEADER_BYTES:
            raise self._refuse(_BAD_HEADER + "header too large")
        if 8 + length > self.size:
            raise self._refuse(_BAD_HEADER + "invalid header length")
        try:
            header = json.loads(self._fetch(8, 8 + length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise self._refuse(f"{_BAD_HEADER}invalid JSON in header: {reason}") from None
        if not isinstance(header, dict):
            raise self._refuse(_BAD_HEADER + "invalid JSON in header: not an object")
        header.pop("__metadata__", None)
        data_size = self.size - 8 - length
        dtypes = _dtypes()
        entries = {}
        for name, info in header.items():
            entries[name] = self._entry(info, dtypes)
        covered = 0
        for _dtype, _shape, begin, end in sorted(entries.values(), key=lambda e: (e[2], e[3])):
            if begin != covered:
                raise self._refuse(_BAD_ENTRY)
            covered = end
        if covered != data_size:
            raise self._refuse(_BAD_HEADER + "incomplete metadata, file not fully covered")
        return entries, 8 + length

    def _entry(self, info: Any, dtypes: dict[str, torch.dtype]) -> _Entry:
        """``(dtype, shape, begin, end)`` of one header entry, checked against the data."""
        if not isinstance(info, dict):
            raise self._refuse(_BAD_ENTRY)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        ints = (
            isinstance(shape, list)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(v) is int and v >= 0 for v in (*shape, *offsets))
        )
        if dtype not in dtypes or not ints:
            raise self._refuse(_BAD_ENTRY)
        begin, end = offsets
        nbytes = math.prod(shape) * dtypes[dtype].itemsize
        if end - begin != nbytes:  # inside the data: the covering check in _read_header
            raise self._refuse(_BAD_ENTRY)
        return dtypes[dtype], shape, begin, end

    # -- the safe_open handle -----------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names, in header order."""
        return list(self.entries)

    def get_slice(self, name: str) -> RemoteSlice:
        """Shape, dtype and sliced reads of tensor ``name``."""
        if name not in self.entries:
            raise CheckpointError(f"{self.uri} holds no tensor {name!r}.")
        return RemoteSlice(self, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` whole."""
        return self.get_slice(name)[()]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (the tensor itself when 0-d)."""
        from ckpt_core.storage import object_io

        dtype, shape, begin, _end = self.entries[name]
        row = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
        first, last = self.data_start + begin + start * row, self.data_start + begin + stop * row
        buf = bytearray(last - first)
        ranges = [(o, min(CHUNK_BYTES, last - o)) for o in range(first, last, CHUNK_BYTES)]
        for index, data in object_io.read_ranges(self.fs, self.inner, ranges):
            offset, length = ranges[index]
            if len(data) != length:
                raise self._refuse(f"{_BAD_HEADER}object shorter than its header says")
            buf[offset - first : offset - first + length] = data
        out_shape = [stop - start, *shape[1:]] if shape else []
        if not buf:
            return torch.empty(out_shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(out_shape)


class RemoteSlice:
    """``safe_open(...).get_slice(name)`` for a :class:`RemoteSafetensors` tensor."""

    def __init__(self, handle: RemoteSafetensors, name: str) -> None:
        self.handle, self.name = handle, name
        self.dtype, self.shape, _, _ = handle.entries[name]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        from ckpt_core.storage.hf_writer import SAFETENSORS_DTYPES

        return SAFETENSORS_DTYPES[self.dtype]

    def __getitem__(self, index: Any) -> torch.Tensor:
        """The region ``index`` (slices, one per leading dimension); only its rows are fetched."""
        index = index if isinstance(index, tuple) else (index,)
        if not self.shape:
            return self.handle.read_rows(self.name, 0, 1)
        first = index[0] if index else slice(None)
        if not isinstance(first, slice) or first.step not in (None, 1):
            raise CheckpointError(f"{self.handle.uri}: unsupported slice {index!r} of {self.name}.")
        start, stop, _ = first.indices(self.shape[0])
        rows = self.handle.read_rows(self.name, start, max(start, stop))
        if all(s == slice(None) for s in index[1:]):
            return rows
        return rows[(slice(None), *index[1:])].clone()


def open_remote(uri: str) -> RemoteSafetensors:
    """The checked handle of the safetensors object ``uri``."""
    return RemoteSafetensors(uri)


def index_remote(folder: str) -> dict[str, str]:
    """HF tensor name → object URI for the ``*.safetensors`` directly in the URI ``folder``.

    The index's file names pass :func:`ckpt_core.storage.paths.check_name` and must
    name objects of the folder; without an index every ``*.safetensors`` header is read.
    """
    from ckpt_core.storage import paths
    from ckpt_core.storage.hf_reader import INDEX_NAME, read_json_object, weight_map_files

    fs, inner = layout.filesystem(folder)
    if not fs.isdir(inner):
        raise CheckpointError(f"{folder} is not a folder; expected Hugging Face safetensors.")
    index_file = layout.join(folder, INDEX_NAME)

    def resolve(name: object, what: str) -> str:
        uri = layout.join(folder, paths.check_name(name, what=what))
        if not fs.isfile(layout.filesystem(uri)[1]):
            raise DamagedCheckpointError(
                f"{what} names {name!r}, which is not an object of {folder}; the index is "
                "damaged or belongs to other files."
            )
        return uri

    if fs.exists(layout.filesystem(index_file)[1]):
        return weight_map_files(read_json_object(folder, INDEX_NAME), index_file, resolve)
    out: dict[str, str] = {}
    for entry in sorted(fs.ls(inner, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".safetensors"):
            uri = layout.join(folder, name)
            for key in open_remote(uri).keys():
                out[key] = uri
    if not out:
        raise CheckpointError(f"{folder} holds no *.safetensors files.")
    return out


def object_bytes(uri: str) -> int:
    """The size of object ``uri``."""
    fs, inner = layout.filesystem(uri)
    return int(fs.size(inner))
