"""``LlamaStateDictAdapter``: reference Llama names ↔ Hugging Face Llama names.

The adapter maps module paths and keeps whatever follows them, so converter
keys ride along: ``layers.0.attention.wq.weight_packed`` becomes
``model.layers.0.self_attn.q_proj.weight_packed`` and
``layers.0.attention.wq.lora_a.weight`` becomes
``model.layers.0.self_attn.q_proj.lora_a.weight``. The rotary layouts match,
so tensors pass through unchanged (no q/k permutation).
"""

from __future__ import annotations

import re
from typing import Any

from ckpt_core.adapter import StateDictAdapter
from ckpt_core.errors import CheckpointError
from ckpt_core.reference import hf_config
from ckpt_core.reference.model import ModelArgs

# Per-layer module paths: native → HF (after ``layers.N.`` / ``model.layers.N.``).
_LAYER_MODULES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
_TOP_MODULES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}

_NATIVE_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_LAYER_REVERSE = {v: k for k, v in _LAYER_MODULES.items()}
_HF_TOP_REVERSE = {v: k for k, v in _TOP_MODULES.items()}


def _rename(path: str, table: dict[str, str]) -> str | None:
    """Replace the module path at the start of ``path`` using ``table``; keep the rest."""
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    return None


def native_to_hf_key(fqn: str) -> str | None:
    """HF name of a native key, or ``None`` when the key is not a Llama module path."""
    m = _NATIVE_LAYER.match(fqn)
    if m:
        rest = _rename(m.group(2), _LAYER_MODULES)
        return None if rest is None else f"model.layers.{m.group(1)}.{rest}"
    return _rename(fqn, _TOP_MODULES)


def hf_to_native_key(name: str) -> str | None:
    """Native name of an HF key, or ``None`` when the key is not a Llama module path."""
    m = _HF_LAYER.match(name)
    if m:
        rest = _rename(m.group(2), _HF_LAYER_REVERSE)
        return None if rest is None else f"layers.{m.group(1)}.{rest}"
    return _rename(name, _HF_TOP_REVERSE)


class LlamaStateDictAdapter(StateDictAdapter):
    """Converts reference-Llama state dicts to and from Hugging Face Llama ones."""

    registry_name = "llama"
    #: Where the HF weights came from, when known; converter adapters may record it
    #: (LoRA writes it as ``base_model_name_or_path`` in ``adapter_config.json``).
    name_or_path: str | None = None

    def __init__(self, args: ModelArgs) -> None:
        self.args = args

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> LlamaStateDictAdapter:
        """Adapter for the architecture a ``config.json`` dict describes."""
        return cls(hf_config.from_hf_config(config))

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for fqn, value in state_dict.items():
            name = native_to_hf_key(fqn)
            if name is None:
                raise CheckpointError(
                    f"Key {fqn!r} is not part of the reference Llama and no converter owns "
                    "it, so it has no Hugging Face name. Known module paths: "
                    f"{', '.join(_TOP_MODULES)}, layers.N.{{{', '.join(_LAYER_MODULES)}}}."
                )
            out[name] = value
        return out

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in hf_state_dict.items():
            fqn = hf_to_native_key(name)
            if fqn is None:
                raise CheckpointError(
                    f"Key {name!r} is not a Hugging Face Llama weight the reference model "
                    "knows (model.embed_tokens, model.layers.N.*, model.norm, lm_head)."
                )
            if self.args.tie_word_embeddings and fqn.startswith("output."):
                continue  # tied: lm_head is tok_embeddings
            out[fqn] = value
        return out

    def hf_key(self, fqn: str) -> str:
        name = native_to_hf_key(fqn)
        if name is None:
            raise CheckpointError(f"Key {fqn!r} has no Hugging Face Llama name.")
        return name

    def hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """The ``config.json`` dict for this architecture."""
        return hf_config.to_hf_config(self.args, dtype)

    def update_hf_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The model's ``config.json``; keys already in ``config`` (e.g. ``dtype``) win."""
        return {**self.hf_config(), **config}

    def describe(self) -> dict[str, Any]:
        return {"adapter": self.registry_name, "config": self.hf_config()}
