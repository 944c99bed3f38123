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

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from ckpt_core.errors import CheckpointError
from ckpt_core.storage import layout
from ckpt_core.transforms import is_float8

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
#: compressed-tensors float-quantized: ``<name>_scale`` multiplies, per tensor or per row.
CT_SCALE_SUFFIX = "_scale"
FP8_BLOCK = 128


def _local_path(path: str) -> str:
    fs, inner = layout.filesystem(path)
    if fs is not None:
        raise CheckpointError(
            f"Reading Hugging Face safetensors from {path!r} needs a local folder; copy it "
            "locally first (fsspec URIs are supported for writing only)."
        )
    return inner


def index_folder(path: str) -> dict[str, str]:
    """HF tensor name → file path for the ``*.safetensors`` directly in ``path``.

    Uses ``model.safetensors.index.json`` when present, else the files' headers.
    """
    from safetensors import safe_open

    folder = _local_path(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path} is not a folder; expected Hugging Face safetensors.")
    index_file = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index_file):
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    out: dict[str, str] = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            full = os.path.join(folder, file)
            with safe_open(full, framework="pt") as f:
                for name in f.keys():
                    out[name] = full
    if not out:
        raise CheckpointError(f"{path} holds no *.safetensors files.")
    return out


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
) -> list[str]:
    """Fill ``containers`` (HF name → tensor/DTensor) from the folder at ``path``.

    Returns the names that the folder does not hold; with ``strict`` a missing
    name raises :class:`CheckpointError` listing them. Shapes must match.
    """
    from safetensors import safe_open

    files = index_folder(path)
    missing = sorted(n for n in containers if n not in files)
    if missing and strict:
        more = f" ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensors the model needs: "
            f"{', '.join(missing[:10])}{more}. Is it a checkpoint of this architecture?"
        )
    by_file: dict[str, list[str]] = {}
    for name in containers:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    scale_handles: dict[str, Any] = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for name in names:
                target = containers[name]
                local, shape, offset = local_region(target)
                stored = list(handle.get_slice(name).get_shape())
                if stored != list(target.shape):
                    raise CheckpointError(
                        f"Shape mismatch for {name!r} in {file}: the model has "
                        f"{list(target.shape)}, the file has {stored}."
                    )
                if local.numel() == 0:
                    continue
                value = _read_region(handle, name, shape, offset)
                if quantized and value.dtype == torch.float8_e4m3fn:
                    value = _dequantize(name, value, offset, files, scale_handles)
                elif is_float8(value.dtype) and local.dtype != value.dtype:
                    raise CheckpointError(
                        f"{name!r} in {file} is stored as {value.dtype} (a quantized checkpoint, "
                        "e.g. an fp8 export); format 'hf' would load its raw float8 values "
                        "without their scales. Use format 'hf_quantized'."
                    )
                with torch.no_grad():
                    local.copy_(value.reshape(local.shape))
    for h in scale_handles.values():
        h.__exit__(None, None, None)
    unexpected = [
        n
        for n in files
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


def _read_scale(name: str, files: Mapping[str, str], handles: dict[str, Any]) -> torch.Tensor:
    """Tensor ``name`` from its file; the file's handle is opened once and kept in ``handles``."""
    from safetensors import safe_open

    file = files[name]
    if file not in handles:
        handles[file] = safe_open(file, framework="pt").__enter__()
    return handles[file].get_tensor(name)


def _dequantize(
    name: str,
    value: torch.Tensor,
    offset: tuple[int, ...],
    files: Mapping[str, str],
    handles: dict[str, Any],
) -> torch.Tensor:
    scale_name = name + SCALE_SUFFIX
    if scale_name not in files and name + CT_SCALE_SUFFIX in files:
        return _dequantize_per_channel(name, value, offset, files, handles)
    if scale_name not in files:
        raise CheckpointError(
            f"{name!r} is stored as float8_e4m3fn but {scale_name!r} is missing; "
            "format 'hf_quantized' expects one fp32 scale per 128x128 block."
        )
    if value.dim() != 2:
        raise CheckpointError(f"{name!r}: block-quantized weights must be 2-D, got {value.dim()}.")
    scale = _read_scale(scale_name, files, handles)
    return dequantize_region(value, scale, (offset[0], offset[1]))


def _dequantize_per_channel(
    name: str,
    value: torch.Tensor,
    offset: tuple[int, ...],
    files: Mapping[str, str],
    handles: dict[str, Any],
) -> torch.Tensor:
    """fp32 region of a compressed-tensors float-quantized weight: ``value * <name>_scale``.

    The scale has one entry (per tensor) or one per row (``[rows, 1]``, per channel).
    """
    scale = _read_scale(name + CT_SCALE_SUFFIX, files, handles).float()
    if scale.numel() > 1:
        scale = scale.reshape(-1, 1)[offset[0] : offset[0] + value.shape[0]]
    return value.float() * scale
