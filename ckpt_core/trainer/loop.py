"""The reference training loop: build, parallelize, load, train, checkpoint, export.

Order of one run (every rank):

1. seed, build the model through its family (the reference Llama for a bare
   flavor; ``qwen3:tiny``, ``moe:debug`` or an HF folder otherwise; identical
   on every rank), apply the converters (before parallelization), FSDP2 per
   transformer block and the root when there is more than one rank;
2. AdamW over the trainable parameters with a linear warmup (``LambdaLR``),
   the synthetic token stream, and a :class:`~ckpt_core.CheckpointManager`
   over all of them;
3. ``manager.acquire()`` (one-writer locks on the checkpoint, export and
   metrics folders), ``manager.load()`` (resume from the newest committed
   step, else the initial load, else a fresh start), ``manager.preflight()``
   (the folders are writable and have room for a checkpoint);
4. per step: forward/backward, ``maybe_wait_for_staging()`` (an async save
   still copying weights must finish before they change), clip, optimizer and
   scheduler step, ``post_optimizer_step``, counters, metrics line, ``save``;
   then, when any rank got a preemption signal (``checkpoint.preemption_signal``),
   ``save_now`` of this step and stop (``ckpt train`` exits with 75);
5. ``manager.close()`` drains pending saves, on success and on error.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from ckpt_core.errors import ConfigError
from ckpt_core.trainer.config import TrainConfig
from ckpt_core.trainer.expert_parallel import check_expert_parallel
from ckpt_core.trainer.launch import Dist
from ckpt_core.trainer.parallel import (
    build_mesh,
    clip_grad_norm,
    data_parallel,
    dp_mean,
    parallelize,
)
from ckpt_core.trainer.pipeline import Pipeline

logger = logging.getLogger("ckpt_core.trainer")


# -- preparation (no torch.distributed needed) ---------------------------------


def model_source(cfg: TrainConfig) -> tuple[str, str | None]:
    """``(name_or_path, hf_folder)``: ``hf_folder`` is set when model.name is a folder.

    A name that is neither a known flavor (``debug``, ``qwen3:tiny``) nor an
    existing folder is a :class:`ConfigError` naming both possibilities.
    """
    from ckpt_core.reference import FLAVORS
    from ckpt_core.reference.hf_config import is_hf_path
    from ckpt_core.storage import layout

    name = cfg.model.name
    if name in FLAVORS:
        return name, None
    if not is_hf_path(name):
        model_family_for(name)  # a family:flavor name, or a ConfigError listing them
        return name, None
    if name.endswith(".json"):
        if not layout.exists(name):
            raise ConfigError(f"model.name: config file {name!r} does not exist.")
        return name, None
    if not layout.exists(name):
        raise ConfigError(
            f"model.name: folder {name!r} does not exist. Give a flavor "
            f"({', '.join(FLAVORS)}) or the path of a Hugging Face Llama folder."
        )
    if not layout.exists(layout.join(name, "config.json")):
        raise ConfigError(
            f"model.name: folder {name!r} has no config.json; expected a Hugging Face "
            "Llama folder (config.json and *.safetensors)."
        )
    return name, name


def model_family_for(name: str) -> tuple[Any, dict[str, Any]]:
    """``(ModelFamily, config.json dict)`` of model.name, through the installed families.

    A bare flavor (``debug``) is the reference Llama's, as it always was;
    ``family:flavor`` (``qwen3:tiny``, ``moe:debug``) picks another family's; an
    HF folder or ``config.json`` goes to the family reading its ``model_type``.
    """
    from ckpt_core.content.families import family_for_model, installed_families
    from ckpt_core.reference import FLAVORS
    from ckpt_core.reference.hf_config import is_hf_path

    if is_hf_path(name):
        return family_for_model(name)
    try:
        return family_for_model(f"llama:{name}" if name in FLAVORS else name)
    except ConfigError:
        listed = "; ".join(
            f"{f.name}: {', '.join(f.flavors)}"
            for _, f, _ in installed_families()
            if f and f.flavors
        )
        raise ConfigError(
            f"model.name: {name!r} is neither a flavor ({', '.join(FLAVORS)}, or family:flavor "
            f"among {listed}) nor a folder. Give a flavor name or the path of a Hugging Face "
            "folder."
        ) from None


def prepare(cfg: TrainConfig) -> TrainConfig:
    """Checks that need no process group; fills ``initial_load`` from an HF model folder.

    Returns a copy of ``cfg``; raises :class:`ConfigError` on bad input.
    """
    from ckpt_core.protocol.plugin_host import ConverterSet

    cfg = cfg.model_copy(deep=True)
    _, hf_folder = model_source(cfg)
    if hf_folder is not None and cfg.checkpoint.initial_load.path is None:
        cfg.checkpoint.initial_load.path = hf_folder
        cfg.checkpoint.initial_load.format = "hf"
        cfg.checkpoint.initial_load.model_only = True
    # Import and validate the converters now: unknown names and bad options fail here.
    ConverterSet.from_config(cfg.converters.enabled, cfg.converters.options)
    return cfg


# -- building blocks -----------------------------------------------------------


def warmup_schedule(warmup_steps: int):
    """LR multiplier: linear warmup over ``warmup_steps``, then constant."""

    def factor(step: int) -> float:
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    return factor


def set_determinism(seed: int, deterministic: bool) -> None:
    """Fixed seeds; deterministic kernels where torch has them."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
    torch.manual_seed(seed)


