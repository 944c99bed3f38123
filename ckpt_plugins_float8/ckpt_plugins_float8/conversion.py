"""Swapping ``nn.Linear`` modules for torchao's ``Float8Linear``.

Which linears convert: every ``nn.Linear`` whose FQN contains none of
``filter_fqns``, that is no MoE router (:func:`ckpt_core.content.experts.router_linears`:
routing stays high precision) and whose in/out features are both divisible by
16 (float8 matmuls need that). Whatever is skipped is logged once, with the
reason. Stacked MoE experts (3-D parameters) are not ``nn.Linear`` and stay
high precision too.

The swapped module keeps the same parameter objects, so the state dict keeps
the same keys, shapes and (high-precision) dtypes: float8 exists only inside
the matmuls. With FSDP float8 all-gather on, each weight is wrapped in
torchao's ``WeightWithDynamicFloat8CastTensor``; the state-dict views unwrap it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ckpt_core.plugin_api import ConfigError, PluginError, canonical_fqn, first_of, router_linears
from ckpt_plugins_float8.config import Float8Config

logger = logging.getLogger(__name__)

#: Float8 matmuls need both dimensions of the weight divisible by this.
DIM_MULTIPLE = 16
#: Smallest CUDA compute capability with float8 tensor cores (Ada, Hopper and later).
MIN_CAPABILITY = (8, 9)


def import_torchao_float8() -> Any:
    """Import ``torchao.float8``; a missing or broken torchao is a :class:`PluginError`."""
    try:
        import torchao.float8 as float8
    except Exception as exc:  # noqa: BLE001 - any import failure means the same fix
        raise PluginError(
            f"Converter 'float8' needs torchao (pip install 'torchao==0.18.0'); importing "
            f"torchao.float8 failed: {type(exc).__name__}: {exc}"
        ) from exc
    return float8


def float8_gpu_present() -> bool:
    """Whether a CUDA GPU with compute capability >= 8.9 is visible."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.get_device_capability() >= MIN_CAPABILITY
    except (RuntimeError, AssertionError):
        return False


def resolve_emulate(option: str | bool) -> bool:
    """Turn the ``emulate`` option into a bool (``"auto"``: emulate without a float8 GPU)."""
    if option == "auto":
        if float8_gpu_present():
            return False
        logger.info(
            "float8: no CUDA GPU with compute capability >= %d.%d found; emulating float8 "
            "matmuls in fp32 (emulate='auto')",
            *MIN_CAPABILITY,
        )
        return True
    if option is False and not float8_gpu_present():
        import torch

        if torch.cuda.is_available():
            cap = ".".join(map(str, torch.cuda.get_device_capability()))
            raise ConfigError(
                "Converter 'float8' option 'emulate': false needs a CUDA GPU with compute "
                f"capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}; the visible GPU has "
                f"{cap}, so its float8 matmuls would fail at the first forward. Set "
                "emulate = 'auto' (or true) to emulate float8 matmuls in fp32."
            )
        logger.info(
            "float8: emulate=false and no CUDA GPU: float8 matmuls run through "
            "torch._scaled_mm on the CPU"
        )
    return bool(option)


def torchao_config(config: Float8Config, emulate: bool) -> Any:
    """The ``Float8LinearConfig`` of ``config.recipe`` with our emulate / all-gather options."""
    float8 = import_torchao_float8()
    base = float8.Float8LinearConfig.from_recipe_name(config.recipe)
    return dataclasses.replace(
        base,
        emulate=emulate,
        enable_fsdp_float8_all_gather=config.enable_fsdp_float8_all_gather,
    )


