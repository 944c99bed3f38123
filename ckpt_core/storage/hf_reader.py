"""Reading Hugging Face safetensors folders into live (possibly sharded) tensors.

The caller hands in *containers*: HF name → the tensor to fill, usually the
model's own parameters under HF names (``adapter.to_hf(live_state_dict)``).
For a DTensor only this rank's shard is read (``get_slice`` on the stored
tensor), so every rank reads just what it owns and the model is never
materialized whole. Files of any sharding and any floating dtype load; values
are converted to the container's dtype by ``copy_``.

``quantized=True`` reads fp8 block-quantized weights (DeepSeek-V3 style:
``<name>`` in ``float8_e4m3fn`` beside ``<name>_scale_inv`` with one fp32 scale
per 128×128 block) and dequantizes them while loading; compressed-tensors
``float-quantized`` weights (``<name>_scale`` per tensor or per row, as the
float8 converter's fp8 export writes) load the same way. Without it, a float8
tensor bound for a high-precision container is an error, never a silent cast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ckpt_core.errors import CheckpointError, DamagedCheckpointError, first_of
from ckpt_core.export_spec import is_float8
from ckpt_core.storage import layout

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
#: compressed-tensors float-quantized: ``<name>_scale`` multiplies, per tensor or per row.
CT_SCALE_SUFFIX = "_scale"
FP8_BLOCK = 128
#: Largest JSON side file (``index.json``, ``config.json``) read into memory.
MAX_JSON_BYTES = 64 << 20
#: Stored dtypes a floating parameter is filled from (float8 only through its scales).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def resolve_file(folder: str, name: object, *, what: str) -> str:
    """The real path of file ``name`` of the local HF folder ``folder``, checked.

    ``name`` is a plain relative name whose target, symlinks resolved, is a
    regular file inside ``folder``. The one exception is a Hugging Face hub
    cache snapshot (``models--*/snapshots/<rev>/``), whose files are symlinks
    into the same repository's ``blobs/``. Anything else is a
    :class:`DamagedCheckpointError` naming ``what`` and the name.
    """
    from ckpt_core.storage import paths

    try:
        return paths.resolve_inside(folder, name, what=what)  # type: ignore[arg-type]
    except CheckpointError as exc:
        blob = _hub_blob(folder, name)
        if blob is None:
            raise DamagedCheckpointError(str(exc)) from None
        return blob


def _hub_blob(folder: str, name: object) -> str | None:
    """The blob a hub-cache snapshot file links to, when it lies in its repository's ``blobs/``."""
    import stat

    snapshots, repo = os.path.dirname(os.path.realpath(folder)), None
    if os.path.basename(snapshots) == "snapshots":
        repo = os.path.dirname(snapshots)
    if repo is None or not os.path.basename(repo).startswith("models--"):
        return None
    if not isinstance(name, str) or os.path.isabs(name) or ".." in name.split("/"):
        return None
    blobs = os.path.join(repo, "blobs")
    real = os.path.realpath(os.path.join(folder, name))
    if os.path.dirname(real) != blobs:
        return None
    try:
        return real if stat.S_ISREG(os.stat(real).st_mode) else None
    except OSError:
        return None