# -- the run -------------------------------------------------------------------


def train(cfg: TrainConfig, dist_info: Dist) -> dict[str, Any]:
    """Run (or resume) training as ``cfg`` says; returns a small summary (rank 0's view)."""
    from ckpt_core.policy.manager import CheckpointManager
    from ckpt_core.protocol.plugin_host import ConverterSet
    from ckpt_core.trainer.data import SyntheticTokens
    from ckpt_core.trainer.metrics import MetricsWriter, spool_path
    from ckpt_core.trainer.progress import Progress

    cfg = prepare(cfg)
    tcfg = cfg.training
    set_determinism(tcfg.seed, tcfg.deterministic)

    family, hf_config = model_family_for(cfg.model.name)
    model = family.build_model(hf_config)
    adapter = family.adapter(hf_config)
    initial = cfg.resolved_checkpoint().initial_load
    if initial.path and initial.format != "dcp":
        adapter.name_or_path = initial.path  # e.g. PEFT's base_model_name_or_path
    max_seq_len = hf_config.get("max_position_embeddings", tcfg.seq_len)
    if tcfg.seq_len > max_seq_len:
        raise ConfigError(
            f"training.seq_len = {tcfg.seq_len} exceeds the model's max_seq_len {max_seq_len}."
        )
    converters = ConverterSet.from_config(cfg.converters.enabled, cfg.converters.options)
    converters.convert(model)
    model.to(dist_info.device)
    degrees = cfg.parallelism.degrees(dist_info.world_size)
    check_expert_parallel(model, degrees["ep"])
    mesh = build_mesh(degrees, dist_info.device.type)
    dp_rank, dp_degree = data_parallel(mesh)
    pipe: Pipeline | None = None
    if degrees["pp"] > 1:  # several model parts per rank (ckpt_core.trainer.pipeline)
        pipe = Pipeline(
            model,
            mesh,
            cfg.parallelism,
            dist_info.device,
            tcfg.batch_size // dp_degree,
            lambda part: parallelize(part, mesh, cfg.parallelism),
        )
        model_parts = pipe.parts
    else:
        model_parts = [parallelize(model, mesh, cfg.parallelism)]
    model = model_parts[0]

    part_params = [[p for p in part.parameters() if p.requires_grad] for part in model_parts]
    params = [p for group in part_params for p in group]
    if not params:
        raise ConfigError("the model has no trainable parameters after the converters ran.")
    optimizers = [  # one per model part (its state is saved by parameter names)
        torch.optim.AdamW(
            group, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.95), eps=1e-8
        )
        for group in part_params
    ]
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(o, warmup_schedule(tcfg.warmup_steps)) for o in optimizers
    ]
    loader = SyntheticTokens(
        vocab_size=hf_config["vocab_size"],
        seq_len=tcfg.seq_len,
        batch_size=tcfg.batch_size,
        seed=tcfg.seed,
        rank=dp_rank,  # TP ranks of one data-parallel group read the same batch
        world_size=dp_degree,
        device=dist_info.device,
    )
    manager = CheckpointManager(
        cfg.resolved_checkpoint(),
        model_parts=model_parts,
        optimizers=optimizers,
        lr_schedulers=schedulers,
        dataloader=loader,
        converters=converters,
        sd_adapter=adapter,
    )
    if pipe is not None:
        pipe.attach(manager)  # exports see the unsplit model; loads expect part of it
    metrics: MetricsWriter | None = None
    progress: Progress | None = None
    preempted: int | None = None
    try:
        handler = manager.install_preemption_handler()  # checkpoint.preemption_signal
        # One writer: a second run on these folders fails here, before it loads or writes.
        metrics_file = spool_path(cfg.resolve(cfg.metrics.path))  # a URI's: a local spool
        metrics_folder = os.path.dirname(os.path.abspath(metrics_file))
        manager.acquire(also={"metrics.path": metrics_folder})
        manager.load()
        manager.preflight()  # folders writable, room for a checkpoint: before step 1
        state = manager.train_state
        start = state.step + 1
        if dist_info.is_main:
            n_params = sum(p.numel() for part in model_parts for p in part.parameters())
            logger.info(
                "model %s (%.2fM parameters, %d trainable tensors), converters %s, %d rank(s) "
                "on %s; %s",
                cfg.model.name,
                n_params / 1e6,
                len(params),
                converters.names or "none",
                dist_info.world_size,
                dist_info.device,
                f"steps {start}..{tcfg.steps}" if start <= tcfg.steps else "no step left",
            )
        metrics = MetricsWriter(
            cfg.resolve(cfg.metrics.path), enabled=dist_info.is_main, fresh=state.step == 0
        )
        progress = Progress(
            tcfg.steps, state.step, enabled=dist_info.is_main, log_every=cfg.metrics.log_every
        )
        tokens_per_step = tcfg.batch_size * tcfg.seq_len
        last_loss = math.nan
        for step in range(start, tcfg.steps + 1):
            t0 = time.perf_counter()
            inputs, targets = next(loader)
            if pipe is not None:
                loss = pipe.step(inputs, targets)  # the last stage's loss on every stage
            else:
                logits = model(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                loss.backward()
            if tcfg.max_grad_norm > 0:
                if pipe is not None:
                    pipe.clip_grad_norm(params, tcfg.max_grad_norm)
                else:
                    clip_grad_norm(params, tcfg.max_grad_norm)
            manager.maybe_wait_for_staging()
            lr = schedulers[0].get_last_lr()[0]
            for optimizer, scheduler in zip(optimizers, schedulers):
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            converters.post_optimizer_step(model_parts)
            state.step = step
            state.tokens_seen += tokens_per_step
            last_loss = dp_mean(loss, mesh)
            seconds = time.perf_counter() - t0
            metrics.write(
                {
                    "step": step,
                    "loss": last_loss,
                    "tokens": state.tokens_seen,
                    "seconds": seconds,
                    "lr": lr,
                    "tokens_per_s": tokens_per_step / seconds if seconds > 0 else 0.0,
                }
            )
            progress.update(step, last_loss, tokens_per_step / max(seconds, 1e-9), lr)
            manager.save(step, last_step=step == tcfg.steps)
            if step < tcfg.steps and manager.preemption_requested():
                _save_on_preemption(manager, handler, step, dist_info)
                preempted = step
                break
        if start > tcfg.steps:
            _finish_missing_export(manager, cfg, tcfg.steps)
    except BaseException:
        _close_quietly(manager)
        raise
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
    manager.close()
    if dist_info.is_main and start > tcfg.steps:
        logger.info("nothing to train: the checkpoint is already at step %d", start - 1)
    return {"start": start, "steps": tcfg.steps, "loss": last_loss, "preempted": preempted}


def _save_on_preemption(manager: Any, handler: Any, step: int, dist_info: Dist) -> None:
    """Every rank: save ``step`` now (synchronously), then one line from rank 0."""
    from ckpt_core.policy.preemption import PREEMPTED_EXIT

    saved = manager.save_now(step)
    if not dist_info.is_main:
        return
    name = handler.signal_name if handler is not None else None
    where = manager.config.folder
    if saved:
        logger.warning(
            "preempted (%s): step %d saved in %s; exit %d, resume with the same command",
            name or "signal on another rank",
            step,
            where,
            PREEMPTED_EXIT,
        )
    else:
        logger.warning(
            "preempted (%s) after step %d: checkpoints are off, nothing saved; exit %d",
            name or "signal on another rank",
            step,
            PREEMPTED_EXIT,
        )


def _finish_missing_export(manager: Any, cfg: TrainConfig, step: int) -> None:
    """A run killed between its last checkpoint and its final export exports on restart."""
    from ckpt_core.storage import layout

    folder = cfg.resolved_checkpoint().export.folder
    if manager.should_export(step, last_step=True) and not layout.exists(
        layout.step_dir(folder, step)
    ):
        logger.info("step %d is committed but its export is missing: exporting it now", step)
        manager.save(step, last_step=True)


def _close_quietly(manager: Any) -> None:
    """Drain the manager after an error without hiding the original exception."""
    try:
        manager.close()
    except Exception:  # noqa: BLE001
        logger.exception("checkpoint manager failed to close after an error")
