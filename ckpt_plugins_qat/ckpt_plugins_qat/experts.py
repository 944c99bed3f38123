"""QAT of stacked MoE experts: each expert's rows quantized like a linear's.

A stacked weight ``[E, out, in]`` (``moe.experts.w1``) is fake-quantized by
torchao's ``IntxFakeQuantizer`` over ``[E * out, in]``: scales group inputs
within one row, so every expert gets exactly the scales and integers it would
get as a linear of its own. The model applies it through its
:data:`ckpt_core.content.experts.WEIGHT_TRANSFORMS` hook (parameters and names stay);
the export quantizes expert by expert into the same compressed-tensors entries
as a linear, named ``<stacked key>.<e>.weight_packed`` etc., which the model's
adapter turns into HF per-expert names (``mlp.experts.<e>.gate_proj.weight_packed``).

Weight-only schemes only: ``int8_dynamic_act_int4_weight`` also fake-quantizes
each linear's input, which the experts' forward does not expose; its experts
stay in high precision.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ckpt_plugins_qat.schemes import Scheme


class StackedFakeQuantizer:
    """``fn(weight[E, out, in])`` → the fake-quantized weight, per expert row."""

    def __init__(self, scheme: Scheme, group_size: int) -> None:
        from torchao.quantization.qat import IntxFakeQuantizer

        self.fake_quantizer = IntxFakeQuantizer(scheme.weight_fake_quantize_config(group_size))

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.reshape(-1, weight.shape[-1])
        return self.fake_quantizer(rows).reshape(weight.shape)


def supports_experts(scheme: Scheme) -> bool:
    """Whether ``scheme`` fake-quantizes stacked experts (weight-only schemes)."""
    return not scheme.int8_activations


def stacked_target_keys(
    state_dict: dict[str, Any], targets: Iterable[str], scheme: Scheme
) -> list[str]:
    """Keys of 3-D entries whose leaf name is a target (offline: no model to ask)."""
    if not supports_experts(scheme):
        return []
    wanted = set(targets)
    return [
        key
        for key, value in state_dict.items()
        if getattr(value, "ndim", 0) == 3 and key.rsplit(".", 1)[-1] in wanted
    ]
