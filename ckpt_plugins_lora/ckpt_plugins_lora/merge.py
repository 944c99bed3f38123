"""Merging LoRA factors into base weights: ``W' = W + (alpha/r)·B·A`` in fp32.

The merge is a pure function over a state dict: it reads the keys of the
modules LoRA adapted (recorded at convert time), builds new tensors and never
writes into the ones it is given. It works on FSDP2-sharded DTensors: the small
factors are gathered whole, and each rank adds to its own shard of ``W`` the
rows and columns of ``B·A`` that fall into that shard, so no rank ever holds a
full weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ckpt_core.plugin_api import CheckpointError, full_tensor, with_local
from ckpt_plugins_lora.layers import LORA_A, LORA_B


def factor_keys(module: str) -> tuple[str, str, str]:
    """State-dict keys of one adapted module: (weight, lora_a weight, lora_b weight)."""
    return f"{module}.weight", f"{module}.{LORA_A}.weight", f"{module}.{LORA_B}.weight"


def merge_adapters(
    state_dict: Mapping[str, Any], modules: Iterable[str], scaling: float, *, merge: bool = True
) -> dict[str, Any]:
    """Return a new state dict with each adapted module's factors merged (or just dropped).

    Args:
        state_dict: a ``full``-view state dict (plain tensors or DTensors).
        modules: canonical names of the adapted linears, e.g. ``layers.0.attention.wq``.
        scaling: ``alpha / rank``.
        merge: ``False`` drops the factors and keeps the base weights as they are.

    Modules whose factors are absent (another pipeline stage) are skipped. The
    iteration order is sorted, so collective gathers line up across ranks.
    """
    out = dict(state_dict)
    for module in sorted(set(modules)):
        w_key, a_key, b_key = factor_keys(module)
        if a_key not in out and b_key not in out:
            continue
        if a_key not in out or b_key not in out:
            missing = a_key if a_key not in out else b_key
            raise CheckpointError(
                f"LoRA merge: {missing!r} is missing while its partner factor is present; "
                "the state dict is incomplete."
            )
        lora_a, lora_b = out.pop(a_key), out.pop(b_key)
        if not merge:
            continue
        if w_key not in out:
            raise CheckpointError(
                f"LoRA merge: base weight {w_key!r} is missing for the factors of {module!r}; "
                "export the factors with the weight they adapt."
            )
        out[w_key] = merged_weight(out[w_key], lora_a, lora_b, scaling)
    return out


def merged_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``weight + scaling · lora_b @ lora_a`` computed in fp32, in ``weight``'s dtype.

    ``weight`` may be a DTensor (any mesh, ``Shard``/``Replicate`` placements);
    the result is a new tensor with the same placements.
    """
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        a = full_tensor(lora_a).float()
        b = full_tensor(lora_b).float()
        _check_shapes(weight, a, b)
        if isinstance(weight, DTensor):
            return _merged_dtensor(weight, a, b, scaling)
        return (weight.float() + scaling * (b.to(weight.device) @ a.to(weight.device))).to(
            weight.dtype
        )


def _merged_dtensor(weight: Any, a: torch.Tensor, b: torch.Tensor, scaling: float) -> Any:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    plain = all(type(p) in (Shard, Replicate) for p in weight.placements)
    if not plain:
        # Strided or other exotic placements: replicate, merge, shard back.
        full = weight.redistribute(placements=[Replicate()] * weight.device_mesh.ndim)
        local = full.to_local()
        merged = (local.float() + scaling * (b.to(local.device) @ a.to(local.device))).to(
            local.dtype
        )
        replicated = DTensor.from_local(
            merged, weight.device_mesh, full.placements, run_check=False
        )
        return replicated.redistribute(placements=weight.placements)
    local = weight.to_local()
    shape, offset = compute_local_shape_and_global_offset(
        weight.shape, weight.device_mesh, weight.placements
    )
    rows = slice(offset[0], offset[0] + shape[0])
    cols = slice(offset[1], offset[1] + shape[1])
    delta = b[rows].to(local.device) @ a[:, cols].to(local.device)
    merged = (local.float() + scaling * delta).to(local.dtype)
    return with_local(weight, merged)


def _check_shapes(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    out_f, in_f = weight.shape
    if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        raise CheckpointError(
            f"LoRA merge: factor shapes A {list(a.shape)} and B {list(b.shape)} do not fit "
            f"weight {list(weight.shape)} (expected A (r, {in_f}) and B ({out_f}, r))."
        )
