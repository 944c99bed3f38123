"""Export transform: fp32 master weights → compressed-tensors integer entries.

A pure function over a state dict. Each targeted linear's ``<mod>.weight`` is
replaced by the entries compressed-tensors stores for the scheme:

* ``pack-quantized`` (int4 weight-only, int8 weight-only):
  ``<mod>.weight_packed`` int32 ``[out, in * bits / 32]``,
  ``<mod>.weight_scale`` ``[out, in / group]`` (per channel: ``[out, 1]``),
  ``<mod>.weight_shape`` int64 ``[2]``;
* ``int-quantized`` (int8 dynamic activations, int4 weights):
  ``<mod>.weight`` int8 ``[out, in]`` holding values in ``[-8, 7]`` and
  ``<mod>.weight_scale``.

Scales leave here in the master weight's dtype; the export's dtype cast then
brings them to the export dtype, which is what compressed-tensors expects (it
dequantizes into the scale's dtype). Integer tensors are never cast.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ckpt_core.plugin_api import full_tensor
from ckpt_plugins_qat.experts import stacked_target_keys
from ckpt_plugins_qat.quantize import pack_int32, quantize_weight
from ckpt_plugins_qat.schemes import Scheme

WEIGHT_SUFFIX = ".weight"
#: Suffixes of the export entries that replace ``<mod>.weight``.
PACKED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape")
#: Keys of fake-quantizer state (range learning makes scales parameters).
QUANTIZER_STATE_MARKERS = (".weight_fake_quantizer.", ".activation_fake_quantizer.")


def module_of(key: str) -> str:
    """``layers.0.attention.wq.weight`` → ``layers.0.attention.wq``."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def leaf_of(module: str) -> str:
    """``layers.0.attention.wq`` → ``wq``."""
    return module.rsplit(".", 1)[-1]


def is_quantizer_state(key: str) -> bool:
    """Whether ``key`` belongs to a fake quantizer (learned scales / zero points)."""
    return any(marker in key for marker in QUANTIZER_STATE_MARKERS)


def target_weight_keys(state_dict: dict[str, Any], targets: Iterable[str]) -> list[str]:
    """Keys of the 2-D ``.weight`` entries whose module leaf name is a target."""
    wanted = set(targets)
    out = []
    for key, value in state_dict.items():
        if not key.endswith(WEIGHT_SUFFIX) or is_quantizer_state(key):
            continue
        if leaf_of(module_of(key)) in wanted and getattr(value, "ndim", 0) == 2:
            out.append(key)
    return out


def is_row_sharded(value: Any) -> bool:
    """Whether ``value`` is a DTensor whose local piece holds whole rows.

    FSDP2 shards weights on dim 0 (``Shard(0)``, ``Replicate`` under HSDP). Scales
    group inputs within one row, so such a weight quantizes shard by shard,
    without gathering it: every rank quantizes only its own rows.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(value, DTensor):
        return False
    return all(isinstance(p, Replicate) or p == Shard(0) for p in value.placements)


def _row_entries(
    weight: torch.Tensor, scheme: Scheme, group_size: int, scale: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Entry suffix → tensor for whole rows of one weight (possibly zero rows)."""
    rows, cols = weight.shape
    group = scheme.group_size_for(cols, group_size)
    if rows == 0:
        values = torch.empty(0, cols, dtype=torch.int8, device=weight.device)
        scales = torch.empty(0, cols // group, dtype=weight.dtype, device=weight.device)
    else:
        quantized = quantize_weight(weight, scheme, group_size, scale=scale)
        values, scales = quantized.values, quantized.scale
    if scheme.packed:
        return {"weight_packed": pack_int32(values, scheme.weight_bits), "weight_scale": scales}
    return {"weight": values, "weight_scale": scales}


def compressed_entries(
    module: str,
    weight: torch.Tensor,
    scheme: Scheme,
    group_size: int,
    learned_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The compressed-tensors entries of one linear (new tensors).

    A row-sharded DTensor weight gives DTensors sharded the same way (each rank
    quantizes its own rows); any other weight gives plain tensors.
    """
    shape = torch.tensor(list(weight.shape), dtype=torch.int64)
    local = is_row_sharded(weight) and (learned_scale is None or is_row_sharded(learned_scale))
    if local:
        from torch.distributed.tensor import DTensor

        scale = None if learned_scale is None else learned_scale.to_local().detach()
        entries = _row_entries(weight.to_local().detach(), scheme, group_size, scale)
        rows = weight.shape[0]
        entries = {
            name: DTensor.from_local(
                t,
                weight.device_mesh,
                weight.placements,
                shape=(rows, t.shape[1]),
                stride=(t.shape[1], 1),
                run_check=False,
            )
            for name, t in entries.items()
        }
    else:
        scale = None if learned_scale is None else full_tensor(learned_scale).detach()
        entries = _row_entries(full_tensor(weight).detach(), scheme, group_size, scale)
    out = {f"{module}.{name}": t for name, t in entries.items()}
    if scheme.packed:
        out[f"{module}.weight_shape"] = shape
    return out


def quantize_state_dict(
    state_dict: dict[str, Any],
    scheme: Scheme,
    group_size: int,
    targets: Iterable[str],
    stacked: Iterable[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Replace every targeted weight by its compressed entries.

    ``stacked``: keys of stacked MoE experts trained with fake quantization
    (``None``: the 3-D entries named by ``targets``, as an offline tool must
    guess); each expert ``e`` becomes ``<key>.<e>.weight_packed`` and so on.
    Returns the new state dict (input order kept; fake-quantizer state dropped)
    and the module names that were quantized. The input dict and its tensors are
    not modified.
    """
    keys = set(target_weight_keys(state_dict, targets))
    experts = set(stacked_target_keys(state_dict, targets, scheme) if stacked is None else stacked)
    out: dict[str, Any] = {}
    modules = []
    for key, value in state_dict.items():
        if is_quantizer_state(key):
            continue
        if key in experts:
            for e in range(value.shape[0]):
                out.update(compressed_entries(f"{key}.{e}", value[e], scheme, group_size))
            modules.append(key)
        elif key in keys:
            module = module_of(key)
            learned = state_dict.get(f"{module}.weight_fake_quantizer.scale")
            out.update(compressed_entries(module, value, scheme, group_size, learned))
            modules.append(module)
        else:
            out[key] = value
    return out, modules
