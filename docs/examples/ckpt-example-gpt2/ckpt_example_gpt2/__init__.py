"""A ckpt model family: the small GPT-2 of :mod:`ckpt_example_gpt2.model`, read and
written as Hugging Face ``gpt2``.

ckpt finds it through the entry point ``gpt2 = "ckpt_example_gpt2:gpt2_family"``
in the ``ckpt_core.model_families`` group; :func:`gpt2_family` returns the
:class:`~ckpt_core.plugin_api.ModelFamily`, which names four things:

* ``adapter``: ``config.json`` dict → :class:`GPT2StateDictAdapter` (the key map);
* ``build_model``: ``(config.json dict, device=None)`` → the model;
* ``model_types``: the HF ``model_type`` values it reads (``gpt2``);
* ``flavors`` / ``config_for``: named sizes for ``ckpt convert --model``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ckpt_core.plugin_api import (
    CheckpointError,
    ConfigError,
    ModelFamily,
    StateDictAdapter,
    read_hf_config,
)
from ckpt_example_gpt2.model import GPT2Args, TinyGPT2

NAME = "gpt2"

# Native module path → HF module path; the rest of a key (".weight", or a
# converter's ".lora_a.weight") is kept. "N" is the block index.
TOP = {"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe", "norm": "transformer.ln_f"}
BLOCK = {
    "norm_attn": "ln_1",
    "qkv": "attn.c_attn",
    "attn_out": "attn.c_proj",
    "norm_mlp": "ln_2",
    "mlp_in": "mlp.c_fc",
    "mlp_out": "mlp.c_proj",
}
FLAVORS = {
    "tiny": GPT2Args(),
    "small": GPT2Args(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
}


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def to_hf_key(key: str) -> str | None:
    """``blocks.0.qkv.weight`` → ``transformer.h.0.attn.c_attn.weight``; ``None`` if unknown."""
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        rest = _rename(rest, BLOCK)
        return None if rest is None else f"transformer.h.{index}.{rest}"
    return _rename(key, TOP)


def from_hf_key(name: str) -> str | None:
    """The inverse of :func:`to_hf_key`."""
    if name.startswith("transformer.h."):
        _, _, index, rest = name.split(".", 3)
        rest = _rename(rest, {v: k for k, v in BLOCK.items()})
        return None if rest is None else f"blocks.{index}.{rest}"
    return _rename(name, {v: k for k, v in TOP.items()})


def args_from_config(config: dict[str, Any]) -> GPT2Args:
    """The model's sizes from a ``gpt2`` ``config.json`` dict; what it cannot run is refused."""
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(
            f"config.json activation_function {config['activation_function']!r}: the example "
            "GPT-2 uses the tanh GELU ('gelu_new')."
        )
    if not config.get("tie_word_embeddings", True):
        raise ConfigError("config.json tie_word_embeddings=false: the example GPT-2 is tied.")
    fields = {f.name for f in dataclasses.fields(GPT2Args)}
    return GPT2Args(**{k: v for k, v in config.items() if k in fields})


class GPT2StateDictAdapter(StateDictAdapter):
    """Native names ↔ Hugging Face ``gpt2`` names, and the ``config.json``."""

    #: Recorded in manifests as the model's ``adapter``: the family's name.
    registry_name = NAME

    def __init__(self, args: GPT2Args) -> None:
        self.args = args

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in state_dict.items():
            name = to_hf_key(key)
            if name is None:
                raise CheckpointError(f"Key {key!r} is not part of the example GPT-2.")
            out[name] = value
        return out

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, value in hf_state_dict.items():
            if name == "lm_head.weight":
                continue  # tied to the token embeddings
            key = from_hf_key(name)
            if key is None:
                raise CheckpointError(f"Key {name!r} is not a gpt2 weight the example knows.")
            out[key] = value
        return out

    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` of a ``GPT2LMHeadModel`` of these sizes."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            **dataclasses.asdict(self.args),
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
            "bos_token_id": self.args.vocab_size - 1,
            "eos_token_id": self.args.vocab_size - 1,
        }

    def update_hf_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {**self.hf_config(), **config}

    def describe(self) -> dict[str, Any]:
        return {"adapter": NAME, "config": self.hf_config()}


def build_model(config: dict[str, Any], device: Any = None) -> nn.Module:
    """The model a ``config.json`` dict describes (``device="meta"``: nothing allocated)."""
    with torch.device(device or "cpu"):
        return TinyGPT2(args_from_config(config))


def config_for(name_or_path: str) -> dict[str, Any]:
    """The ``config.json`` dict of a flavor, an HF ``gpt2`` folder or a ``config.json``."""
    if name_or_path in FLAVORS:
        return GPT2StateDictAdapter(dataclasses.replace(FLAVORS[name_or_path])).hf_config()
    return read_hf_config(name_or_path)


def gpt2_family() -> ModelFamily:
    """The entry point's target: everything ckpt needs to convert this model."""
    return ModelFamily(
        name=NAME,
        adapter=lambda config: GPT2StateDictAdapter(args_from_config(config)),
        build_model=build_model,
        model_types=("gpt2",),
        flavors=tuple(FLAVORS),
        config_for=config_for,
    )
