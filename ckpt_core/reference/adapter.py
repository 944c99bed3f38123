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

from ckpt_core.errors import CheckpointError
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter
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


def _rename(path: str, table: dict[str, str]) -> str | None:
    """Replace the module path at the start of ``path`` using ``table``; keep the rest."""
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    return None


class KeyMap:
    """Module paths native ↔ HF: per layer (after ``layers.N.``) and at the top."""

    def __init__(self, layer_modules: dict[str, str], top_modules: dict[str, str]) -> None:
        self.layer_modules, self.top_modules = layer_modules, top_modules
        self._layer_reverse = {v: k for k, v in layer_modules.items()}
        self._top_reverse = {v: k for k, v in top_modules.items()}

    def extended(self, layer_modules: dict[str, str]) -> KeyMap:
        """This map with more per-layer module paths."""
        return KeyMap({**self.layer_modules, **layer_modules}, self.top_modules)

    def to_hf(self, fqn: str) -> str | None:
        """HF name of a native key, or ``None`` when the key is no known module path."""
        m = _NATIVE_LAYER.match(fqn)
        if m:
            rest = _rename(m.group(2), self.layer_modules)
            return None if rest is None else f"model.layers.{m.group(1)}.{rest}"
        return _rename(fqn, self.top_modules)

    def to_native(self, name: str) -> str | None:
        """Native name of an HF key, or ``None`` when the key is no known module path."""
        m = _HF_LAYER.match(name)
        if m:
            rest = _rename(m.group(2), self._layer_reverse)
            return None if rest is None else f"layers.{m.group(1)}.{rest}"
        return _rename(name, self._top_reverse)

    def known(self) -> str:
        """The module paths, for error messages."""
        return f"{', '.join(self.top_modules)}, layers.N.{{{', '.join(self.layer_modules)}}}"


LLAMA_KEYS = KeyMap(_LAYER_MODULES, _TOP_MODULES)


def native_to_hf_key(fqn: str) -> str | None:
    """HF name of a native key, or ``None`` when the key is not a Llama module path."""
    return LLAMA_KEYS.to_hf(fqn)


def hf_to_native_key(name: str) -> str | None:
    """Native name of an HF key, or ``None`` when the key is not a Llama module path."""
    return LLAMA_KEYS.to_native(name)


class LlamaStateDictAdapter(StateDictAdapter):
    """Converts reference-Llama state dicts to and from Hugging Face Llama ones.

    Families built on the reference model subclass it with their own
    :attr:`keys`, :attr:`model_name`, ``from_hf_config`` and ``hf_config``.
    """

    registry_name = "llama"
    #: q/k rows in Hugging Face's rotate-half layout (recorded in manifests).
    rope_layout = "rotate_half"
    #: Native ↔ HF module paths.
    keys: KeyMap = LLAMA_KEYS
    #: The model in error messages.
    model_name = "the reference Llama"
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
            name = self.keys.to_hf(fqn)
            if name is None:
                raise CheckpointError(
                    f"Key {fqn!r} is not part of {self.model_name} and no converter owns "
                    f"it, so it has no Hugging Face name. Known module paths: {self.keys.known()}."
                )
            out[name] = value
        return out

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in hf_state_dict.items():
            fqn = self.keys.to_native(name)
            if fqn is None:
                raise CheckpointError(
                    f"Key {name!r} is not a Hugging Face weight {self.model_name} knows "
                    "(model.embed_tokens, model.layers.N.*, model.norm, lm_head)."
                )
            if self.args.tie_word_embeddings and fqn.startswith("output."):
                continue  # tied: lm_head is tok_embeddings
            out[fqn] = value
        return out

    def hf_key(self, fqn: str) -> str:
        name = self.keys.to_hf(fqn)
        if name is None:
            raise CheckpointError(f"Key {fqn!r} has no Hugging Face name in {self.model_name}.")
        return name

    def hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """The ``config.json`` dict for this architecture."""
        return hf_config.to_hf_config(self.args, dtype)

    def update_hf_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The model's ``config.json``; keys already in ``config`` (e.g. ``dtype``) win."""
        return {**self.hf_config(), **config}

    def describe(self) -> dict[str, Any]:
        return {"adapter": self.registry_name, "config": self.hf_config()}
