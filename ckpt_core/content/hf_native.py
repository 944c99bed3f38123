"""Hugging Face-native models: the adapter for a model whose names are already HF's.

A ``transformers.PreTrainedModel`` (``AutoModelForCausalLM.from_config`` or
``from_pretrained``, possibly wrapped by FSDP2's ``fully_shard`` or
``torch.compile``) already uses the names its safetensors files hold: its
canonical state-dict keys (``ModelWrapper`` drops ``_orig_mod.`` and the other
wrapper prefixes) *are* the HF keys. :class:`HFNativeAdapter` therefore keeps
every name, and writes ``config.json`` from the model's own config.

One thing it does change: **tied weights**. A tied model (``tie_word_embeddings``,
Gemma, small Qwen) has one parameter under two names, ``model.embed_tokens.weight``
and ``lm_head.weight``. transformers saves the source only and re-ties the
target when it loads, so the export leaves the target out, and an HF load fills
the source (which the target shares).

**Checkpoint names.** transformers 5 renames some weights as it loads them
and back as it saves them (GPT-NeoX's ``embed_out`` is the model's ``lm_head``;
an MoE layer's per-expert weights are one stacked tensor in the model). The
adapter that offline tools build from a ``config.json`` (:meth:`HFNativeAdapter.from_hf_config`,
what ``ckpt convert`` uses) applies that conversion mapping, so it reads an
HF folder as transformers' ``from_pretrained`` does and writes what
``save_pretrained`` writes; the adapter of a live model (the manager's) keeps
names as they are, which transformers loads as well.

The manager picks this adapter by itself when ``sd_adapter`` is ``None`` and a
model part is a ``PreTrainedModel`` (:func:`adapter_for`). transformers is an
optional dependency: this module imports it only when asked to build a model
from a config dict, and recognizes a model without importing it (a model that
is a ``PreTrainedModel`` means transformers is already imported).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

from torch import nn

from ckpt_core.content.model_wrapper import canonical_fqn
from ckpt_core.errors import ConfigError
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter

logger = logging.getLogger(__name__)

#: Name in manifests (``{"adapter": "hf", "config": {...}}``) and, later, in the family registry.
REGISTRY_NAME = "hf"
#: Entries of ``config.to_dict()`` that describe where a model came from, not what it is.
_DROPPED_CONFIG_KEYS = ("_name_or_path", "_commit_hash", "torch_dtype")


def _pretrained_class() -> type | None:
    """``transformers.PreTrainedModel`` when transformers is imported, else ``None``."""
    module = sys.modules.get("transformers.modeling_utils")
    return getattr(module, "PreTrainedModel", None)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s wrapper (FSDP2 keeps the module itself)."""
    while hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
        module = module._orig_mod
    return module


def find_pretrained(model_parts: nn.Module | Iterable[nn.Module]) -> nn.Module | None:
    """The first model part that is a ``PreTrainedModel``, unwrapped; ``None`` if none is."""
    base = _pretrained_class()
    if base is None:
        return None
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    for part in parts:
        inner = unwrap(part)
        if isinstance(inner, base):
            return inner
    return None


def architecture(model: nn.Module) -> str:
    """The transformers class name (``LlamaForCausalLM``), not FSDP2's ``FSDPLlama...``.

    ``fully_shard`` swaps the module's class for a generated subclass; the
    first class of the MRO that is not FSDP's is the model's own.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        FSDPModule = ()  # type: ignore[assignment]  # noqa: N806
    for cls in type(model).__mro__:
        if not (isinstance(FSDPModule, type) and issubclass(cls, FSDPModule)):
            return cls.__name__
    return type(model).__name__  # pragma: no cover


def tied_names(model_parts: nn.Module | Iterable[nn.Module]) -> dict[str, str]:
    """``{target: source}`` for every parameter reachable under two canonical names.

    Found by identity, so it holds whatever the config says and after FSDP2
    (which keeps the two names on one sharded parameter). The source is the
    name transformers keeps (its ``all_tied_weights_keys`` when it has one),
    else the first name in module order.
    """
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    declared: dict[str, str] = {}
    groups: dict[int, list[str]] = {}
    for part in parts:
        declared.update(getattr(unwrap(part), "all_tied_weights_keys", None) or {})
        for name, param in part.named_parameters(remove_duplicate=False):
            names = groups.setdefault(id(param), [])
            fqn = canonical_fqn(name)
            if fqn not in names:
                names.append(fqn)
    tied: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        sources = [n for n in names if n not in declared] or names
        for name in names:
            if name != sources[0]:
                tied[name] = sources[0]
    return tied


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's ``config.json`` content: its config's ``to_dict()``, JSON-safe.

    Provenance entries (``_name_or_path``) are dropped; ``architectures`` names
    the model's own class.
    """
    config = json.loads(model.config.to_json_string(use_diff=False))
    for key in _DROPPED_CONFIG_KEYS:
        config.pop(key, None)
    config["architectures"] = [architecture(model)]
    return config


