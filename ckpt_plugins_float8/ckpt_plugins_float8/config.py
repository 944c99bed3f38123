"""Options of the Float8 converter (``[converters.float8]``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckpt_core.converter import ConverterConfig

RECIPES = ("tensorwise", "rowwise")


class Float8Config(ConverterConfig):
    """``[converters.float8]``."""

    recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise",
        description=(
            "torchao float8 training recipe: 'tensorwise' (one dynamic scale per tensor) or "
            "'rowwise' (one power-of-two scale per row)."
        ),
    )
    filter_fqns: list[str] = Field(
        default_factory=lambda: ["output"],
        description=(
            "Linears whose FQN contains one of these strings stay high precision; linears whose "
            "in/out features are not divisible by 16 are always skipped (and logged)."
        ),
    )
    enable_fsdp_float8_all_gather: bool = Field(
        False,
        description=(
            "All-gather FSDP2 weights in float8 (tensorwise only); scales are precomputed after "
            "each optimizer step."
        ),
    )
    emulate: Literal["auto"] | bool = Field(
        "auto",
        description=(
            "Emulate float8 matmuls in fp32: true, false, or 'auto' (emulate when no CUDA GPU "
            "with compute capability >= 8.9 is present)."
        ),
    )
    export: Literal["high_precision", "fp8"] = Field(
        "high_precision",
        description=(
            "Export view of converted linears: 'high_precision' master weights (unchanged) or "
            "'fp8' compressed-tensors float-quantized weights with weight_scale."
        ),
    )

    @model_validator(mode="after")
    def _all_gather_needs_tensorwise(self) -> Float8Config:
        if self.enable_fsdp_float8_all_gather and self.recipe != "tensorwise":
            raise ValueError(
                f"enable_fsdp_float8_all_gather=true needs recipe 'tensorwise' (got "
                f"recipe={self.recipe!r}); torchao's float8 all-gather has per-tensor scales "
                "only. Set recipe = 'tensorwise' or enable_fsdp_float8_all_gather = false."
            )
        return self
