"""Fake quantization of tensor-parallel shards: whole rows for every quantization group.

A row-wise tensor-parallel linear holds a slice of its weight's columns
(``Shard(1)``) and sees a slice of its input's last dimension; a quantization
group (``group_size`` columns, or a whole row per token) can cross the slices,
which torchao's reshapes cannot do on a DTensor. :func:`keep_groups_whole` hooks
a fake quantizer so it gathers the last dimension first and hands the result
back split as it came; plain tensors and column-wise shards (``Shard(0)``) pass
untouched, so FSDP-only and one-rank runs compute exactly as before.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_SAVED = "_ckpt_tp_placements"


def _split_last_dim(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    if not isinstance(x, DTensor):
        return False
    return any(p.is_shard() and p.dim in (x.ndim - 1, -1) for p in x.placements)


def _gather(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    from torch.distributed.tensor import Replicate

    x = args[0] if args else None
    if not _split_last_dim(x):
        setattr(module, _SAVED, None)
        return None
    setattr(module, _SAVED, x.placements)
    last = x.ndim - 1
    whole = [Replicate() if p.is_shard() and p.dim in (last, -1) else p for p in x.placements]
    return (x.redistribute(placements=whole), *args[1:])


def _split_back(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    placements = getattr(module, _SAVED, None)
    if placements is None:
        return None
    setattr(module, _SAVED, None)
    return output.redistribute(placements=placements)


def keep_groups_whole(linear: nn.Module) -> None:
    """Hook the weight and activation fake quantizers of a ``FakeQuantizedLinear``."""
    for name in ("weight_fake_quantizer", "activation_fake_quantizer"):
        quantizer = getattr(linear, name, None)
        if isinstance(quantizer, nn.Module):
            quantizer.register_forward_pre_hook(_gather)
            quantizer.register_forward_hook(_split_back)
