"""Converters that each break one rule of the contract kit (``ckpt_core.testing``).

``Averaging`` keeps the contract: the documented EMA example (a buffer per
linear, owned by ``key_filter``, swapped in by a pure transform) plus an adapter
that writes the averages into a folder of their own. Each subclass breaks one
rule, the way a real converter would.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from pydantic import ConfigDict
from torch import nn

from ckpt_core import ConverterOptions, StateDictAdapter, hookimpl
from tests.conftest import REPO_ROOT

# The documented example converter, imported from its source folder.
sys.path.insert(0, str(REPO_ROOT / "docs" / "examples" / "ckpt-example-ema"))
from ckpt_example_ema import EMAConfig, EMAConverter  # noqa: E402

SUFFIX = ".weight_ema"


class RenamingAdapter(StateDictAdapter):
    """Writes ``<module>.weight_ema`` as ``avg.<module>.weight`` and reads it back."""

    subfolder = "averages"

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {"avg." + k.removesuffix(SUFFIX) + ".weight": v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return {
            k.removeprefix("avg.").removesuffix(".weight") + SUFFIX: v
            for k, v in hf_state_dict.items()
        }


class Averaging(EMAConverter):
    """The documented EMA example plus an adapter of its own: keeps the contract."""

    name: ClassVar[str] = "averaging"

    @hookimpl
    def state_dict_adapter(self, model_adapter: StateDictAdapter | None) -> StateDictAdapter:
        return RenamingAdapter()


class AlwaysFalseKeyFilter(Averaging):
    """Owns nothing: its buffers leak into the base view."""

    @hookimpl
    def key_filter(self, fqn: str) -> bool:
        return False


class ClaimsBaseKeys(Averaging):
    """Claims every ``.bias``, which the unconverted model already has."""

    @hookimpl
    def key_filter(self, fqn: str) -> bool:
        return fqn.endswith(SUFFIX) or fqn.endswith(".bias") or fqn.endswith("norm.weight")


class MutatingTransform(Averaging):
    """Writes the average into the live weight instead of a new tensor."""

    @hookimpl
    def state_dict_transform(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in state_dict.items() if not k.endswith(SUFFIX)}
        for key, value in state_dict.items():
            if key.endswith(SUFFIX):
                out[key.removesuffix(SUFFIX) + ".weight"].copy_(value)
        return out


class RandomTransform(Averaging):
    """Adds fresh noise at every call."""

    @hookimpl
    def state_dict_transform(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out = super().state_dict_transform(state_dict)
        return {k: v + torch.rand(()) if k.endswith(".weight") else v for k, v in out.items()}


class HalvingAdapter(RenamingAdapter):
    """Loses precision on the way back."""

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return {k: v.half().float() for k, v in super().from_hf(hf_state_dict).items()}


class LossyAdapter(Averaging):
    """Its adapter does not give back what it took."""

    @hookimpl
    def state_dict_adapter(self, model_adapter: StateDictAdapter | None) -> StateDictAdapter:
        return HalvingAdapter()


class UnnamedExportKey(Averaging):
    """Its export holds a statistic that neither it nor the model adapter can name."""

    @hookimpl
    def state_dict_transform(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out = super().state_dict_transform(state_dict)
        out["averaging_steps"] = torch.tensor([1.0])
        return out


class FreshOnEveryCall(Averaging):
    """Its averages live outside the module's buffers: a state-dict hook hands out
    copies, so a load fills the copies and the averages are never restored."""

    @hookimpl
    def convert(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, nn.Linear) and not hasattr(module, "avg_value"):
                module.avg_value = module.weight.detach().clone()
                module._register_state_dict_hook(_add_average)

    @hookimpl
    def post_optimizer_step(self, model_parts: list[nn.Module]) -> None:
        for part in model_parts:
            for module in part.modules():
                if hasattr(module, "avg_value"):
                    module.avg_value.lerp_(module.weight.detach(), 1.0 - self.config.decay)


def _add_average(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    state_dict[prefix + "weight_ema"] = module.avg_value.clone()


class Wrapped(nn.Module):
    """A linear moved one level down (``wq.weight`` becomes ``wq.inner.weight``)."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class RenamesWeights(Averaging):
    """Wraps every linear, so the base model's keys change name."""

    @hookimpl
    def convert(self, model: nn.Module) -> None:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, child_name, Wrapped(child))


class UnmarkedHook(Averaging):
    """Overrides a hook without ``@hookimpl``: pluggy would never call it."""

    def key_filter(self, fqn: str) -> bool:  # no @hookimpl
        return fqn.endswith(SUFFIX)


class UndescribedConfig(ConverterOptions):
    """An option without a description."""

    decay: float = 0.5
    export_ema: bool = True


class UndescribedOption(Averaging):
    """``ckpt plugins`` would print an option with nothing to say about it."""

    Config = UndescribedConfig


class LaxConfig(EMAConfig):
    """Accepts any option: a typo passes silently."""

    model_config = ConfigDict(extra="allow")


class AcceptsUnknownOptions(Averaging):
    """Its options take typos."""

    Config = LaxConfig


#: broken converter class → the rule id its failure must name
BROKEN = {
    AlwaysFalseKeyFilter: "key_filter-claims-added-keys",
    ClaimsBaseKeys: "key_filter-claims-nothing-before-convert",
    MutatingTransform: "transform-does-not-mutate",
    RandomTransform: "transform-is-deterministic",
    LossyAdapter: "adapter-round-trips",
    UnnamedExportKey: "export-loads-back",
    FreshOnEveryCall: "save-load-bit-exact",
    RenamesWeights: "convert-keeps-model-keys",
    UnmarkedHook: "composes",
    UndescribedOption: "options-validate-and-list",
    AcceptsUnknownOptions: "options-validate-and-list",
}
