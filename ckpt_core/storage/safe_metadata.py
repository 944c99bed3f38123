"""Reading DCP's ``.metadata`` without trusting it.

``.metadata`` is a pickle, and torch's ``FileSystemReader`` unpickles it with
plain :func:`pickle.load`: a tampered checkpoint can run any code on every rank
that loads it. :class:`RestrictedUnpickler` admits only the classes DCP writes
into that file (its metadata dataclasses, ``torch.Size``, dtypes, layouts,
paths and plain containers) and refuses everything else *before* calling it,
so a code payload is reported instead of run.

The readers below use it for ``.metadata``; :class:`SafeLoadPlanner` also
loads DCP's non-tensor entries (``BytesIO`` items such as a scheduler's state)
with ``torch.load(weights_only=True)`` instead of DCP's ``weights_only=False``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ckpt_core.errors import CheckpointError

METADATA_NAME = ".metadata"

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "list", "dict", "tuple"},
}


class UnsafeMetadataError(CheckpointError):
    """``.metadata`` references a global that DCP metadata never contains."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only DCP metadata types (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeMetadataError(
            f"Refusing to load DCP metadata: it references {module}.{name}, which is not a "
            "DCP metadata type. The checkpoint may have been tampered with; do not load it "
            "with torch's own reader either."
        )


def loads_metadata(data: bytes, source: str = METADATA_NAME) -> Metadata:
    """Unpickle ``.metadata`` bytes with :class:`RestrictedUnpickler`."""
    try:
        metadata = RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafeMetadataError as exc:
        raise UnsafeMetadataError(f"{source}: {exc}") from None
    except Exception as exc:  # truncated / not a pickle
        raise CheckpointError(f"{source} is not readable DCP metadata: {exc}") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            f"{source} holds a {type(metadata).__name__}, not DCP Metadata; it is damaged."
        )
    return metadata


def read_metadata(checkpoint: str) -> Metadata:
    """The DCP ``Metadata`` of a checkpoint folder (local path or fsspec URI), safely."""
    from ckpt_core.storage import layout

    path = layout.join(checkpoint, METADATA_NAME)
    fs, inner = layout.filesystem(path)
    try:
        if fs is None:
            with open(inner, "rb") as f:
                data = f.read()
        else:
            with fs.open(inner, "rb") as f:
                data = f.read()
    except (FileNotFoundError, OSError) as exc:
        raise CheckpointError(
            f"{checkpoint} has no readable {METADATA_NAME}; it is not a DCP checkpoint "
            f"(or it was not committed): {exc}"
        ) from exc
    return loads_metadata(data, path)


class _SafeMetadataMixin:
    """``read_metadata`` through the restricted unpickler (for any DCP reader)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)  # type: ignore[attr-defined]
        with self.fs.create_stream(path, "rb") as f:  # type: ignore[attr-defined]
            metadata = loads_metadata(f.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata


class SafeFileSystemReader(_SafeMetadataMixin, FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through the restricted unpickler."""


def _fsspec_reader_class() -> type:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    class SafeFsspecReader(_SafeMetadataMixin, FsspecReader):
        """``FsspecReader`` whose ``.metadata`` goes through the restricted unpickler."""

    return SafeFsspecReader


def safe_reader(checkpoint: str) -> Any:
    """A DCP storage reader for a local path or fsspec URI that reads metadata safely.

    Local folders get :class:`ckpt_core.storage.fast_reader.FastFileSystemReader`
    (tensors read straight into their destinations; same format).
    """
    from ckpt_core.storage import layout

    if layout.is_uri(checkpoint):
        return _fsspec_reader_class()(checkpoint)
    from ckpt_core.storage.fast_reader import FastFileSystemReader

    return FastFileSystemReader(layout.filesystem(checkpoint)[1])


class SafeLoadPlanner(DefaultLoadPlanner):
    """Default planner that loads non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"Refusing to unpickle checkpoint entry {fqn!r}: {exc}\nOnly plain values "
                "(numbers, strings, lists, dicts, tuples, tensors) load safely; register "
                "other types with torch.serialization.add_safe_globals if you trust them."
            ) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
