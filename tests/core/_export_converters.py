"""Two tiny converters that exercise the export routing, for HF interop tests.

* ``intcodes`` adds an int8 buffer ``codes`` to every ``wq``; it owns those keys
  and its adapter (no subfolder) puts them into the model files under the
  module's HF name, and adds ``codes_config`` to ``config.json``.
* ``sidecar`` adds an unused ``sidecar`` linear to every ``wq``; it owns those
  keys, drops them from the export view, and its adapter writes them from the
  full view into ``adapter/adapter_model.safetensors`` with a JSON file beside.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ckpt_core import Converter, StateDictAdapter, hookimpl

SIDE_PREFIX = "base_model.model."


def _wq_modules(model: nn.Module):
    return [m for name, m in model.named_modules() if name.endswith("attention.wq")]


class CodesAdapter(StateDictAdapter):
    def __init__(self, model_adapter: StateDictAdapter) -> None:
        self.model_adapter = model_adapter

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {self.model_adapter.hf_key(k): v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return self.model_adapter.from_hf(hf_state_dict)

    def update_hf_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "codes_config": {"bits": 8}}


class IntCodesConverter(Converter):
    name = "intcodes"

    @hookimpl
    def convert(self, model: nn.Module) -> None:
        for i, module in enumerate(_wq_modules(model)):
            codes = (torch.arange(module.weight.shape[0]) % 100 + i).to(torch.int8)
            module.register_buffer("codes", codes)

    @hookimpl
    def key_filter(self, fqn: str) -> bool:
        return fqn.endswith(".codes")

    @hookimpl
    def state_dict_adapter(self, model_adapter: StateDictAdapter) -> StateDictAdapter:
        return CodesAdapter(model_adapter)


class SidecarAdapter(StateDictAdapter):
    subfolder = "adapter"

    def __init__(self, model_adapter: StateDictAdapter) -> None:
        self.model_adapter = model_adapter

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {SIDE_PREFIX + self.model_adapter.hf_key(k): v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        stripped = {k.removeprefix(SIDE_PREFIX): v for k, v in hf_state_dict.items()}
        return self.model_adapter.from_hf(stripped)

    def file_name(self) -> str:
        return "adapter_model.safetensors"

    def extra_files(self) -> dict[str, str | bytes]:
        return {"adapter_config.json": json.dumps({"peft_type": "SIDECAR"})}


class SidecarConverter(Converter):
    name = "sidecar"

    @hookimpl
    def convert(self, model: nn.Module) -> None:
        for module in _wq_modules(model):
            module.sidecar = nn.Linear(module.in_features, 4, bias=False)

    @hookimpl
    def key_filter(self, fqn: str) -> bool:
        return ".sidecar." in fqn

    @hookimpl
    def state_dict_transform(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state_dict.items() if ".sidecar." not in k}

    @hookimpl
    def state_dict_adapter(self, model_adapter: StateDictAdapter) -> StateDictAdapter:
        return SidecarAdapter(model_adapter)
