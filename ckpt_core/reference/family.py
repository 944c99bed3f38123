"""The reference models as model families: ``llama``, ``qwen3`` and ``moe``.

``ckpt-core`` registers them through the same entry point a third party uses
(the ``ckpt_core.model_families`` group of its ``pyproject.toml``), so the
library finds them like any other family and never imports this package.

| family | HF ``model_type`` | native model | flavors |
|---|---|---|---|
| ``llama`` | ``llama`` | :class:`~ckpt_core.reference.model.Transformer` | tiny, debug, small, 1b |
| ``qwen3`` | ``qwen3`` | :class:`~ckpt_core.reference.qwen3.Qwen3Transformer` | tiny, debug |
| ``moe`` | ``qwen3_moe`` | :class:`~ckpt_core.reference.moe.MoETransformer` | tiny, debug |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ckpt_core.content.families import ModelFamily
from ckpt_core.reference import (
    LlamaStateDictAdapter,
    args_from,
    build_model,
    instantiate,
    model_args,
)
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


def qwen3_family() -> ModelFamily:
    """The reference Qwen3: HF ``model_type`` ``qwen3``, flavors ``tiny`` and ``debug``."""
    from ckpt_core.reference.qwen3 import QWEN3_FLAVORS, Qwen3Transformer
    from ckpt_core.reference.qwen3_adapter import Qwen3StateDictAdapter
    from ckpt_core.reference.qwen3_config import qwen3_from_hf_config

    return _native_family(
        Qwen3StateDictAdapter, Qwen3Transformer, qwen3_from_hf_config, QWEN3_FLAVORS, "qwen3"
    )


def moe_family() -> ModelFamily:
    """The reference MoE (stacked experts): HF ``model_type`` ``qwen3_moe``, ``tiny``/``debug``."""
    from ckpt_core.reference.moe import MOE_FLAVORS, MoETransformer
    from ckpt_core.reference.qwen3_adapter import MoEStateDictAdapter
    from ckpt_core.reference.qwen3_config import moe_from_hf_config

    return _native_family(
        MoEStateDictAdapter, MoETransformer, moe_from_hf_config, MOE_FLAVORS, "qwen3_moe"
    )


def _native_family(
    adapter: type[LlamaStateDictAdapter],
    model_class: type[nn.Module],
    parse: Callable[..., Any],
    flavors: dict[str, Any],
    model_type: str,
) -> ModelFamily:
    """A family built on the reference model: its adapter, model class, parser and flavors."""
    from ckpt_core.reference.qwen3 import flavor

    name = adapter.registry_name

    def args(name_or_path: str | dict[str, Any]) -> Any:
        return args_from(name_or_path, parse, flavors, lambda n: flavor(flavors, n, name))

    def build(config: dict[str, Any], device: Any = None) -> nn.Module:
        return instantiate(model_class, args(config), device=device)

    def config_for(name_or_path: str) -> dict[str, Any]:
        return adapter(args(name_or_path)).hf_config()

    def check(config: dict[str, Any], source: str = "config.json") -> None:
        parse(config, source=source)

    return ModelFamily(
        name=name,
        adapter=adapter.from_hf_config,
        build_model=build,
        model_types=(model_type,),
        flavors=tuple(flavors),
        config_for=config_for,
        check_config=check,
    )
