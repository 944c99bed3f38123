"""Model families by registry name: how to build a model and its state-dict adapter.

``ckpt convert`` and the reference trainer pick a family from an HF
``config.json`` (``model_type``/``architectures``) or from a manifest's
``{"adapter": <name>, "config": {...}}`` entry. The reference Llama is
registered as ``"llama"``; other projects add theirs with
:func:`register_model_family`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ckpt_core.adapter import StateDictAdapter
from ckpt_core.errors import ConfigError


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: builders keyed by the HF ``config.json`` dict."""

    name: str
    #: ``config.json`` dict → the model's state-dict adapter.
    adapter: Callable[[dict[str, Any]], StateDictAdapter]
    #: ``(config.json dict, device)`` → a model (parameters may be uninitialized on "meta").
    build_model: Callable[..., nn.Module]
    #: HF ``model_type`` values this family reads.
    model_types: tuple[str, ...] = ()


_FAMILIES: dict[str, ModelFamily] = {}


def register_model_family(family: ModelFamily) -> None:
    """Add (or replace) a model family under ``family.name``."""
    _FAMILIES[family.name] = family


def _ensure_builtin() -> None:
    if "llama" not in _FAMILIES:
        from ckpt_core.reference import LlamaStateDictAdapter, build_model

        register_model_family(
            ModelFamily(
                name=LlamaStateDictAdapter.registry_name,
                adapter=LlamaStateDictAdapter.from_hf_config,
                build_model=lambda config, device=None: build_model(config, device=device),
                model_types=("llama",),
            )
        )


def model_family(name: str) -> ModelFamily:
    """The family registered as ``name``; unknown names list the registered ones."""
    _ensure_builtin()
    if name not in _FAMILIES:
        raise ConfigError(
            f"Unknown model adapter {name!r}; registered: {', '.join(sorted(_FAMILIES))}. "
            "Register it with ckpt_core.adapters.register_model_family."
        )
    return _FAMILIES[name]


def family_for_hf_config(config: dict[str, Any]) -> ModelFamily:
    """The family whose ``model_types`` include the config's ``model_type``."""
    _ensure_builtin()
    model_type = config.get("model_type")
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in _FAMILIES.values() for t in f.model_types)
    raise ConfigError(
        f"config.json model_type {model_type!r} has no registered model family; known: "
        f"{', '.join(known)}."
    )
