"""Reading DCP's ``.metadata`` without trusting it.

``.metadata`` is a pickle, and torch's ``FileSystemReader`` unpickles it with
plain :func:`pickle.load`: a tampered checkpoint can run any code on every rank
that loads it. :class:`RestrictedUnpickler` admits only the classes DCP writes
into that file (its metadata dataclasses, ``torch.Size``, dtypes, layouts,
paths and plain containers) and refuses everything else *before* calling it,
so a code payload is reported instead of run.

Every DCP read in ckpt goes through :func:`safe_load`, the one gate:

1. :func:`read_metadata` resolves ``.metadata`` inside the folder (a regular
   file, no symlink out), unpickles it with :class:`RestrictedUnpickler`, and
   checks its values against the folder
   (:func:`ckpt_core.storage.metadata_checks.check_metadata`: storage paths
   inside, offsets and lengths within each file, chunk sizes within records);
2. the readers (:func:`safe_reader`) reuse that checked metadata and read every
   item through one method: ``torch.load(weights_only=True)`` of a zip archive
   whose records are stored uncompressed and fit in the item (:func:`check_archive`);
3. :class:`SafeLoadPlanner` refuses an entry whose kind differs from the live
   value's (bytes where a tensor lives, a tensor where a plain value lives, a
   tensor of another shape) and loads bytes entries with ``weights_only=True``
   instead of DCP's ``weights_only=False``;
4. DCP's multi-line ``CheckpointException`` becomes one ckpt error line.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from ckpt_core.errors import CheckpointError, CkptError, DamagedCheckpointError

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


class UnsafeMetadataError(DamagedCheckpointError):
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
        raise DamagedCheckpointError(f"{source} is not readable DCP metadata: {exc}") from exc
    if not isinstance(metadata, Metadata):
        raise DamagedCheckpointError(
            f"{source} holds a {type(metadata).__name__}, not DCP Metadata; it is damaged."
        )
    return metadata


def read_metadata(checkpoint: str) -> Metadata:
    """The checked DCP ``Metadata`` of a checkpoint folder (local path or fsspec URI).

    ``.metadata`` must be a regular file inside the folder; it is unpickled with
    :class:`RestrictedUnpickler`, then its values are checked against the folder
    (:func:`ckpt_core.storage.metadata_checks.check_metadata`).
    """
    from ckpt_core.storage import layout
    from ckpt_core.storage.metadata_checks import check_metadata
    from ckpt_core.storage.paths import open_regular, resolve_inside

    path = layout.join(checkpoint, METADATA_NAME)
    if not layout.exists(path):
        raise CheckpointError(
            f"{checkpoint} has no readable {METADATA_NAME}; it is not a DCP checkpoint "
            "(or it was not committed)."
        )
    checked = resolve_inside(checkpoint, METADATA_NAME, what=checkpoint)
    try:
        if layout.is_uri(checkpoint):
            with layout.open_file(checked, "rb") as f:
                data = f.read()
        else:
            with open_regular(checked, what=path) as f:
                data = f.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc}).") from exc
    return check_metadata(loads_metadata(data, path), checkpoint, source=path)


class _ItemView(io.RawIOBase):
    """The bytes ``[offset, offset + length)`` of a stream as a seekable read-only file."""

    def __init__(self, base: Any, offset: int, length: int) -> None:
        super().__init__()
        self._base, self._start, self._len, self._pos = base, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        origin = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._len}[whence]
        self._pos = min(max(origin + pos, 0), self._len)
        return self._pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self._len - self._pos)
        if n <= 0:
            return 0
        self._base.seek(self._start + self._pos)
        data = self._base.read(n)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


def check_archive(stream: Any, length: int, *, what: str) -> None:
    """A ``torch.save`` item holds only stored (uncompressed) records that fit in ``length``.

    torch's archive reader allocates what a record declares and inflates
    compressed records, so a crafted item could ask for far more memory than
    its bytes; DCP never writes such an item.
    """
    try:
        with zipfile.ZipFile(stream) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise DamagedCheckpointError(
            f"{what} is not a torch.save archive ({exc}); do not load this checkpoint."
        ) from None
    declared = 0
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise DamagedCheckpointError(
                f"{what} holds the compressed record {record.filename!r}; DCP stores records "
                "uncompressed. The checkpoint was crafted: do not load it."
            )
        declared += record.file_size
    if declared > length:
        raise DamagedCheckpointError(
            f"{what} declares {declared} bytes of records in an item of {length} bytes; the "
            "checkpoint was crafted: do not load it."
        )
    stream.seek(0)


def _done() -> Future[None]:
    fut: Future = Future()
    fut.set_result(None)
    return fut


class _SafeReading:
    """What every ckpt DCP reader shares: checked metadata and one checked item reader."""

    #: The folder as the user named it (a local path or a URI), set by :func:`safe_reader`.
    checkpoint: str | None = None
    #: Metadata already read and checked by :func:`read_metadata`, reused as is.
    checked_metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self.checked_metadata
        if metadata is None:
            metadata = read_metadata(self.checkpoint or str(self.path))  # type: ignore[attr-defined]
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)  # type: ignore[attr-defined]
        for relative_path, reqs in per_file.items():
            path = self.fs.concat_path(self.path, relative_path)  # type: ignore[attr-defined]
            with self.fs.create_stream(path, "rb") as stream:  # type: ignore[attr-defined]
                for req in reqs:
                    item = self.storage_data[req.storage_index]  # type: ignore[attr-defined]
                    self._read_item(stream, req, item, planner)
        return _done()

    def _read_item(self, stream: Any, req: Any, item: Any, planner: Any) -> None:
        """Load one item: bytes through the planner, a tensor with ``weights_only=True``."""
        fqn = req.storage_index.fqn
        view = _ItemView(stream, item.offset, item.length)
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(view.read()))
            return
        what = f"{self.checkpoint or self.path} entry {fqn!r}"  # type: ignore[attr-defined]
        check_archive(view, item.length, what=what)
        from torch.distributed._shard._utils import narrow_tensor_by_index

        try:
            tensor = torch.load(view, map_location="cpu", weights_only=True)
            tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        except (pickle.UnpicklingError, RuntimeError, ValueError, IndexError) as exc:
            raise DamagedCheckpointError(
                f"{what} does not hold the tensor its metadata declares "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})."
            ) from exc
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise DamagedCheckpointError(
                f"{what} holds a region of shape {list(tensor.size())} where "
                f"{list(target.size())} was declared; the checkpoint is damaged."
            )
        target.copy_(tensor)
        planner.commit_tensor(req, target)


class SafeFileSystemReader(_SafeReading, FileSystemReader):
    """``FileSystemReader`` with checked ``.metadata`` and checked items."""


def _fsspec_reader_class() -> type:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    class SafeFsspecReader(_SafeReading, FsspecReader):
        """``FsspecReader`` with checked ``.metadata`` and checked items, read as ranges."""

        def read_data(self, plan: Any, planner: Any) -> Future[None]:
            from ckpt_core.storage.object_io import read_items

            read_items(self, plan, planner)
            return _done()

    return SafeFsspecReader


def safe_reader(checkpoint: str, metadata: Metadata | None = None) -> Any:
    """A DCP storage reader for a local path or fsspec URI that reads only checked data.

    ``metadata``: the folder's metadata as :func:`read_metadata` returned it (read
    again when not given). Local folders get
    :class:`ckpt_core.storage.fast_reader.FastFileSystemReader` (tensors read
    straight into their destinations; same format).
    """
    from ckpt_core.storage import layout

    if layout.is_uri(checkpoint):
        reader = _fsspec_reader_class()(checkpoint, **layout.fsspec_options(checkpoint))
    else:
        from ckpt_core.storage.fast_reader import FastFileSystemReader

        reader = FastFileSystemReader(layout.filesystem(checkpoint)[1])
    reader.checkpoint = checkpoint
    reader.checked_metadata = metadata
    return reader


def check_kinds(state_dict: dict[str, Any], metadata: Metadata, *, source: str) -> None:
    """Each flattened live value has the kind its saved entry has (tensor or bytes, shape).

    A bytes entry where a tensor lives would be unpickled into the model; a tensor
    entry where a plain value lives would reach DCP's tensor code with the wrong
    object. Both are refused here, naming the key.
    """
    saved = metadata.state_dict_metadata
    for fqn, value in state_dict.items():
        entry = saved.get(fqn)
        live = isinstance(value, torch.Tensor)
        if isinstance(entry, BytesStorageMetadata) and live:
            problem = "stores a pickled object where the live state holds a tensor"
        elif isinstance(entry, TensorStorageMetadata) and not live:
            problem = f"stores a tensor where the live state holds a {type(value).__name__}"
        elif isinstance(entry, TensorStorageMetadata) and tuple(entry.size) != tuple(value.shape):
            problem = (
                f"stores a tensor of shape {list(entry.size)} where the live one has "
                f"{list(value.shape)}"
            )
        else:
            continue
        raise DamagedCheckpointError(
            f"{source}: entry {fqn!r} {problem}; the checkpoint is damaged, crafted or from a "
            "different model: do not load it."
        )


def _unpickler_reason(exc: Exception) -> str:
    """The one line of torch's long ``weights_only`` message that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if "WeightsUnpickler error" in line), None)
    if reason is None:
        return lines[0] if lines else type(exc).__name__
    reason = reason.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0]
    return reason.strip().rstrip(".")


