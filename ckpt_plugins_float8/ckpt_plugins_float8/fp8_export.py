"""The ``fp8`` export: compressed-tensors ``float-quantized`` weights.

Each converted linear's ``<module>.weight`` becomes

* ``<module>.weight``: ``float8_e4m3fn``, the very bits torchao's training cast
  produces for that weight (same amax, same ``fp8_max / clamp(amax, eps)``
  scale computed in float64 then rounded to float32, the rowwise recipe's
  power-of-two rounding, the same saturating clamp and round-to-nearest cast);
* ``<module>.weight_scale``: float32 dequantization scale, i.e. the reciprocal
  of torchao's scale (compressed-tensors multiplies: ``w ≈ weight * weight_scale``).
  Shape ``[1]`` for tensorwise, ``[out_features, 1]`` for rowwise.

``config.json`` gets the matching ``quantization_config``: weights static
(per-tensor or per-channel), input activations dynamic (per-tensor or per-token),
every high-precision linear (``lm_head`` and the skipped ones) in ``ignore``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ckpt_core.plugin_api import PluginError, StateDictAdapter, add_quantization_config

FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale"

# recipe -> (weight strategy, input-activation strategy) in compressed-tensors words
STRATEGIES = {"tensorwise": ("tensor", "tensor"), "rowwise": ("channel", "token")}


def quantize_weight(weight: torch.Tensor, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float8 bits and dequantization scale of one weight, as torchao's training cast makes them.

    Works on plain tensors and DTensors (the amax is then reduced across ranks by DTensor).
    Returns ``(bits, weight_scale)``; ``weight`` is not modified.
    """
    from torchao.float8.float8_utils import amax_to_scale, to_fp8_saturated

    w = weight.detach()
    if recipe == "tensorwise":
        amax = torch.max(torch.abs(w))
        scale = amax_to_scale(amax, FP8_DTYPE, round_scales_to_power_of_2=False)
    elif recipe == "rowwise":
        # torchao scales weight.t() along dim 0, i.e. one scale per output feature.
        amax = torch.amax(torch.abs(w), dim=-1, keepdim=True)
        scale = amax_to_scale(amax, FP8_DTYPE, round_scales_to_power_of_2=True)
    else:
        raise ValueError(f"recipe must be one of {sorted(STRATEGIES)}, got {recipe!r}")
    bits = to_fp8_saturated(w.to(torch.float32) * scale, FP8_DTYPE)
    weight_scale = torch.reciprocal(scale)
    if recipe == "tensorwise":
        weight_scale = weight_scale.reshape(1)
    return bits, weight_scale


def dequantize_weight(bits: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype):
    """High-precision weight of an fp8 export entry (``bits * weight_scale``)."""
    return (bits.to(torch.float32) * weight_scale.to(torch.float32)).to(dtype)


def fp8_state_dict(
    state_dict: dict[str, Any], modules: Iterable[str], recipe: str
) -> dict[str, Any]:
    """A new state dict whose ``<module>.weight`` entries are fp8, each with a ``weight_scale``.

    Keys keep their order; the scale follows its weight. A module whose weight is
    absent from ``state_dict`` is a :class:`PluginError`: exporting it high precision
    under an fp8 ``quantization_config`` would be read wrongly.
    """
    wanted = {f"{m}.weight" for m in modules}
    missing = sorted(wanted.difference(state_dict))
    if missing:
        raise PluginError(
            f"Converter 'float8' option 'export': 'fp8' quantizes the linears 'convert' "
            f"swapped, and {len(missing)} of their weights are not in the export state dict "
            f"(e.g. {missing[:3]}; it has e.g. {list(state_dict)[:3]}). Call "
            "converters.convert(model) on the whole model part that is checkpointed, not on "
            "its submodules, so the recorded names match the state-dict keys."
        )
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key not in wanted:
            out[key] = value
            continue
        bits, scale = quantize_weight(value, recipe)
        out[key] = bits
        out[key + SCALE_SUFFIX] = scale
    return out


def quantization_config(recipe: str, ignore: list[str]) -> dict[str, Any]:
    """compressed-tensors ``quantization_config`` of an fp8 export."""
    weight_strategy, input_strategy = STRATEGIES[recipe]

    def args(strategy: str, dynamic: bool) -> dict[str, Any]:
        return {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "group_size": None,
            "strategy": strategy,
            "dynamic": dynamic,
        }

    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": args(weight_strategy, False),
                "input_activations": args(input_strategy, True),
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "ignore": list(ignore),
    }


class Float8ExportAdapter(StateDictAdapter):
    """Adds ``quantization_config`` to ``config.json``; keys go through the model's adapter.

    Float8 owns no keys, so the export writer sends the fp8 ``weight`` and
    ``weight_scale`` entries through the model adapter (which keeps leaf
    suffixes). :meth:`to_hf` / :meth:`from_hf` delegate to it for callers that
    ask this adapter directly.
    """

    subfolder = None

    def __init__(
        self,
        model_adapter: StateDictAdapter | None,
        recipe: str,
        fp8_linears: list[str],
        high_precision_linears: list[str],
    ) -> None:
        self.model_adapter = model_adapter
        self.recipe = recipe
        self.fp8_linears = list(fp8_linears)
        self.high_precision_linears = list(high_precision_linears)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Native → HF names through the model adapter (unchanged without one)."""
        if self.model_adapter is None:
            return dict(state_dict)
        return self.model_adapter.to_hf(state_dict)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """HF → native names through the model adapter (unchanged without one)."""
        if self.model_adapter is None:
            return dict(hf_state_dict)
        return self.model_adapter.from_hf(hf_state_dict)

    def hf_module_name(self, fqn: str) -> str:
        """HF name of a native module path (via the model adapter's name for its weight)."""
        return fqn if self.model_adapter is None else self.model_adapter.hf_module(fqn)

    def ignore_list(self) -> list[str]:
        """HF module names of the linears that stay high precision.

        ``lm_head`` is listed unless the output projection itself was converted
        (with tied embeddings it has no key of its own and stays high precision).
        """
        converted = {self.hf_module_name(fqn) for fqn in self.fp8_linears}
        names = [] if "lm_head" in converted else ["lm_head"]
        for fqn in self.high_precision_linears:
            name = self.hf_module_name(fqn)
            if name not in names:
                names.append(name)
        return names

    def update_hf_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` plus the compressed-tensors ``quantization_config`` (merged, if present)."""
        qc = quantization_config(self.recipe, self.ignore_list())
        quantized = [self.hf_module_name(fqn) for fqn in self.fp8_linears]
        return add_quantization_config(config, qc, quantized, owner="float8")

    def describe(self) -> dict[str, Any]:
        """Recipe and high-precision linears, for manifests."""
        return {
            "recipe": self.recipe,
            "fp8_linears": self.fp8_linears,
            "high_precision_linears": self.high_precision_linears,
        }
