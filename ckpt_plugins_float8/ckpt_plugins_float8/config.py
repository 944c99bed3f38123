"""Options of the Float8 converter."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ckpt_core.converter import ConverterConfig


class Float8Config(ConverterConfig):
    """``[converters.float8]``."""

    recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise", description="Scaling recipe of torchao's float8 training."
    )
    filter_fqns: list[str] = Field(
        default_factory=lambda: ["output"],
        description="Linears whose FQN contains one of these stay high precision.",
    )
    enable_fsdp_float8_all_gather: bool = Field(
        False, description="All-gather FSDP2 weights in float8 (tensorwise only)."
    )
    emulate: Literal["auto"] | bool = Field(
        "auto", description="Emulate float8 matmuls; 'auto': where no float8 GPU is present."
    )
    export: Literal["high_precision", "fp8"] = Field(
        "high_precision", description="Export high-precision weights or fp8 (compressed-tensors)."
    )
