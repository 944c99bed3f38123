"""What an export writes, shared by content and I/O: dtype rules and the HF groups.

The transforms (:mod:`ckpt_core.content.transforms`) decide the groups and the export
dtype; the writers (:mod:`ckpt_core.storage.hf_writer`) cast and write them. Both import
these names from here, so storage needs nothing from content.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ckpt_core.errors import ConfigError

if TYPE_CHECKING:
    from ckpt_core.protocol.state_dict_adapter import StateDictAdapter


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` → ``torch.bfloat16``; ``None`` keeps each tensor's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ConfigError(
            f"export dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)} "
            "(or none to keep each tensor's dtype)."
        )
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def is_castable(dtype: torch.dtype) -> bool:
    """Whether the export cast applies: floating point of 16 bits or more."""
    return dtype.is_floating_point and dtype.itemsize >= 2


def is_float8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a 1-byte float: quantized values that mean nothing without a scale."""
    return dtype.is_floating_point and dtype.itemsize == 1


def cast_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is exported in when the export dtype is ``target``."""
    if target is None or not is_castable(dtype):
        return dtype
    return target


def cast_state_dict(state_dict: Mapping[str, Any], target: torch.dtype | None) -> dict[str, Any]:
    """Cast floating tensors whose dtype differs (new tensors); others are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            want = cast_dtype(value.dtype, target)
            if want != value.dtype:
                value = value.detach().to(want)
        out[key] = value
    return out


@dataclass
class HFGroup:
    """Tensors under HF names that one writer target receives.

    ``subfolder`` ``None`` is the model's own files; otherwise ``adapter``
    writes ``<subfolder>/<adapter.file_name()>`` and its ``extra_files()``.
    Tensors are not yet cast: writers apply :func:`cast_dtype`.
    """

    subfolder: str | None
    adapter: StateDictAdapter | None
    tensors: dict[str, Any] = field(default_factory=dict)
