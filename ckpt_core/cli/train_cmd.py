"""``ckpt train``: the reference trainer (see docs/training.md).

``ckpt train [--config FILE] [--nproc N] [--section.field VALUE ...]``. With no
arguments it runs the embedded default (the ``debug`` Llama, a short run that
shows the loss falling, checkpoints and a bf16 Hugging Face export, all under
``./outputs``).

Exit status: 0 done, 2 bad input, 75 preempted (a ``checkpoint.preemption_signal``
arrived and the current step was saved: run the same command again), 128 + n when a
second signal cut the preemption save short (the last committed step is intact).
"""

from __future__ import annotations

import argparse
import logging

HELP = "train the reference Llama with checkpoints and exports (the end-to-end job)"

logger = logging.getLogger("ckpt_core.trainer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ckpt train``; ``--section.field VALUE`` overrides pass through."""
    parser.add_argument("--config", metavar="FILE", help="TOML config (default: embedded)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="ranks on this machine; N > 1 runs under torchrun (gloo on CPU, NCCL on CUDA)",
    )
    parser.epilog = (
        "Any config field can be overridden as --section.field VALUE, "
        "e.g. --training.steps 50 --converters.enabled lora."
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Validate the config, then train here or relaunch under torchrun."""
    from ckpt_core.errors import CkptError, ConfigError
    from ckpt_core.trainer.config import load_train_config
    from ckpt_core.trainer.launch import (
        check_devices,
        die_with_launcher,
        env_rank,
        relaunch,
        under_torchrun,
    )

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}.")
    if under_torchrun():
        die_with_launcher()
    cfg = load_train_config(args.config, extra)

    if args.nproc > 1 and not under_torchrun():
        from ckpt_core.trainer.loop import prepare

        prepare(cfg)  # fail once, here, rather than once per rank
        check_devices(cfg.job.device, args.nproc)
        if cfg.training.batch_size % args.nproc:
            raise ConfigError(
                f"training.batch_size = {cfg.training.batch_size} is not divisible by "
                f"--nproc {args.nproc}: each rank takes an equal slice of the global batch."
            )
        argv = list(extra)
        if args.config is not None:
            argv = ["--config", args.config, *argv]
        from ckpt_core.policy.preemption import parse_signals

        return relaunch(
            args.nproc,
            argv,
            verbose=bool(getattr(args, "verbose", False)),
            forward=parse_signals(cfg.checkpoint.preemption_signal),
        )

    from ckpt_core.trainer.launch import init_distributed, shutdown_distributed
    from ckpt_core.trainer.loop import train

    if env_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
    try:
        dist_info = init_distributed(cfg.job.device)
        summary = train(cfg, dist_info)
    except CkptError as exc:
        if env_rank() != 0:
            # Every rank hits the same config/checkpoint error: rank 0 reports it.
            logger.debug("rank %d: %s", env_rank(), exc)
            return exc.exit_code
        raise
    finally:
        shutdown_distributed()
    if summary.get("preempted") is not None:
        from ckpt_core.policy.preemption import PREEMPTED_EXIT

        return PREEMPTED_EXIT  # the step is saved: the same command resumes after it
    return 0
