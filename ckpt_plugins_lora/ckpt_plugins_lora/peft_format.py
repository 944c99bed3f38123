"""The PEFT LoRA format: ``adapter_config.json`` and ``adapter_model.safetensors``.

Key names follow what ``peft`` writes for a causal LM::

    layers.0.attention.wq.lora_a.weight  (native, r x in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (PEFT, same tensor)

The HF module path comes from the model's adapter (``hf_key`` of the module's
``weight`` key), so the mapping holds for any model the core can export. No
tensor is permuted: the reference Llama's rotary layout already equals HF's.
Reading also accepts the in-memory PEFT names with an adapter name
(``...q_proj.lora_A.default.weight``). This module never imports ``peft``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ckpt_core.plugin_api import (
    CheckpointError,
    DamagedCheckpointError,
    StateDictAdapter,
    path_exists,
    path_join,
    read_json_object,
)
from ckpt_plugins_lora.layers import LORA_A, LORA_B

PEFT_PREFIX = "base_model.model."
ADAPTER_SUBFOLDER = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: native factor name <-> PEFT factor name
NATIVE_TO_PEFT = {LORA_A: "lora_A", LORA_B: "lora_B"}
PEFT_TO_NATIVE = {v: k for k, v in NATIVE_TO_PEFT.items()}


def peft_adapter_config(
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Iterable[str],
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` dict PEFT's ``LoraConfig`` loads without warnings.

    Fields left out take PEFT's defaults (plain LoRA: no DoRA, no rsLoRA, no
    bias training, no layer patterns).
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(set(target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


class PeftLoraAdapter(StateDictAdapter):
    """Writes and reads LoRA factors in the PEFT format (``adapter/`` subfolder).

    Args:
        modules: canonical native names of the adapted linears (recorded at
            convert time), e.g. ``layers.0.attention.wq``.
        config: the LoRA options (``rank``, ``alpha``, ``dropout``).
        model_adapter: the model's adapter, for HF module names; ``None`` keeps
            native names.
        base_model_name_or_path: recorded in ``adapter_config.json`` when known.
    """

    subfolder = ADAPTER_SUBFOLDER

    def __init__(
        self,
        modules: Iterable[str],
        *,
        rank: int,
        alpha: float,
        dropout: float,
        model_adapter: StateDictAdapter | None,
        base_model_name_or_path: str | None = None,
    ) -> None:
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.model_adapter = model_adapter
        self.base_model_name_or_path = base_model_name_or_path
        self._native_to_hf = {m: self._hf_module(m) for m in sorted(set(modules))}
        self._hf_to_native = {hf: m for m, hf in self._native_to_hf.items()}

    # -- names ----------------------------------------------------------------

    def _hf_module(self, module: str) -> str:
        if self.model_adapter is None:
            return module
        weight = self.model_adapter.hf_key(f"{module}.weight")
        if not weight.endswith(".weight"):
            raise CheckpointError(
                f"The model adapter names {module + '.weight'!r} {weight!r}, which does not "
                "end in '.weight'; LoRA cannot derive the HF module name from it."
            )
        return weight[: -len(".weight")]

    def _native_module(self, hf_module: str) -> str:
        native = self._hf_to_native.get(hf_module)
        if native is not None:
            return native
        known = sorted(self._hf_to_native) or ["(none: the model was not converted)"]
        raise CheckpointError(
            f"PEFT adapter key for module {hf_module!r} has no LoRA target in this model. "
            f"Adapted modules: {known[:8]}{' ...' if len(known) > 8 else ''}. Set "
            "converters.lora.target_modules to the adapter's target_modules (native names)."
        )

    @property
    def hf_target_modules(self) -> list[str]:
        """HF leaf names of the adapted modules (``q_proj``, ``v_proj``, ...)."""
        return sorted({hf.rsplit(".", 1)[-1] for hf in self._native_to_hf.values()})

    # -- StateDictAdapter -----------------------------------------------------

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in state_dict.items():
            module, factor, param = _split_native(key)
            hf_module = self._native_to_hf.get(module)
            if hf_module is None:
                hf_module = self._native_to_hf.setdefault(module, self._hf_module(module))
                self._hf_to_native[hf_module] = module
            out[f"{PEFT_PREFIX}{hf_module}.{NATIVE_TO_PEFT[factor]}.{param}"] = value
        return out

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in hf_state_dict.items():
            hf_module, factor = _split_peft(key)
            out[f"{self._native_module(hf_module)}.{factor}.weight"] = value
        return out

    def file_name(self) -> str:
        return ADAPTER_WEIGHTS

    def extra_files(self) -> dict[str, str | bytes]:
        config = peft_adapter_config(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.hf_target_modules,
            base_model_name_or_path=self.base_model_name_or_path,
        )
        return {ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True) + "\n"}

    def check_source(self, folder: str) -> None:
        """Refuse a PEFT adapter whose ``r``/``lora_alpha`` differ from the converter's.

        A different rank would fail on shapes anyway; a different alpha would
        load silently and scale every update wrongly. ``adapter_config.json``
        must be a regular file inside ``folder`` holding a JSON object whose
        ``r`` and ``lora_alpha`` are positive numbers; else a one-line
        :class:`DamagedCheckpointError`. The weights go through the HF reader's
        own checks (:mod:`ckpt_core.storage.hf_reader`).
        """
        path = path_join(folder, ADAPTER_CONFIG)
        if not path_exists(path):
            return  # bare safetensors: nothing to compare against
        source = read_json_object(folder, ADAPTER_CONFIG)
        for field, option, ours in (("r", "rank", self.rank), ("lora_alpha", "alpha", self.alpha)):
            theirs = source.get(field)
            if theirs is None:
                continue
            if type(theirs) not in (int, float) or not 0 < theirs < float("inf"):
                raise DamagedCheckpointError(
                    f"PEFT adapter {path} has {field} = {theirs!r}; it must be a positive "
                    "number. The adapter is damaged."
                )
            if float(theirs) != float(ours):
                raise CheckpointError(
                    f"PEFT adapter {path} has {field} = {theirs}, but converters.lora option "
                    f"{option!r} is {ours}. Set [converters.lora] {option} = {theirs} to "
                    "load this adapter as it was trained."
                )

    def describe(self) -> dict[str, Any]:
        return {"format": "peft-lora", "target_modules": self.hf_target_modules}


def _split_native(key: str) -> tuple[str, str, str]:
    """``layers.0.attention.wq.lora_a.weight`` -> (module, factor, param)."""
    parts = key.rsplit(".", 2)
    if len(parts) != 3 or parts[1] not in NATIVE_TO_PEFT or parts[2] != "weight":
        raise CheckpointError(
            f"Key {key!r} is not a LoRA factor (expected '<module>.lora_a.weight' or "
            "'<module>.lora_b.weight'); only keys the lora converter owns go through its adapter."
        )
    return parts[0], parts[1], parts[2]


def _split_peft(key: str) -> tuple[str, str]:
    """PEFT key -> (HF module path, native factor name)."""
    if not key.startswith(PEFT_PREFIX):
        raise CheckpointError(
            f"PEFT adapter key {key!r} does not start with {PEFT_PREFIX!r}; is this a PEFT "
            "LoRA adapter for a causal LM (adapter_model.safetensors)?"
        )
    parts = key[len(PEFT_PREFIX) :].split(".")
    # <module...>.lora_A.weight  or  <module...>.lora_A.<adapter name>.weight
    for tail in (2, 3):
        if len(parts) > tail and parts[-tail] in PEFT_TO_NATIVE and parts[-1] == "weight":
            return ".".join(parts[:-tail]), PEFT_TO_NATIVE[parts[-tail]]
    raise CheckpointError(
        f"PEFT adapter key {key!r} is not a LoRA A/B weight; only plain LoRA on linears is "
        "supported (no DoRA magnitudes, LoRA biases, embeddings or modules_to_save)."
    )
