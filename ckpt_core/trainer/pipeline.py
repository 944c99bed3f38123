"""Pipeline parallel (PP) for the reference families with ``torch.distributed.pipelining``.

The model is cut by layers into ``stages`` consecutive parts, each a copy of
the whole model with the other layers deleted: the first keeps
``tok_embeddings``, the last ``norm`` and ``output``, and every part keeps the
original parameter names (``layers.3.attention.wq.weight`` stays), so
checkpoints of any split and of the unsplit model hold the same keys. The
reference forward skips the parts a stage lacks.

Stages per rank: two when ``pipeline_parallel_degree x 2`` divides the layers
(looped: rank ``r`` holds stages ``r`` and ``r + pp``, scheduled by
``ScheduleInterleaved1F1B``), else one (``Schedule1F1B``); a degree that does
not divide the layers is a ConfigError. Each part is parallelized on its own
(TP, EP, FSDP over ``dp_shard``) and gets its own optimizer and LR scheduler,
so ``model_parts`` holds one module per stage of the rank.

The loss is the cross-entropy of each microbatch on the last stage divided by
the microbatch count, so the summed gradients of a step are the full-batch
mean as without PP (up to float rounding). Its value for metrics is
broadcast from the last stage over the ``pp`` group; the gradient norm for
clipping sums every stage's squares over ``pp``.

Exports (:class:`PipelineExportView`) need every tensor on the writing rank:
each stage's tensors, made whole, are broadcast over ``pp`` so every rank sees
the unsplit model, tensor for tensor the one-rank model's.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ckpt_core.content.model_wrapper import ModelWrapper
from ckpt_core.errors import ConfigError

logger = logging.getLogger("ckpt_core.trainer")


def stages_per_rank(model: nn.Module, pp: int) -> int:
    """2 when ``2 x pp`` divides the layers, 1 when ``pp`` does; else a ConfigError."""
    layers = getattr(model, "layers", None)
    args = getattr(model, "args", None)
    if not isinstance(layers, nn.ModuleDict) or args is None:
        raise ConfigError(
            f"parallelism.pipeline_parallel_degree = {pp} needs a reference family model "
            "(llama, qwen3 or moe flavors, whose layers are an nn.ModuleDict); use 1."
        )
    if getattr(args, "tie_word_embeddings", False):
        raise ConfigError(
            f"parallelism.pipeline_parallel_degree = {pp}: the model ties its input and output "
            "embeddings, which the first and last stages would both need; use 1 or a model "
            "without tie_word_embeddings."
        )
    n = len(layers)
    if n % (2 * pp) == 0:
        return 2
    if n % pp == 0:
        return 1
    allowed = [d for d in range(1, n + 1) if n % d == 0]
    raise ConfigError(
        f"parallelism.pipeline_parallel_degree = {pp} does not divide the model's {n} layers; "
        f"allowed values: {allowed}."
    )


def split_stage(model: nn.Module, stage: int, num_stages: int) -> nn.Module:
    """A copy of ``model`` holding only stage ``stage`` of ``num_stages`` (names kept)."""
    part = copy.deepcopy(model)
    names = list(part.layers.keys())
    per = len(names) // num_stages
    keep = set(names[stage * per : (stage + 1) * per])
    for name in names:
        if name not in keep:
            del part.layers[name]
    if stage > 0:
        part.tok_embeddings = None
    if stage < num_stages - 1:
        part.norm = None
        part.output = None
    return part


def microbatches(parallelism: Any, num_stages: int, pp: int, local_batch: int) -> int:
    """The microbatch count (``pipeline_parallel_microbatches``, 0: the stage count), checked."""
    n = parallelism.pipeline_parallel_microbatches or num_stages
    if local_batch % n:
        raise ConfigError(
            f"parallelism.pipeline_parallel_microbatches = {n} does not divide the "
            f"per-replica batch {local_batch} (training.batch_size / data-parallel degree); "
            "choose a divisor of it."
        )
    if num_stages > pp and n % pp:
        raise ConfigError(
            f"parallelism.pipeline_parallel_microbatches = {n} is not a multiple of "
            f"pipeline_parallel_degree {pp}, which the interleaved schedule needs; use a "
            f"multiple of {pp}."
        )
    return n


class _MicrobatchLoss:
    """Cross-entropy of one microbatch divided by the microbatch count: the gradients
    the schedule sums are the full batch's mean (its own scaling is off, it did not
    apply to every schedule and FSDP combination)."""

    def __init__(self, n_microbatches: int) -> None:
        self.n = n_microbatches

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / self.n


class Pipeline:
    """This rank's stages, their schedule, and the PP-aware step, clip and loss."""

    def __init__(
        self,
        model: nn.Module,
        mesh: Any,
        parallelism: Any,
        device: torch.device,
        local_batch: int,
        parallelize: Callable[[nn.Module], nn.Module],
    ) -> None:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleInterleaved1F1B,
        )

        pp_mesh = mesh["pp"]
        self.group = pp_mesh.get_group()
        self.pp = pp_mesh.size()
        self.pp_rank = pp_mesh.get_local_rank()
        per_rank = stages_per_rank(model, self.pp)
        self.num_stages = self.pp * per_rank
        self.stage_ids = [self.pp_rank + i * self.pp for i in range(per_rank)]
        self.parts = [parallelize(split_stage(model, s, self.num_stages)) for s in self.stage_ids]
        self.stages = [
            PipelineStage(part, s, self.num_stages, device, group=self.group)
            for part, s in zip(self.parts, self.stage_ids)
        ]
        self.n_microbatches = microbatches(parallelism, self.num_stages, self.pp, local_batch)
        loss_fn = _MicrobatchLoss(self.n_microbatches)
        if per_rank > 1:
            self.schedule = ScheduleInterleaved1F1B(
                self.stages, self.n_microbatches, loss_fn, scale_grads=False
            )
        else:
            self.schedule = Schedule1F1B(
                self.stages[0], self.n_microbatches, loss_fn, scale_grads=False
            )
        self.has_first = 0 in self.stage_ids
        self.has_last = self.num_stages - 1 in self.stage_ids
        #: pp-group rank of the last stage, and its global rank for broadcasts.
        self.last_src = dist.get_global_rank(self.group, (self.num_stages - 1) % self.pp)
        logger.info(
            "pipeline: %d stages (%d per rank, stages %s here), %d microbatches, %s",
            self.num_stages,
            per_rank,
            self.stage_ids,
            self.n_microbatches,
            type(self.schedule).__name__,
        )

    def attach(self, manager: Any) -> None:
        """Tell ``manager`` that this rank holds some stages: exports read a view of the
        unsplit model (:class:`PipelineExportView`), HF loads skip other stages' tensors."""
        manager.wrapper.partial = True
        manager.export_wrapper = PipelineExportView(manager.wrapper, self.group)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one batch; the mean microbatch loss on every pp rank."""
        losses: list[torch.Tensor] = []
        if self.has_first:
            self.schedule.step(inputs, target=targets, losses=losses)
        else:
            self.schedule.step(target=targets, losses=losses)
        if self.has_last:  # each microbatch's loss came divided by their count
            loss = torch.stack([x.detach().float() for x in losses]).sum()
        else:
            loss = torch.zeros((), dtype=torch.float32, device=targets.device)
        dist.broadcast(loss, src=self.last_src, group=self.group)
        return loss

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` by the norm over every stage's gradients; returns it."""
        from torch.distributed.tensor import DTensor

        groups: dict[Any, list[nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                continue
            key = (id(p.device_mesh), tuple(p.placements)) if isinstance(p, DTensor) else None
            groups.setdefault(key, []).append(p)
        squares = torch.zeros((), dtype=torch.float32, device=params[0].device)
        for group in groups.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            squares = squares + norm.float().to(squares.device) ** 2
        dist.all_reduce(squares, group=self.group)
        total = squares.sqrt()
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total


def _whole(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    return value.detach() if isinstance(value, torch.Tensor) else value


class PipelineExportView(ModelWrapper):
    """Export views of the unsplit model on every rank of a pipelined run.

    Stage after stage, the ranks holding it make its tensors whole and
    broadcast them over ``pp``; non-tensor entries travel as objects. Only for
    reading (exports): loading goes through the stages' own wrapper.
    """

    def __init__(self, wrapper: ModelWrapper, group: Any) -> None:
        super().__init__(wrapper.model_parts, converters=wrapper.converters)
        self.group = group

    def _part_state_dicts(self) -> list[dict[str, tuple[str, Any]]]:
        local: dict[str, Any] = {}
        for entries in super()._part_state_dicts():
            for key, (_, value) in entries.items():
                local[key] = value
        size = dist.get_world_size(self.group)
        me = dist.get_rank(self.group)
        merged: dict[str, tuple[str, Any]] = {}
        for src in range(size):
            # Every rank of the source's pp coordinate makes its DTensors whole
            # (a collective over its own FSDP/TP group); others wait for the broadcast.
            whole = {k: _whole(v) for k, v in local.items()} if src == me else {}
            meta = [
                {
                    k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("obj", v)
                    for k, v in whole.items()
                }
                if src == me
                else None
            ]
            global_src = dist.get_global_rank(self.group, src)
            dist.broadcast_object_list(meta, src=global_src, group=self.group)
            for key, spec in meta[0].items():
                if spec[0] == "obj":
                    merged[key] = (key, spec[1])
                    continue
                if src == me:
                    tensor = whole[key].contiguous()
                else:
                    tensor = torch.empty(spec[0], dtype=spec[1], device=self._device())
                _broadcast(tensor, global_src, self.group)
                merged[key] = (key, tensor)
        return [merged]

    def _device(self) -> torch.device:
        for part in self.model_parts:
            for p in part.parameters():
                return p.device
        return torch.device("cpu")

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("PipelineExportView is read-only; load through the stages.")


def _broadcast(tensor: torch.Tensor, src: int, group: Any) -> None:
    """Broadcast any dtype (gloo lacks float8: its bytes go as uint8)."""
    if tensor.dtype.itemsize == 1 and tensor.dtype not in (torch.uint8, torch.int8, torch.bool):
        dist.broadcast(tensor.view(torch.uint8), src=src, group=group)
        return
    dist.broadcast(tensor, src=src, group=group)
