"""What converters need to know about mixture-of-experts layers.

Two parts of an MoE model are not ordinary linears, and converters treat them
apart (each says so in its options, shown by ``ckpt plugins``):

* **Stacked experts**: parameters of three or more dimensions holding every
  expert of a layer, ``[num_experts, out, in]`` (torchtitan's layout, the
  reference MoE's ``moe.experts.w1``, transformers 5's
  ``mlp.experts.gate_up_proj``). They are not ``nn.Linear``: converters that
  swap or wrap linears (LoRA, QAT, Float8) cannot adapt them and skip them.
  :func:`stacked_leaf_names` lets a converter tell "names stacked experts,
  skipped" from "names nothing in the model".
* A module holding stacked experts may let converters see its weights the way
  a converter swaps a linear: a dict attribute :data:`WEIGHT_TRANSFORMS`
  (``{parameter name: fn}``), whose ``fn(weight)`` its forward uses instead of
  the parameter (the reference MoE's ``GroupedExperts``; QAT fake-quantizes
  experts through it). Parameters and names do not change.
* **Routers**: the linear that scores the experts of each token. A small
  change of its output flips the top-k choice, so low-precision converters
  leave it alone. :func:`router_linears` finds it by structure: a linear inside
  a module named ``router`` (``moe.router.gate``), or a linear named ``gate``
  beside an ``experts`` module (``mlp.gate`` of transformers 4 Qwen-MoE,
  Mixtral's ``block_sparse_moe.gate``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: A parameter with this many dimensions or more holds stacked experts.
STACKED_DIMS = 3
#: Module name that marks a router (``moe.router.gate``).
ROUTER = "router"
#: Leaf name of a router linear placed beside its ``experts`` module.
ROUTER_GATE = "gate"


def stacked_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of ``model`` with 3 dimensions or more (stacked experts), by name."""
    return {n: p for n, p in model.named_parameters() if p.dim() >= STACKED_DIMS}


def stacked_leaf_names(model: nn.Module) -> set[str]:
    """Leaf names of the stacked parameters (``w1``, ``gate_up_proj``)."""
    return {name.rsplit(".", 1)[-1] for name in stacked_parameters(model)}


def router_linears(model: nn.Module) -> set[str]:
    """Module names (as ``named_modules`` gives them) of the router linears of ``model``."""
    modules = dict(model.named_modules())
    found = set()
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if ROUTER in parent.split("."):
            found.add(name)
        elif leaf == ROUTER_GATE and isinstance(
            getattr(modules.get(parent), "experts", None), nn.Module
        ):
            found.add(name)
    return found


#: Attribute of a module holding stacked experts: ``{parameter name: fn}`` applied
#: to the whole stacked weight each time the forward reads it.
WEIGHT_TRANSFORMS = "expert_weight_transforms"


def transformable_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold stacked parameters and a :data:`WEIGHT_TRANSFORMS` dict, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(module, WEIGHT_TRANSFORMS, None), dict)
        and any(p.dim() >= STACKED_DIMS for p in module.parameters(recurse=False))
    }


def expert_weight(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter ``name`` of ``module`` as its forward should use it (transformed if asked)."""
    weight = getattr(module, name)
    fn: Callable[[torch.Tensor], torch.Tensor] | None = getattr(module, WEIGHT_TRANSFORMS, {}).get(
        name
    )
    return weight if fn is None else fn(weight)
