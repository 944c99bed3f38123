"""Options of the QAT converter."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ckpt_core.converter import ConverterConfig

DEFAULT_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


class QATConfig(ConverterConfig):
    """``[converters.qat]``."""

    scheme: Literal["int4_weight_only", "int8_dynamic_act_int4_weight", "int8_weight_only"] = Field(
        "int4_weight_only", description="Quantization scheme trained for and exported."
    )
    group_size: int = Field(
        128, gt=0, description="Weights per scale group; must divide targeted in-features."
    )
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description="Native leaf names of the linears to quantize (output stays unquantized).",
    )
