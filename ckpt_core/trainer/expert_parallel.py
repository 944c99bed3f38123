"""Expert parallel (EP) for the reference MoE family's stacked experts.

Layout: the FSDP ranks (``dp_shard``) are split into ``dp_shard_mod_ep x ep``
(``ep`` innermost, as in torchtitan: EP borrows FSDP ranks; ``efsdp`` below is
``dp_shard_mod_ep``, see :func:`ckpt_core.trainer.parallel.build_mesh`). Each stacked expert
weight (``moe.experts.w1/w2/w3``, ``[E, out, in]``) becomes a DTensor on that
2-D mesh with placements ``(Shard(1), Shard(0))``: dimension 0 (the experts)
split over ``ep``, so a rank owns ``E / ep`` whole experts, and dimension 1
(rows) split over ``efsdp`` when it is larger than one, which is FSDP for the
experts. Every other parameter is FSDP over all of ``dp_shard`` as usual; the
expert weights are left out of FSDP (``ignored_params``).

Token dispatch per MoE layer (all collectives are autograd-aware):

1. the router runs on the rank's own tokens;
2. tokens, routing weights and expert ids are all-gathered over the EP group
   (backward: the token gradients are reduce-scattered to their owners);
3. the expert rows are all-gathered over ``efsdp`` (backward: reduce-scatter,
   summing the groups' gradients) and the rank runs its ``E / ep`` experts
   on every gathered token, in expert order as the plain forward does;
4. the partial outputs are reduce-scattered (summed) back to the tokens'
   owners over the EP group (backward: all-gather).

Each expert's gradient is then the sum over all data-parallel ranks' losses;
it is scaled by ``1 / dp_shard`` so it is the mean, like FSDP's. The result
equals the plain forward up to the order of the per-token sum over experts
(float32 rounding, ~1e-6 relative).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckpt_core.content.experts import WEIGHT_TRANSFORMS
from ckpt_core.errors import ConfigError
from ckpt_core.reference.moe import GroupedExperts, expert_outputs

logger = logging.getLogger("ckpt_core.trainer")

#: The stacked expert weights that expert parallel shards.
EXPERT_PARAMS = ("w1", "w2", "w3")


def expert_modules(model: nn.Module) -> dict[str, GroupedExperts]:
    """The reference MoE's stacked-expert modules of ``model``, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GroupedExperts)}


def check_expert_parallel(model: nn.Module, ep: int) -> None:
    """A ConfigError unless ``model`` has stacked experts whose count ``ep`` divides."""
    if ep == 1:
        return
    modules = expert_modules(model)
    if not modules:
        raise ConfigError(
            f"parallelism.expert_parallel_degree = {ep}, but the model has no stacked experts "
            "(expert parallel is for the moe family, e.g. model.name = 'moe:tiny'); set it to 1."
        )
    counts = sorted({m.num_experts for m in modules.values()})
    if any(n % ep for n in counts):
        allowed = [d for d in range(1, counts[0] + 1) if all(n % d == 0 for n in counts)]
        raise ConfigError(
            f"parallelism.expert_parallel_degree = {ep} does not divide the number of experts "
            f"{counts[0]}; allowed values: {allowed}."
        )


# -- autograd-aware collectives over dimension 0 -------------------------------


def _all_gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    size = dist.get_world_size(group)
    x = x.contiguous()
    if dist.get_backend(group) != "gloo":
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    chunks = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(chunks, x, group=group)
    return torch.cat(chunks)


def _reduce_scatter(x: torch.Tensor, group: Any) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    x = x.contiguous()
    if dist.get_backend(group) != "gloo":
        out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    total = x.clone()
    dist.all_reduce(total, group=group)  # gloo has no reduce-scatter
    return total.chunk(size)[rank].clone()


class _Dispatch(torch.autograd.Function):
    """All-gather (``gather``) or reduce-scatter (sum) along dimension 0; the
    backward does the other one, so token gradients go back to their owners."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, gather: bool) -> torch.Tensor:
        ctx.group, ctx.gather = group, gather
        return _all_gather(x, group) if gather else _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        back = _reduce_scatter if ctx.gather else _all_gather
        return back(grad, ctx.group), None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


# -- the expert-parallel experts ----------------------------------------------


class ExpertParallelExperts(GroupedExperts):
    """:class:`GroupedExperts` whose weights are ``(Shard(1), Shard(0))`` DTensors on
    an ``(efsdp, ep)`` mesh; the forward dispatches tokens over the EP group."""

    ep_group: Any
    efsdp_group: Any
    grad_scale: float

    def _local_weight(self, name: str) -> torch.Tensor:
        """This rank's experts, whole rows, through the converters' transform."""
        local = _ScaleGrad.apply(getattr(self, name).to_local(), self.grad_scale)
        if dist.get_world_size(self.efsdp_group) > 1:
            rows = _Dispatch.apply(local.transpose(0, 1), self.efsdp_group, True)
            local = rows.transpose(0, 1)
        fn = getattr(self, WEIGHT_TRANSFORMS, {}).get(name)
        return local if fn is None else fn(local)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        w1, w2, w3 = (self._local_weight(name) for name in ("w1", "w2", "w3"))
        ep_size = dist.get_world_size(self.ep_group)
        first = dist.get_rank(self.ep_group) * (self.num_experts // ep_size)
        x_all = _Dispatch.apply(x, self.ep_group, True)
        weights_all = _Dispatch.apply(weights, self.ep_group, True)
        experts_all = _all_gather(experts, self.ep_group)
        out = expert_outputs(x_all, weights_all, experts_all, (w1, w2, w3), first)
        return _Dispatch.apply(out, self.ep_group, False)


def apply_expert_parallel(model: nn.Module, mesh: Any, dp_shard: int) -> set[nn.Parameter]:
    """Shard every stacked expert of ``model`` over ``mesh`` (dims ``("dp_shard_mod_ep", "ep")``).

    Returns the expert parameters, which FSDP must leave alone (``ignored_params``).
    Weights are sliced locally (every rank built the same model from the same seed).
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    ep = mesh["ep"].size()
    check_expert_parallel(model, ep)
    placements = (Shard(1), Shard(0))
    params: set[nn.Parameter] = set()
    for module in expert_modules(model).values():
        module.__class__ = ExpertParallelExperts
        module.ep_group = mesh.get_group("ep")
        module.efsdp_group = mesh.get_group("dp_shard_mod_ep")
        module.grad_scale = 1.0 / dp_shard
        for name in EXPERT_PARAMS:
            old = getattr(module, name)
            sharded = distribute_tensor(old.detach(), mesh, placements, src_data_rank=None)
            new = nn.Parameter(sharded, requires_grad=old.requires_grad)
            setattr(module, name, new)
            params.add(new)
    logger.info(
        "expert parallel: %d expert layers over ep=%d (efsdp=%d)",
        len(expert_modules(model)),
        ep,
        mesh["dp_shard_mod_ep"].size(),
    )
    return params
