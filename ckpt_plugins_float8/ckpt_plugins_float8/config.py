"""Options of the Float8 converter (``[converters.float8]``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from ckpt_core.plugin_api import ConverterOptions

RECIPES = ("tensorwise", "rowwise")


class Float8Config(ConverterOptions):
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
            "in/out features are not divisible by 16 are always skipped (and logged), and so "
            "are MoE routers (a linear in a `router` module, or a `gate` beside `experts`). "
            "Stacked MoE expert weights (3-D, not nn.Linear) stay high precision."
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
            "Emulate float8 matmuls in fp32: true, false (torch._scaled_mm on a float8 GPU or "
            "the CPU), or 'auto' (emulate when no CUDA GPU with compute capability >= 8.9 is "
            "present)."
        ),
    )
    export: Literal["high_precision", "fp8"] = Field(
        "high_precision",
        description=(
            "Export view of converted linears: 'high_precision' master weights (unchanged) or "
            "'fp8' compressed-tensors float-quantized weights with weight_scale."
        ),
    )

    @field_validator("emulate", mode="before")
    @classmethod
    def _emulate_value(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError("must be 'auto', true or false")

    @field_validator("enable_fsdp_float8_all_gather")
    @classmethod
    def _all_gather_needs_tensorwise(cls, value: bool, info: ValidationInfo) -> bool:
        recipe = info.data.get("recipe")
        if value and recipe is not None and recipe != "tensorwise":
            raise ValueError(
                f"true needs recipe 'tensorwise' (got recipe={recipe!r}); torchao's float8 "
                "all-gather has per-tensor scales only. Set recipe = 'tensorwise' or "
                "enable_fsdp_float8_all_gather = false."
            )
        return value