@dataclass
class Targets:
    """What one conversion did: converted linears (FQN → ``(out, in)``) and skipped ones."""

    converted: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def skip_reason(
    module: nn.Module, fqn: str, filter_fqns: list[str], routers: set[str] | None = None
) -> str | None:
    """Why ``module`` at ``fqn`` stays high precision, or ``None`` when it converts.

    ``routers``: canonical names of the model's MoE router linears.
    """
    hits = [f for f in filter_fqns if f and f in fqn]
    if hits:
        return f"filter_fqns match {hits[0]!r}"
    if routers and fqn in routers:
        return "MoE router (routing stays high precision)"
    out_features, in_features = module.weight.shape
    if out_features % DIM_MULTIPLE or in_features % DIM_MULTIPLE:
        return (
            f"in_features={in_features}, out_features={out_features} not both divisible "
            f"by {DIM_MULTIPLE}"
        )
    return None


def refuse_changed_linears(model: nn.Module, filter_fqns: list[str]) -> None:
    """Refuse target linears whose ``forward`` another converter replaced (e.g. QAT's).

    ``Float8Linear.from_float`` keeps only the weight and bias, so swapping such a
    linear would silently drop what the other converter does (QAT's fake
    quantization). The check runs before any swap, so the model is left untouched.
    """
    from torchao.float8.float8_linear import Float8Linear

    routers = _routers(model)
    changed = [
        (canonical_fqn(fqn), type(module).__name__)
        for fqn, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, Float8Linear)
        and type(module).forward is not nn.Linear.forward
        and skip_reason(module, canonical_fqn(fqn), filter_fqns, routers) is None
    ]
    if changed:
        names = first_of((f"{fqn} ({cls})" for fqn, cls in changed), 4)
        raise ConfigError(
            f"Converter 'float8': {names} are not plain nn.Linear: another converter "
            "(e.g. 'qat') already changed their forward, and Float8Linear would drop that. "
            "'qat' and 'float8' cannot both convert one linear: add its name to "
            "converters.float8.filter_fqns or remove it from converters.qat.targets."
        )


def convert_model(model: nn.Module, config: Float8Config, emulate: bool) -> Targets:
    """Swap the target linears of ``model`` for ``Float8Linear``, in place."""
    float8 = import_torchao_float8()
    from torchao.float8.float8_linear import Float8Linear

    if isinstance(model, nn.Linear):
        raise PluginError(
            "Converter 'float8' converts the linears inside a model; got a bare nn.Linear as "
            "the model part. Wrap it in a module."
        )
    refuse_changed_linears(model, config.filter_fqns)
    targets = Targets()
    routers = _routers(model)

    def module_filter_fn(module: nn.Module, fqn: str) -> bool:
        name = canonical_fqn(fqn)
        if isinstance(module, Float8Linear):
            targets.converted[name] = tuple(module.weight.shape)
            return False  # already converted (convert called twice)
        if not isinstance(module, nn.Linear):
            return False
        reason = skip_reason(module, name, config.filter_fqns, routers)
        if reason is not None:
            targets.skipped[name] = reason
            return False
        targets.converted[name] = tuple(module.weight.shape)
        return True

    float8.convert_to_float8_training(
        model, module_filter_fn=module_filter_fn, config=torchao_config(config, emulate)
    )
    if targets.skipped:
        logger.info(
            "float8: %d linear(s) stay high precision: %s",
            len(targets.skipped),
            "; ".join(f"{k} ({v})" for k, v in targets.skipped.items()),
        )
    logger.info(
        "float8: converted %d linear(s) (recipe %s, emulate=%s, fsdp float8 all-gather=%s)",
        len(targets.converted),
        config.recipe,
        emulate,
        config.enable_fsdp_float8_all_gather,
    )
    if not targets.converted:
        logger.warning(
            "float8: no linear was converted; check filter_fqns=%s and the model's dims",
            config.filter_fqns,
        )
    return targets


def _routers(model: nn.Module) -> set[str]:
    """Canonical names of the MoE router linears of ``model``."""
    return {canonical_fqn(name) for name in router_linears(model)}


def precompute_scales(model_parts: list[nn.Module]) -> None:
    """Precompute the FSDP float8 all-gather scales of every part (one all-reduce each)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in model_parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