def read_json(path: str) -> Any:
    """The JSON value in the local regular file ``path`` (bounded size); malformed is one line.

    Raises :class:`DamagedCheckpointError` naming ``path`` for anything but a
    regular file, a file over :data:`MAX_JSON_BYTES`, bytes that are not UTF-8
    JSON, or nesting too deep to parse.
    """
    import stat

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise DamagedCheckpointError(f"{path} is not a regular file; expected a JSON file.")
    if st.st_size > MAX_JSON_BYTES:
        raise DamagedCheckpointError(
            f"{path} is {st.st_size} bytes; a JSON side file is at most {MAX_JSON_BYTES} "
            "bytes. The folder is damaged or was crafted."
        )
    with open(path, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    return parse_json(raw, path)


def parse_json(raw: bytes, path: str) -> Any:
    """``raw`` parsed as UTF-8 JSON; else :class:`DamagedCheckpointError` naming ``path``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DamagedCheckpointError(
            f"{path} is not valid JSON ({reason}); re-download or re-export the folder."
        ) from None


def read_json_object(folder: str, name: str) -> dict[str, Any]:
    """The JSON object in file ``name`` of ``folder`` (local or fsspec URI), checked.

    Locally the file must pass :func:`resolve_file`; everywhere it is bounded by
    :data:`MAX_JSON_BYTES` and must hold an object, else one-line
    :class:`DamagedCheckpointError`.
    """
    path = layout.join(folder, name)
    fs, inner = layout.filesystem(path)
    if fs is None:
        value = read_json(resolve_file(folder, name, what=folder))
    else:
        with fs.open(inner, "rb") as handle:
            value = parse_json(handle.read(MAX_JSON_BYTES + 1), path)
    if not isinstance(value, dict):
        raise DamagedCheckpointError(
            f"{path} holds a JSON {type(value).__name__}, not an object; it is damaged or "
            "was crafted."
        )
    return value


def _read_index(folder: str, index_file: str) -> dict[str, str]:
    """HF tensor name → checked file path, from ``model.safetensors.index.json``."""
    return weight_map_files(
        read_json(index_file),
        index_file,
        lambda file, what: resolve_file(folder, file, what=what),
    )


def weight_map_files(
    data: Any, index_file: str, resolve: Callable[[object, str], str]
) -> dict[str, str]:
    """HF tensor name → file, from the parsed index ``data``; each file name checked
    once by ``resolve(name, what)`` (local: :func:`resolve_file`)."""
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        got = "no index object" if not isinstance(data, dict) else type(weight_map).__name__
        raise DamagedCheckpointError(
            f"{index_file}: 'weight_map' must be an object mapping tensor names to file "
            f"names, got {got}; the index is damaged."
        )
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise DamagedCheckpointError(
            f"{index_file}: weight_map[{bad[0]!r}] is {bad[1]!r}, not a file name; the index "
            "is damaged."
        )
    files = {
        file: resolve(file, f"{index_file} weight_map") for file in sorted(set(weight_map.values()))
    }
    return {name: files[file] for name, file in weight_map.items()}


def index_folder(path: str) -> dict[str, str]:
    """HF tensor name → file path for the ``*.safetensors`` directly in ``path``.

    Uses ``model.safetensors.index.json`` when present, else the files' headers.
    Every file must be a regular file inside the folder (:func:`resolve_file`)
    and a readable safetensors file; else one-line :class:`DamagedCheckpointError`.
    On an object store the same rules hold (:func:`ckpt_core.storage.hf_remote.index_remote`).
    """
    fs, folder = layout.filesystem(path)
    if fs is not None:
        from ckpt_core.storage.hf_remote import index_remote

        return index_remote(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path} is not a folder; expected Hugging Face safetensors.")
    if os.path.lexists(os.path.join(folder, INDEX_NAME)):
        return _read_index(folder, resolve_file(folder, INDEX_NAME, what=path))
    out: dict[str, str] = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            full = resolve_file(folder, file, what=path)
            with open_safetensors(full) as f:
                for name in f.keys():
                    out[name] = full
    if not out:
        raise CheckpointError(f"{path} holds no *.safetensors files.")
    return out


def unreadable(file: str, reason: str) -> DamagedCheckpointError:
    """The one-line refusal of safetensors file ``file`` (local or object) for ``reason``."""
    return DamagedCheckpointError(
        f"{file} is not a readable safetensors file ({reason}); it is truncated or "
        "damaged: re-download or re-export it."
    )


@contextlib.contextmanager
def open_safetensors(file: str) -> Iterator[Any]:
    """``safe_open(file)``; the library's refusals (and any in the block) become one line.

    safetensors checks the header itself (its length against the file, the JSON,
    every dtype, shape and offset against the data) and raises
    ``SafetensorError``; here it is a :class:`DamagedCheckpointError` naming the file.
    A URI is read by ranged requests under the same checks
    (:func:`ckpt_core.storage.hf_remote.open_remote`).
    """
    if layout.is_uri(file):
        from ckpt_core.storage.hf_remote import open_remote

        yield open_remote(file)
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as handle:
            yield handle
    except SafetensorError as exc:
        raise unreadable(file, " ".join(str(exc).split())) from None


def data_bytes(path: str) -> int:
    """Bytes of the safetensors files an HF folder's tensors live in (its real data)."""
    if layout.is_uri(path):
        from ckpt_core.storage.hf_remote import object_bytes

        return sum(object_bytes(file) for file in set(index_folder(path).values()))
    return sum(os.stat(file).st_size for file in set(index_folder(path).values()))


def check_fits(num_params: int, path: str, *, what: str) -> None:
    """Refuse a model of ``num_params`` parameters for an HF folder holding far less data.

    Every parameter takes at least one byte in a safetensors file (8-bit floats
    are the narrowest the readers load), so a config implying more parameters
    than the folder has bytes describes a model the folder cannot hold: it is
    refused before anything is allocated (:class:`DamagedCheckpointError`).
    """
    held = data_bytes(path)
    if num_params > held:
        raise DamagedCheckpointError(
            f"{what} describes a model of {num_params:,} parameters (at least {num_params:,} "
            f"bytes even in 8 bits), but the safetensors files of {path} hold only {held:,} "
            "bytes: the config does not belong to these weights, was crafted, or describes "
            "weights packed below 8 bits (not read). Nothing was allocated."
        )


def local_region(target: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(local tensor, local shape, global offset)`` of a tensor or DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(target, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        return target._local_tensor, tuple(shape), tuple(offset)
    return target, tuple(target.shape), (0,) * target.dim()


def _slices(shape: tuple[int, ...], offset: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _read_region(handle: Any, name: str, shape: tuple[int, ...], offset: tuple[int, ...]):
    if not shape:
        return handle.get_tensor(name)
    return handle.get_slice(name)[_slices(shape, offset)]


def dequantize_region(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    offset: tuple[int, int],
    block: int = FP8_BLOCK,
) -> torch.Tensor:
    """fp32 values of a region of a block-quantized weight.

    ``weight`` is the fp8 region starting at global ``offset``; ``scale_inv``
    holds the block scales of the whole tensor (``ceil(rows/block)`` ×
    ``ceil(cols/block)``); value = fp8 × scale of its block.
    """
    rows, cols = weight.shape
    r0, c0 = offset
    br0, bc0 = r0 // block, c0 // block
    br1, bc1 = math.ceil((r0 + rows) / block), math.ceil((c0 + cols) / block)
    scales = scale_inv[br0:br1, bc0:bc1].float()
    full = scales.repeat_interleave(block, 0).repeat_interleave(block, 1)
    dr, dc = r0 - br0 * block, c0 - bc0 * block
    return weight.float() * full[dr : dr + rows, dc : dc + cols]


def read_into(
    containers: Mapping[str, torch.Tensor],
    path: str,
    *,
    quantized: bool = False,
    strict: bool = True,
    files: Mapping[str, str] | None = None,
    report_unexpected: bool = True,
) -> list[str]:
    """Fill ``containers`` (HF name → tensor/DTensor) from the folder at ``path``.

    Returns the names that the folder does not hold; with ``strict`` a missing
    name raises :class:`CheckpointError` listing them. Shapes must match, and a
    floating container is filled only from a floating stored dtype.
    ``files``: the folder's :func:`index_folder`, when already read (a reader
    of one group at a time passes it, and ``report_unexpected=False``: the
    folder's other tensors are not unexpected then).
    """
    files = index_folder(path) if files is None else files
    missing = sorted(n for n in containers if n not in files)
    if missing and strict:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensors the model needs: "
            f"{first_of(missing)}. Is it a checkpoint of this architecture?"
        )
    by_file: dict[str, list[str]] = {}
    for name in containers:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    with contextlib.ExitStack() as scale_files:
        scale_handles = _ScaleHandles(files, scale_files)
        for file, names in by_file.items():
            with open_safetensors(file) as handle:
                held = set(handle.keys())
                for name in names:
                    _read_one(handle, held, file, name, containers[name], quantized, scale_handles)
    unexpected = [
        n
        for n in (files if report_unexpected else ())
        if n not in containers and not (quantized and n.endswith((SCALE_SUFFIX, CT_SCALE_SUFFIX)))
    ]
    if unexpected:
        # For a full (strict) load a warning, not a debug note: more layers in the folder
        # than in the model load "fine" otherwise (a tied model's leftover lm_head.weight is
        # listed here too). Partial loads (additional_load) report these themselves.
        logger.log(
            logging.WARNING if strict else logging.INFO,
            "%s: %d tensors match no key of the model and were not loaded: %s",
            path,
            len(unexpected),
            unexpected[:8],
        )
    return missing


def _read_one(
    handle: Any,
    held: set[str],
    file: str,
    name: str,
    target: torch.Tensor,
    quantized: bool,
    scales: _ScaleHandles,
) -> None:
    """Check tensor ``name`` of ``file`` against ``target``, then copy this rank's region."""
    if name not in held:
        raise DamagedCheckpointError(
            f"{INDEX_NAME} maps {name!r} to {file}, which does not hold it; the index "
            "is damaged or belongs to other files."
        )
    local, shape, offset = local_region(target)
    info = handle.get_slice(name)
    stored = list(info.get_shape())
    if stored != list(target.shape):
        raise CheckpointError(
            f"Shape mismatch for {name!r} in {file}: the model has "
            f"{list(target.shape)}, the file has {stored}."
        )
    stored_dtype = info.get_dtype()
    if local.dtype.is_floating_point and stored_dtype not in FLOAT_DTYPES:
        raise DamagedCheckpointError(
            f"{name!r} in {file} is stored as {stored_dtype}; a floating model weight is "
            f"read from {', '.join(FLOAT_DTYPES)} only. The file does not hold these weights."
        )
    if local.numel() == 0:
        return
    value = _read_region(handle, name, shape, offset)
    if quantized and value.dtype == torch.float8_e4m3fn:
        value = _dequantize(name, value, offset, tuple(target.shape), scales)
    elif is_float8(value.dtype) and local.dtype != value.dtype:
        raise CheckpointError(
            f"{name!r} in {file} is stored as {value.dtype} (a quantized checkpoint, "
            "e.g. an fp8 export); format 'hf' would load its raw float8 values "
            "without their scales. Use format 'hf_quantized'."
        )
    with torch.no_grad():
        local.copy_(value.reshape(local.shape))


class _ScaleHandles:
    """Scale tensors read through safetensors handles opened once per file."""

    def __init__(self, files: Mapping[str, str], stack: contextlib.ExitStack) -> None:
        self.files, self._stack, self._handles = files, stack, {}

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> torch.Tensor:
        """Scale tensor ``name`` (floating, checked) from its file."""
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(open_safetensors(file))
        handle = self._handles[file]
        if name not in handle.keys():
            raise DamagedCheckpointError(
                f"{INDEX_NAME} maps {name!r} to {file}, which does not hold it; the index "
                "is damaged or belongs to other files."
            )
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in FLOAT_DTYPES[:4]:
            raise DamagedCheckpointError(
                f"scale {name!r} in {file} is stored as {dtype}; scales are F32, BF16, F16 "
                "or F64. The quantized folder is damaged."
            )
        return handle.get_tensor(name).float()


def _dequantize(
    name: str,
    value: torch.Tensor,
    offset: tuple[int, ...],
    full_shape: tuple[int, ...],
    scales: _ScaleHandles,
) -> torch.Tensor:
    scale_name = name + SCALE_SUFFIX
    if not scales.has(scale_name) and scales.has(name + CT_SCALE_SUFFIX):
        return _dequantize_per_channel(name, value, offset, full_shape, scales)
    if not scales.has(scale_name):
        raise CheckpointError(
            f"{name!r} is stored as float8_e4m3fn but {scale_name!r} is missing; "
            "format 'hf_quantized' expects one fp32 scale per 128x128 block."
        )
    if value.dim() != 2:
        raise CheckpointError(f"{name!r}: block-quantized weights must be 2-D, got {value.dim()}.")
    scale = scales.read(scale_name)
    blocks = [math.ceil(n / FP8_BLOCK) for n in full_shape]
    if list(scale.shape) != blocks:
        raise DamagedCheckpointError(
            f"{scale_name!r} has shape {list(scale.shape)}, but {name!r} {list(full_shape)} "
            f"needs one scale per {FP8_BLOCK}x{FP8_BLOCK} block: {blocks}. The folder is damaged."
        )
    return dequantize_region(value, scale, (offset[0], offset[1]))


def _dequantize_per_channel(
    name: str,
    value: torch.Tensor,
    offset: tuple[int, ...],
    full_shape: tuple[int, ...],
    scales: _ScaleHandles,
) -> torch.Tensor:
    """fp32 region of a compressed-tensors float-quantized weight: ``value * <name>_scale``.

    The scale has one entry (per tensor) or one per row (``[rows, 1]``, per channel).
    """
    scale = scales.read(name + CT_SCALE_SUFFIX)
    rows = full_shape[0] if full_shape else 1
    if scale.numel() not in (1, rows):
        raise DamagedCheckpointError(
            f"{name + CT_SCALE_SUFFIX!r} holds {scale.numel()} values, but {name!r} "
            f"{list(full_shape)} takes one per tensor or one per row ({rows}). The folder is "
            "damaged."
        )
    if scale.numel() > 1:
        scale = scale.reshape(-1, 1)[offset[0] : offset[0] + value.shape[0]]
    return value.float() * scale
