"""Parallel layouts of the reference trainer: the device mesh, tensor parallel, FSDP2.

The mesh (:func:`build_mesh`) has stable dimension names, outermost first:

* ``"pp"``: pipeline stages (``pipeline_parallel_degree``);
* ``"dp_shard"``: FSDP2 (``data_parallel_shard_degree``); the data-parallel
  dimension: ranks that differ only in ``"tp"`` (and ``"pp"``) read the same batch;
* ``"tp"``: tensor parallel (``tensor_parallel_degree``).

Every dimension is present, size 1 included, so ``mesh["tp"]`` always works.
When ``expert_parallel_degree`` (``ep``) is above 1, the ranks of ``"dp_shard"``
are also laid out as ``"dp_shard_mod_ep"`` (outer) x ``"ep"`` (inner), and
``mesh["dp_shard"]`` is the flattened view of both (torchtitan borrows EP ranks
from FSDP the same way). One rank (world size 1) has no mesh: ``None``.

:func:`parallelize` applies, in this order, TP on ``mesh["tp"]`` (attention
``wq/wk/wv`` and MLP ``w1/w3`` column-wise, ``wo`` and ``w2`` row-wise, heads
split per rank; embeddings, norms, output, router and experts stay whole) and
FSDP2 on ``mesh["dp_shard"]`` (one unit per block and the root); each only when
its degree is above 1.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckpt_core.errors import ConfigError

logger = logging.getLogger("ckpt_core.trainer")

#: The mesh's dimension names, outermost first (see the module docstring).
MESH_DIMS = ("pp", "dp_shard", "tp")
#: Attribute a child module of a TP linear (e.g. a LoRA factor) defines to say how
#: its ``weight`` is split: ``tp_shard_dim(style) -> int | None`` for ``style`` in
#: ``("colwise", "rowwise")``; ``None`` keeps it whole on every TP rank.
TP_CHILD_HOOK = "tp_shard_dim"


def build_mesh(degrees: dict[str, int], device_type: str) -> Any:
    """A ``DeviceMesh`` for ``degrees`` (``ParallelismConfig.degrees``); ``None`` on one rank.

    ``degrees`` holds ``pp``, ``dp_shard``, ``tp`` and optionally ``ep``; their
    product (``ep`` excluded) is the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    pp, dp, tp = degrees.get("pp", 1), degrees.get("dp_shard", 1), degrees.get("tp", 1)
    ep = degrees.get("ep", 1)
    world = pp * dp * tp
    if world == 1:
        return None
    if dist.is_initialized() and dist.get_world_size() != world:
        raise ConfigError(
            f"parallelism: degrees {degrees} make {world} ranks but the world size is "
            f"{dist.get_world_size()}; use data_parallel_shard_degree = -1."
        )
    if ep > 1:
        mesh = init_device_mesh(
            device_type,
            (pp, dp // ep, ep, tp),
            mesh_dim_names=("pp", "dp_shard_mod_ep", "ep", "tp"),
        )
        mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
        return mesh
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIMS)


def mesh_size(mesh: Any, dim: str) -> int:
    """Size of dimension ``dim`` of ``mesh`` (1 without a mesh)."""
    return 1 if mesh is None else mesh[dim].size()


def data_parallel(mesh: Any) -> tuple[int, int]:
    """``(rank, degree)`` of this process in the data-parallel dimension ``"dp_shard"``."""
    if mesh is None:
        return 0, 1
    sub = mesh["dp_shard"]
    return sub.get_local_rank(), sub.size()


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """A ConfigError unless ``tp`` divides every dimension TP splits and the model has a plan."""
    if tp == 1:
        return
    args = getattr(model, "args", None)
    if args is None or not hasattr(model, "layers"):
        raise ConfigError(
            f"parallelism.tensor_parallel_degree = {tp} needs a reference family model "
            "(llama, qwen3 or moe flavors); this model has no TP plan. Use 1."
        )
    fields = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads}
    if any(getattr(b, "feed_forward", None) is not None for b in model.layers.values()):
        fields["ffn_hidden_dim"] = args.ffn_hidden_dim
    for name, value in fields.items():
        if value % tp:
            allowed = [d for d in range(1, value + 1) if all(v % d == 0 for v in fields.values())]
            raise ConfigError(
                f"parallelism.tensor_parallel_degree = {tp} does not divide the model's {name} "
                f"({value}); choose one of {allowed}."
            )


def tensor_parallel_plan(block: nn.Module) -> dict[str, Any]:
    """The ``parallelize_module`` plan of one reference transformer block."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput

    plan: dict[str, Any] = {}
    attention = block.attention
    for name in ("wq", "wk", "wv"):
        plan[f"attention.{name}"] = "colwise"
    plan["attention.wo"] = "rowwise"
    for name in ("q_norm", "k_norm"):
        if getattr(attention, name, None) is not None:
            # Per-head norms see this rank's heads ([b, heads, s, head_dim], dim 1):
            # gather all heads so the norm weight's gradient is whole, then split again.
            plan[f"attention.{name}"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_input=True,
                output_layouts=(Replicate(),),
                desired_output_layouts=(Shard(1),),
                use_local_output=True,
            )
    if getattr(block, "feed_forward", None) is not None:
        plan["feed_forward.w1"] = "colwise"
        plan["feed_forward.w3"] = "colwise"
        plan["feed_forward.w2"] = "rowwise"
    return plan


def _linear_style(style: str) -> Any:
    """Column- or row-wise parallel for a linear, its child factors split by their hook."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    base = ColwiseParallel if style == "colwise" else RowwiseParallel

    class _Style(base):  # type: ignore[misc, valid-type]
        def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: Any) -> None:
            if not name:  # called for every submodule; the linear splits its children itself
                _partition_linear(module, device_mesh, style)

    return _Style()


