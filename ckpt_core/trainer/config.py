"""The reference trainer's configuration: one TOML file, validated by pydantic.

``TrainConfig`` is the whole file: ``[job]``, ``[model]``, ``[training]`` and
``[metrics]`` are defined here; ``[converters]`` and ``[checkpoint]`` embed the
library's own :class:`~ckpt_core.config.ConvertersConfig` and
:class:`~ckpt_core.config.CheckpointConfig`. Every model forbids unknown fields.
With no file and no overrides the defaults below are the embedded default run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ckpt_core.config import CheckpointConfig, ConvertersConfig
from ckpt_core.config_loading import apply_overrides, build_config, read_toml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class JobConfig(_Strict):
    """``[job]``: where the run writes."""

    folder: str = Field(
        "outputs",
        description="Run folder; relative checkpoint, export and metrics paths resolve against it.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'cpu', 'cuda', or 'auto' (CUDA when available)."
    )


class ModelConfig(_Strict):
    """``[model]``: which Llama to train."""

    name: str = Field(
        "debug",
        description="A reference flavor (e.g. 'debug') or the path of a Hugging Face Llama "
        "folder, whose weights then start the run.",
    )


class TrainingConfig(_Strict):
    """``[training]``: the optimization."""

    steps: int = Field(200, ge=1, description="Train until this global step.")
    batch_size: int = Field(8, ge=1, description="Global batch (sequences), split across ranks.")
    seq_len: int = Field(128, ge=2, description="Tokens per sequence.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate of AdamW.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps; constant LR after.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global grad norm; 0: off.")
    seed: int = Field(0, ge=0, description="Seeds the model init and the token stream.")
    deterministic: bool = Field(
        True, description="torch.use_deterministic_algorithms (needed for bit-exact resume)."
    )


class MetricsConfig(_Strict):
    """``[metrics]``: the per-step record and the console."""

    path: str = Field("metrics.jsonl", description="One JSON object per step, written by rank 0.")
    log_every: int = Field(10, ge=1, description="Plain log line every N steps (no terminal).")


class ParallelismConfig(_Strict):
    """``[parallelism]``: how the ranks split the model (torchtitan's names).

    ``pipeline x data_parallel_shard x tensor`` is the world size
    (``data_parallel_shard_degree = -1`` takes what the others leave); expert
    parallel borrows its ranks from data_parallel_shard. Everything at 1 except FSDP is the plain
    FSDP2 run of earlier versions.
    """

    data_parallel_shard_degree: int = Field(
        -1, description="FSDP2 shards over this many ranks; -1: the world size over the rest."
    )
    tensor_parallel_degree: int = Field(
        1, ge=1, description="Tensor parallel (column/row-wise attention and MLP) ranks."
    )
    expert_parallel_degree: int = Field(
        1, ge=1, description="Expert parallel ranks for mixture-of-experts families (moe)."
    )
    pipeline_parallel_degree: int = Field(
        1, ge=1, description="Pipeline stages (torch.distributed.pipelining); 1: off."
    )
    pipeline_parallel_microbatches: int = Field(
        0, ge=0, description="Microbatches per step for pipeline parallel; 0: the stage count."
    )

    def degrees(self, world_size: int) -> dict[str, int]:
        """``{dim name: degree}`` for ``world_size`` ranks, or a ConfigError naming the fix.

        As in torchtitan, ``pp x dp_shard x tp`` is the world size and expert
        parallel borrows its ranks from the FSDP dimension: ``ep`` divides
        ``dp_shard`` (experts shard over ``ep``, FSDP over ``dp_shard / ep``).
        """
        from ckpt_core.errors import ConfigError

        tp, ep, pp = (
            self.tensor_parallel_degree,
            self.expert_parallel_degree,
            self.pipeline_parallel_degree,
        )
        others = tp * pp
        dp = self.data_parallel_shard_degree
        if dp == -1:
            if world_size % others:
                raise ConfigError(
                    f"parallelism: tensor_parallel_degree {tp} x pipeline_parallel_degree {pp} "
                    f"= {others} does not divide the world size {world_size}; choose degrees "
                    "whose product divides it."
                )
            dp = world_size // others
        elif dp < 1:
            raise ConfigError(
                f"parallelism.data_parallel_shard_degree = {dp}; use -1 (the rest) or >= 1."
            )
        if dp * others != world_size:
            raise ConfigError(
                f"parallelism: data_parallel_shard_degree {dp} x tensor_parallel_degree {tp} x "
                f"pipeline_parallel_degree {pp} = {dp * others}, but the world size is "
                f"{world_size}; set data_parallel_shard_degree = -1 or change the degrees."
            )
        if dp % ep:
            raise ConfigError(
                f"parallelism.expert_parallel_degree = {ep} does not divide the FSDP degree {dp} "
                "(expert parallel borrows FSDP ranks); choose a divisor of it."
            )
        return {"pp": pp, "dp_shard": dp, "ep": ep, "tp": tp}


class TrainConfig(_Strict):
    """The whole ``ckpt train`` config file."""

    job: JobConfig = Field(default_factory=JobConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    converters: ConvertersConfig = Field(default_factory=ConvertersConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    def resolve(self, path: str) -> str:
        """``path`` against ``job.folder`` unless it is absolute or a URI."""
        return resolve_path(self.job.folder, path)

    def resolved_checkpoint(self) -> CheckpointConfig:
        """``[checkpoint]`` with its folders resolved against ``job.folder``."""
        ckpt = self.checkpoint.model_copy(deep=True)
        ckpt.folder = self.resolve(ckpt.folder)
        ckpt.export.folder = self.resolve(ckpt.export.folder)
        return ckpt


def resolve_path(base: str, path: str) -> str:
    """Join a relative local ``path`` onto ``base``; absolute paths and URIs pass."""
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.join(base, path)


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read the optional TOML file, apply ``--section.field VALUE`` overrides, validate.

    Syntax errors, unknown fields and bad values raise
    :class:`~ckpt_core.errors.ConfigError` naming the field.
    """
    data = read_toml(path) if path is not None else {}
    data = apply_overrides(data, overrides, TrainConfig)
    return build_config(TrainConfig, data)
