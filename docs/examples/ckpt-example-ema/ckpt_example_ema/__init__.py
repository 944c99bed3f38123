"""An example ckpt converter: exponential moving average (EMA) of linear weights.

Hooks used: ``convert`` (adds a ``weight_ema`` buffer to each linear),
``key_filter`` (owns those buffers), ``state_dict_transform`` (export the EMA
in place of the raw weight) and ``post_optimizer_step`` (update the EMA).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from ckpt_core import Converter, ConverterOptions, hookimpl

SUFFIX = ".weight_ema"


class EMAConfig(ConverterOptions):
    """``[converters.ema]``."""

    decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per optimizer step.")
    export_ema: bool = Field(True, description="Export the averaged weights instead of raw.")


class EMAConverter(Converter):
    """Keeps ``<linear>.weight_ema`` = decay·ema + (1-decay)·weight."""

    name: ClassVar[str] = "ema"
    Config = EMAConfig

    @hookimpl
    def convert(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, nn.Linear) and not hasattr(module, "weight_ema"):
                module.register_buffer("weight_ema", module.weight.detach().clone())

    @hookimpl
    def key_filter(self, fqn: str) -> bool:
        return fqn.endswith(SUFFIX)

    @hookimpl
    def state_dict_transform(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in state_dict.items() if not k.endswith(SUFFIX)}
        if self.config.export_ema:
            for key, value in state_dict.items():
                if key.endswith(SUFFIX):
                    out[key[: -len(SUFFIX)] + ".weight"] = value
        return out

    @hookimpl
    def post_optimizer_step(self, model_parts: list[nn.Module]) -> None:
        decay = self.config.decay
        with torch.no_grad():
            for part in model_parts:
                for module in part.modules():
                    ema = getattr(module, "weight_ema", None)
                    if isinstance(ema, torch.Tensor):
                        ema.lerp_(module.weight.detach(), 1.0 - decay)