def _partition_linear(module: nn.Module, mesh: Any, style: str) -> None:
    """Split a linear's own weight (and its children's by their ``tp_shard_dim``)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def put(owner: nn.Module, name: str, dim: int | None) -> None:
        param = getattr(owner, name)
        placement = Replicate() if dim is None else Shard(dim)
        owner.register_parameter(
            name,
            nn.Parameter(
                distribute_tensor(param, mesh, [placement]), requires_grad=param.requires_grad
            ),
        )

    put(module, "weight", 0 if style == "colwise" else 1)
    if getattr(module, "bias", None) is not None:
        put(module, "bias", 0 if style == "colwise" else None)
    for child_name, child in module.named_children():
        params = list(child.named_parameters(recurse=False))
        if not params:
            continue
        hook = getattr(child, TP_CHILD_HOOK, None)
        if hook is None:
            raise ConfigError(
                f"tensor parallel: {type(child).__name__} {child_name!r} inside a {style} linear "
                f"has parameters but no {TP_CHILD_HOOK}(); set parallelism."
                "tensor_parallel_degree = 1 or give the module that method."
            )
        for pname, _ in params:
            put(child, pname, hook(style))


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """TP on every block of ``model`` over the 1-D ``tp_mesh`` (:func:`tensor_parallel_plan`)."""
    from torch.distributed.tensor.parallel import parallelize_module

    for block in model.layers.values():
        plan = {
            fqn: _linear_style(style) if isinstance(style, str) else style
            for fqn, style in tensor_parallel_plan(block).items()
        }
        parallelize_module(block, tp_mesh, plan)


def parallelize(model: nn.Module, mesh: Any, parallelism: Any = None) -> nn.Module:
    """TP over ``mesh["tp"]`` then FSDP2 over ``mesh["dp_shard"]``; the plain module without a mesh.

    One rank trains the plain module: DCP reshards a checkpoint saved on any
    mesh into plain tensors, so every layout resumes on one rank and back.
    ``parallelism`` (the ``[parallelism]`` section) is accepted for callers
    that pass it; the degrees are read from ``mesh``.
    """
    if mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    tp = mesh_size(mesh, "tp")
    if tp > 1:
        check_tensor_parallel(model, tp)
        apply_tensor_parallel(model, mesh["tp"])
    ignored = None
    if "ep" in (mesh.mesh_dim_names or ()) and mesh_size(mesh, "ep") > 1:
        from ckpt_core.trainer.expert_parallel import apply_expert_parallel

        # Experts shard over ("dp_shard_mod_ep", "ep") themselves; FSDP leaves them alone.
        dp = mesh_size(mesh, "dp_shard")
        ignored = apply_expert_parallel(model, mesh["dp_shard_mod_ep", "ep"], dp)
    if mesh_size(mesh, "dp_shard") > 1:
        dp_mesh = mesh["dp_shard"]
        for block in model.layers.values():
            fully_shard(
                block, mesh=dp_mesh, shard_placement_fn=_shard_placement, ignored_params=ignored
            )
        fully_shard(model, mesh=dp_mesh, ignored_params=ignored)
    return model


def _shard_placement(param: nn.Parameter) -> Any:
    """Stacked experts (3-D) shard along their second dimension, so each expert
    is a plain row-sharded tensor for HF exports and loads; others: FSDP's default."""
    from torch.distributed.tensor import Shard

    return Shard(1) if param.dim() == 3 else None


def _layout_key(param: torch.Tensor) -> Any:
    """Parameters that torch's grad-norm helpers can take together share this key."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return (id(param.device_mesh), tuple(param.placements))
    return None


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to a total norm ``max_norm``; returns the total norm (a plain tensor).

    One layout (all plain, or all DTensors on one mesh) is torch's own
    ``clip_grad_norm_``, bit for bit. Mixed layouts (TP with FSDP: whole and
    split parameters) take each group's norm, made whole, and combine them.
    """
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(_layout_key(p), []).append(p)
    if len(groups) <= 1:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return total.full_tensor() if isinstance(total, DTensor) else total
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def dp_mean(value: torch.Tensor, mesh: Any) -> float:
    """The mean of a scalar over the data-parallel ranks (TP ranks hold the same value)."""
    if mesh is None:
        return float(value.detach())
    group = mesh["dp_shard"].get_group()
    size = mesh["dp_shard"].size()
    t = value.detach().clone()
    if size > 1:
        dist.all_reduce(t, group=group)
    return float(t / size)