class SafeLoadPlanner(DefaultLoadPlanner):
    """Default planner that checks entry kinds and loads bytes with ``weights_only=True``."""

    def __init__(self, *args: Any, source: str = "checkpoint", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source

    def create_local_plan(self) -> Any:
        check_kinds(self.state_dict, self.metadata, source=self.source)  # type: ignore[arg-type]
        return super().create_local_plan()

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        what = f"{self.source} entry {fqn!r}"
        check_archive(value, len(value.getbuffer()), what=what)
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise DamagedCheckpointError(
                f"Refusing to unpickle {what}: {_unpickler_reason(exc)}. Only plain values "
                "(numbers, strings, "
                "lists, dicts, tuples, tensors) load; register other types with "
                "torch.serialization.add_safe_globals if you trust them."
            ) from None
        except (RuntimeError, ValueError, EOFError) as exc:
            raise DamagedCheckpointError(f"{what} is not loadable ({exc}).") from exc
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _one_line(exc: BaseException, checkpoint: str) -> CkptError:
    """The first rank's failure of a DCP ``CheckpointException`` as one ckpt error."""
    failures = getattr(exc, "failures", {}) or {}
    for rank in sorted(failures):
        err = failures[rank][0]
        if isinstance(err, CkptError):
            return err
        first = (str(err).strip().splitlines() or [""])[0]
        return CheckpointError(
            f"{checkpoint}: DCP could not load it (rank {rank}: {type(err).__name__}: {first})."
        )
    first = (str(exc).strip().splitlines() or [""])[0]
    return CheckpointError(f"{checkpoint}: DCP could not load it ({first}).")


def safe_load(
    state: dict[str, Any],
    checkpoint: str,
    *,
    process_group: Any = None,
    metadata: Metadata | None = None,
) -> None:
    """Load ``state`` (nested dicts of tensors and plain values) in place from ``checkpoint``.

    The one way ckpt reads DCP data: checked metadata (:func:`read_metadata`, or
    ``metadata`` as it returned), :func:`safe_reader`, :class:`SafeLoadPlanner`.
    Every failure, on any rank, is one :class:`CheckpointError` line.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ckpt_core.rank_zero import distributed_on

    metadata = metadata if metadata is not None else read_metadata(checkpoint)
    try:
        dcp.load(
            state,
            storage_reader=safe_reader(checkpoint, metadata),
            planner=SafeLoadPlanner(source=checkpoint),
            process_group=process_group,
            no_dist=not distributed_on(),
        )
    except CheckpointException as exc:
        raise _one_line(exc, checkpoint) from exc