class HFNativeAdapter(StateDictAdapter):
    """The identity adapter of a transformers model: native keys are HF keys.

    Args:
        config: the model's ``config.json`` dict (``model_type``, sizes, ``architectures``).
        tied: ``{target: source}`` names of tied parameters; targets are left out
            of exports and HF loads (the source carries the shared tensor).
        name_or_path: where the weights came from, when known (LoRA records it in
            ``adapter_config.json`` as ``base_model_name_or_path``).
        model: a transformers model of this config (the ``meta`` device will do):
            ``to_hf``/``from_hf`` then apply its checkpoint conversion mapping.

    Build it with :meth:`from_model` (the usual way) or :meth:`from_hf_config`
    (offline tools that have only a ``config.json``).
    """

    registry_name = REGISTRY_NAME

    def __init__(
        self,
        config: dict[str, Any],
        tied: dict[str, str] | None = None,
        name_or_path: str | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.config = dict(config)
        self.tied = dict(tied or {})
        self.name_or_path = name_or_path or None
        self.model = model

    @classmethod
    def from_model(cls, model: nn.Module | Iterable[nn.Module]) -> HFNativeAdapter:
        """The adapter of a ``PreTrainedModel`` (or the model parts that hold one).

        Raises :class:`ConfigError` when no part is a ``PreTrainedModel``.
        """
        found = find_pretrained(model)
        if found is None:
            parts = [model] if isinstance(model, nn.Module) else list(model)
            kinds = ", ".join(type(unwrap(p)).__name__ for p in parts) or "no model part"
            raise ConfigError(
                f"HFNativeAdapter.from_model: {kinds} is not a transformers PreTrainedModel; "
                "pass the model built by AutoModelForCausalLM (or the model's own sd_adapter)."
            )
        name = getattr(found, "name_or_path", None) or found.config.to_dict().get("_name_or_path")
        return cls(config_dict(found), tied_names(model), name_or_path=name)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> HFNativeAdapter:
        """The adapter for a ``config.json`` dict (offline tools; imports transformers).

        The tied names come from the model transformers builds for it, on the
        meta device (nothing allocated), so they hold for any architecture; the
        same model gives the checkpoint conversion mapping (names as saved).
        """
        model = build_model(config, device="meta")
        return cls(config, tied_names(model), model=model)

    # -- StateDictAdapter -------------------------------------------------------

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Same names, tied targets left out (transformers re-ties them on load).

        With a ``model``, names (and stacked tensors) as ``save_pretrained`` writes them.
        """
        out = {k: v for k, v in state_dict.items() if k not in self.tied}
        if self.model is not None and out:
            from transformers.core_model_loading import revert_weight_conversion

            out = dict(revert_weight_conversion(self.model, out))
        return out

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """Same names; a tied target in the folder is skipped (its source wins).

        With a ``model``, checkpoint names become the model's as ``from_pretrained`` maps them.
        """
        if self.model is not None and hf_state_dict:
            hf_state_dict = load_conversion(self.model, hf_state_dict)
        return {k: v for k, v in hf_state_dict.items() if k not in self.tied}

    def hf_key(self, fqn: str) -> str:
        """The key itself (tied targets too: a converter may name the module)."""
        return fqn

    def update_hf_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The model's ``config.json``; keys already in ``config`` (e.g. ``dtype``) win."""
        return {**self.config, **config}

    def describe(self) -> dict[str, Any]:
        return {"adapter": self.registry_name, "config": self.config}


def load_conversion(model: nn.Module, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint names (and per-expert tensors) → the model's, by its conversion mapping.

    What transformers' ``from_pretrained`` does to the names it reads, for any
    subset of a checkpoint that holds whole conversion groups (all experts of
    a layer); ``revert_weight_conversion`` is the other way.
    """
    from copy import deepcopy

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        PrefixChange,
        WeightConverter,
        WeightRenaming,
        apply_converters,
        apply_renamings,
        dot_natural_key,
    )

    conversions = [
        c for c in get_model_conversion_mapping(model) if not isinstance(c, PrefixChange)
    ]
    if not conversions:
        return hf_state_dict
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: dict[str, Any] = {}
    for key, value in sorted(hf_state_dict.items(), key=lambda kv: dot_natural_key(kv[0])):
        renamed, pattern = apply_converters(apply_renamings(key, renamings), converters)
        if pattern is not None:
            group = groups.setdefault(renamed, deepcopy(by_pattern[pattern]))
        else:
            group = groups.setdefault(renamed, WeightRenaming(key, renamed))
            pattern = key
        group.add_tensor(renamed, key, pattern, value)
    out: dict[str, Any] = {}
    for first, group in groups.items():
        for name, value in group.convert(first, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out


def adapter_for(model_parts: nn.Module | Iterable[nn.Module]) -> HFNativeAdapter | None:
    """:class:`HFNativeAdapter` when a model part is a ``PreTrainedModel``, else ``None``.

    What the manager uses when it is given no ``sd_adapter``.
    """
    if find_pretrained(model_parts) is None:
        return None
    adapter = HFNativeAdapter.from_model(model_parts)
    logger.info(
        "sd_adapter: %s is a transformers model; HF names are kept (HFNativeAdapter)",
        adapter.config["architectures"][0],
    )
    return adapter


def build_model(config: dict[str, Any], device: Any = None) -> nn.Module:
    """A randomly initialized transformers causal LM for a ``config.json`` dict.

    For offline tools (a model family's ``build_model``); imports transformers.
    """
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "A Hugging Face-native model needs transformers: pip install transformers."
        ) from exc
    import torch

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ConfigError("config.json has no model_type; transformers cannot build the model.")
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device(device or "cpu"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)
