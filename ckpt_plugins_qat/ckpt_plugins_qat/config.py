"""Options of the QAT converter."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ckpt_core.plugin_api import ConverterOptions

DEFAULT_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
#: Leaf names that must stay unquantized (the output projection / ``lm_head``).
NEVER_TARGETED = ("output", "lm_head", "tok_embeddings", "embed_tokens")


class QATConfig(ConverterOptions):
    """``[converters.qat]``."""

    scheme: Literal["int4_weight_only", "int8_dynamic_act_int4_weight", "int8_weight_only"] = Field(
        "int4_weight_only",
        description=(
            "Quantization scheme trained for and exported: int4_weight_only (int4 groups, "
            "compressed-tensors W4A16 pack-quantized), int8_dynamic_act_int4_weight (int4 "
            "groups with int8 per-token activations, int-quantized) or int8_weight_only (int8 "
            "per output channel, W8A16 pack-quantized)."
        ),
    )
    group_size: int = Field(
        128,
        ge=2,
        description=(
            "Weights per scale group (int4 schemes); must divide every targeted layer's "
            "in-features. Ignored by int8_weight_only, which has one scale per output channel."
        ),
    )
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description=(
            "Native leaf names of the linears to quantize; `output` (lm_head) and the "
            "embeddings always stay unquantized. MoE: stacked expert weights named here "
            "(moe.experts.w1/w2/w3) are fake-quantized expert by expert and exported per "
            "expert with weight-only schemes; with int8_dynamic_act_int4_weight, or in a model "
            "without the expert_weight_transforms hook, they are skipped (high precision, "
            "logged); naming a router (moe.router.gate, or a `gate` beside `experts`) is refused."
        ),
    )

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if t in NEVER_TARGETED]
        if bad:
            raise ValueError(
                f"{bad} cannot be quantized (the output projection and embeddings stay in "
                f"high precision); choose among the block linears, e.g. {DEFAULT_TARGETS}"
            )
        dupes = sorted({t for t in value if value.count(t) > 1})
        if dupes:
            raise ValueError(f"{dupes} listed more than once")
        if any(not t or "." in t for t in value):
            raise ValueError(f"targets are leaf module names without dots (e.g. 'wq'), got {value}")
        return value
