"""The three QAT schemes: what torchao simulates and what compressed-tensors stores.

Each scheme pairs a torchao post-training config (handed to ``QATConfig`` so that
torchao infers the fake quantizers itself) with the weight fake-quantize config
that torchao infers from it, and with the compressed-tensors description of the
export (format, weight and activation arguments). torchao is imported lazily so
that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

SchemeName = Literal["int4_weight_only", "int8_dynamic_act_int4_weight", "int8_weight_only"]

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme, from training to the compressed-tensors export."""

    name: str
    #: Bits per weight value (signed, symmetric).
    weight_bits: int
    #: ``"group"`` (scales per ``group_size`` inputs) or ``"channel"`` (one per output row).
    granularity: Literal["group", "channel"]
    #: Whether activations are fake-quantized (int8, per token, asymmetric, dynamic).
    int8_activations: bool
    #: compressed-tensors storage format of the export.
    ct_format: str

    @property
    def qmin(self) -> int:
        """Smallest integer value of a weight."""
        return -(1 << (self.weight_bits - 1))

    @property
    def qmax(self) -> int:
        """Largest integer value of a weight."""
        return (1 << (self.weight_bits - 1)) - 1

    @property
    def packed(self) -> bool:
        """Whether the export packs weights into int32 words (``weight_packed``)."""
        return self.ct_format == PACK_QUANTIZED

    def group_size_for(self, in_features: int, group_size: int) -> int:
        """Inputs that share one scale: ``group_size``, or all of them per channel."""
        return group_size if self.granularity == "group" else in_features

    # -- torchao ------------------------------------------------------------------

    def base_config(self, group_size: int) -> Any:
        """The torchao PTQ config that ``QATConfig(base, step="prepare")`` receives."""
        import torch
        from torchao.quantization import (
            Int8DynamicActivationIntxWeightConfig,
            IntxWeightOnlyConfig,
            PerAxis,
            PerGroup,
        )

        dtype = getattr(torch, f"int{self.weight_bits}")
        granularity = PerGroup(group_size) if self.granularity == "group" else PerAxis(0)
        if self.int8_activations:
            return Int8DynamicActivationIntxWeightConfig(
                weight_dtype=dtype, weight_granularity=granularity
            )
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)

    def weight_fake_quantize_config(self, group_size: int) -> Any:
        """The ``IntxFakeQuantizeConfig`` torchao infers for the weights of ``base_config``.

        The export builds its fake quantizer from this config, so scales and integer
        values come from the same torchao code the training forward ran.
        """
        import torch
        from torchao.quantization import MappingType, PerAxis, PerGroup
        from torchao.quantization.qat import IntxFakeQuantizeConfig

        return IntxFakeQuantizeConfig(
            dtype=getattr(torch, f"int{self.weight_bits}"),
            granularity=PerGroup(group_size) if self.granularity == "group" else PerAxis(0),
            mapping_type=MappingType.SYMMETRIC,
            scale_precision=None,
        )

    # -- compressed-tensors -------------------------------------------------------

    def weights_args(self, group_size: int) -> dict[str, Any]:
        """compressed-tensors ``QuantizationArgs`` of the weights, as JSON."""
        return {
            "num_bits": self.weight_bits,
            "type": "int",
            "symmetric": True,
            "group_size": group_size if self.granularity == "group" else None,
            "strategy": self.granularity,
            "dynamic": False,
        }

    def input_activations_args(self) -> dict[str, Any] | None:
        """compressed-tensors ``QuantizationArgs`` of the inputs (None: not quantized)."""
        if not self.int8_activations:
            return None
        return {
            "num_bits": 8,
            "type": "int",
            "symmetric": False,
            "group_size": None,
            "strategy": "token",
            "dynamic": True,
        }


SCHEMES: dict[str, Scheme] = {
    "int4_weight_only": Scheme("int4_weight_only", 4, "group", False, PACK_QUANTIZED),
    "int8_dynamic_act_int4_weight": Scheme(
        "int8_dynamic_act_int4_weight", 4, "group", True, INT_QUANTIZED
    ),
    "int8_weight_only": Scheme("int8_weight_only", 8, "channel", False, PACK_QUANTIZED),
}


def get_scheme(name: str) -> Scheme:
    """The :class:`Scheme` called ``name`` (the config has validated it)."""
    return SCHEMES[name]
