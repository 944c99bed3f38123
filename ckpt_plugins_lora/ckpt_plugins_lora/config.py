"""Options of the LoRA converter."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ckpt_core.plugin_api import ConverterOptions, comma_list

DEFAULT_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


class LoRAConfig(ConverterOptions):
    """``[converters.lora]``."""

    rank: int = Field(8, gt=0, description="Rank r of the A (r×in) and B (out×r) matrices.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: updates are (alpha/r)·B·A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description=(
            "Native leaf names of the linears to adapt (wq, wk, wv, wo, w1, w2, w3). Stacked MoE "
            "expert weights (3-D moe.experts.w1/w2/w3, not nn.Linear) are skipped and stay "
            "frozen: on an MoE model LoRA adapts the attention (and any dense feed-forward); "
            "the router (gate) only when named."
        ),
    )
    export: Literal["merged", "adapter", "both"] = Field(
        "both",
        description=(
            "'merged': merged weights only; 'adapter': unmerged base weights plus a PEFT "
            "adapter folder; 'both': merged weights plus a PEFT adapter for the original base."
        ),
    )
    trainable_only_checkpoints: bool = Field(
        False,
        description=(
            "Interval checkpoints hold only the adapters and their optimizer state; resume "
            "reloads the base from checkpoint.initial_load (checksum-checked)."
        ),
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        value = comma_list(value)
        if isinstance(value, list):
            value = list(dict.fromkeys(value))  # drop repeats, keep order
        return value
