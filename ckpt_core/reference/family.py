"""The reference Llama as a model family.

``ckpt-core`` registers it through the same entry point a third party uses
(``llama`` in the ``ckpt_core.model_families`` group of its ``pyproject.toml``),
so the library finds it like any other family and never imports this package.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ckpt_core.adapters import ModelFamily
from ckpt_core.reference import LlamaStateDictAdapter, build_model, model_args
from ckpt_core.reference.flavors import FLAVORS
from ckpt_core.reference.hf_config import check_sizes


def _build(config: dict[str, Any], device: Any = None) -> nn.Module:
    return build_model(config, device=device)


def _config_for(name_or_path: str) -> dict[str, Any]:
    """The ``config.json`` of a flavor, an HF Llama folder or a config file (normalized)."""
    return LlamaStateDictAdapter(model_args(name_or_path)).hf_config()


def llama_family() -> ModelFamily:
    """The reference Llama: HF ``model_type`` ``llama``, flavors ``tiny`` to ``1b``."""
    return ModelFamily(
        name=LlamaStateDictAdapter.registry_name,
        adapter=LlamaStateDictAdapter.from_hf_config,
        build_model=_build,
        model_types=("llama",),
        flavors=tuple(FLAVORS),
        config_for=_config_for,
        check_config=check_sizes,
    )
