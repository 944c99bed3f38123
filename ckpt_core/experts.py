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
* **Routers**: the linear that scores the experts of each token. A small
  change of its output flips the top-k choice, so low-precision converters
  leave it alone. :func:`router_linears` finds it by structure: a linear inside
  a module named ``router`` (``moe.router.gate``), or a linear named ``gate``
  beside an ``experts`` module (``mlp.gate`` of transformers 4 Qwen-MoE,
  Mixtral's ``block_sparse_moe.gate``).
"""

from __future__ import annotations

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
