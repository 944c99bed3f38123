"""``[checkpoint.initial_load] format = "torchtitan"``: start a ckpt run from a torchtitan step.

Reads the step one group of entries at a time (the top-level ones, then each
layer's weights and optimizer state), translates each group
(:mod:`~ckpt_core.torchtitan.translate`) and copies it into the live model and,
with ``model_only = false``, the live optimizer, LR scheduler and train state,
so the run continues from torchtitan's step with its Adam moments. Sharded
(FSDP2) tensors receive only their own rows of each translated tensor.

The architecture is the live model's: its state-dict adapter's config gives the
heads the q/k permutation needs, and every translated tensor must have the live
tensor's shape.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import torch

from ckpt_core.content import model_layout
from ckpt_core.errors import CheckpointError, ConfigError
from ckpt_core.torchtitan.translate import (
    DATALOADER_WHY,
    Heads,
    from_torchtitan,
    native_model_keys,
)

if TYPE_CHECKING:
    from ckpt_core.config import InitialLoadConfig
    from ckpt_core.policy.manager import CheckpointManager

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _groups(names: list[str]) -> list[list[str]]:
    """Entry names grouped by layer (top-level entries first)."""
    by: dict[int, list[str]] = {}
    for name in names:
        m = _LAYER.search(name)
        by.setdefault(int(m.group(1)) if m else -1, []).append(name)
    return [by[k] for k in sorted(by)]


def copy_into(live: torch.Tensor, full: torch.Tensor, *, key: str, source: str) -> None:
    """Copy ``full`` into ``live`` (a tensor, or this rank's rows of a sharded DTensor)."""
    from torch.distributed.tensor import DTensor

    if tuple(live.shape) != tuple(full.shape):
        raise CheckpointError(
            f"{source}: {key!r} is {list(full.shape)} after translation, and the model's is "
            f"{list(live.shape)}; was the torchtitan run another architecture?"
        )
    with torch.no_grad():
        if isinstance(live, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(
                live.shape, live.device_mesh, live.placements
            )
            rows = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            live._local_tensor.copy_(full[rows])
        else:
            live.copy_(full)


def load_torchtitan(manager: CheckpointManager, initial: InitialLoadConfig) -> str:
    """Load the torchtitan step at ``initial.path`` into the manager's states; returns it."""
    from ckpt_core.storage import manifest
    from ckpt_core.storage.dcp_entries import entry_keys, read_entries
    from ckpt_core.storage.safe_metadata import read_metadata
    from ckpt_core.torchtitan.steps import step_folder

    folder = step_folder(initial.path)
    if manifest.read(folder) is not None:
        raise ConfigError(
            f"checkpoint.initial_load.path = {folder!r} is a ckpt checkpoint (it has a manifest); "
            'set checkpoint.initial_load.format = "dcp".'
        )
    adapter = manager.sd_adapter
    if adapter is None or model_layout.layout_of(adapter) != model_layout.ROTATE_HALF:
        raise ConfigError(
            'checkpoint.initial_load.format = "torchtitan" loads into ckpt\'s Llama (a model '
            "whose state-dict adapter computes with the rotate-half layout); this model's "
            f"adapter is {type(adapter).__name__ if adapter else None}."
        )
    heads = Heads.from_hf_config(adapter.update_hf_config({}))
    metadata = read_metadata(folder)
    names = entry_keys(metadata)
    owned = manager.converters.key_filter
    live_model = {k: v for k, v in manager.wrapper.state_dict("full").items() if not owned(k)}
    saved = native_model_keys(names, heads)
    missing, extra = sorted(set(live_model) - saved), sorted(saved - set(live_model))
    if missing or extra:
        raise CheckpointError(
            f"{folder} does not hold this model's weights (missing {missing[:3]}, not in the "
            f"model {extra[:3]}); was the torchtitan run another architecture?"
        )
    full_state = not initial.model_only
    wanted = [n for n in names if full_state or not n.startswith(_NON_MODEL)]
    optim = manager.states.get("optimizer") if full_state else None
    live_optim = optim.state_dict() if optim is not None else {}
    filled: set[str] = set()
    plain: dict[str, Any] = {}
    for group in _groups(wanted):
        translated = from_torchtitan(
            read_entries(folder, group, metadata=metadata), heads, source=folder
        )
        for key, value in translated.entries.items():
            head, _, rest = key.partition(".")
            if head == "model" and rest in live_model:
                copy_into(live_model[rest], value, key=rest, source=folder)
                filled.add(key)
            elif head == "optimizer" and rest in live_optim:
                if isinstance(live_optim[rest], torch.Tensor) and live_optim[rest].dim() > 0:
                    copy_into(live_optim[rest], value, key=key, source=folder)
                else:
                    live_optim[rest] = value
                filled.add(key)
            else:
                plain[key] = value
        for key, why in translated.dropped.items():
            if why != DATALOADER_WHY:  # the data loader's is one warning below
                logger.info("initial load from torchtitan: %s left out (%s)", key, why)
    if optim is not None:
        absent = sorted(k for k in live_optim if f"optimizer.{k}" not in filled)
        if absent:
            raise CheckpointError(
                f"{folder} holds no optimizer state for {len(absent)} entries of this run's "
                f"optimizer (e.g. {absent[:3]}); set initial_load.model_only = true to load the "
                "weights only."
            )
        optim.load_state_dict(live_optim)
    if full_state:
        _other_states(manager, plain, folder)
    return folder


_NON_MODEL = ("optimizer.", "lr_scheduler.", "train_state.", "dataloader")


def _other_states(manager: CheckpointManager, plain: dict[str, Any], folder: str) -> None:
    """LR scheduler step count and the train state's counters."""
    ts = manager.train_state
    if "train_state.step" in plain:
        ts.step = int(plain["train_state.step"])
        ts.tokens_seen = int(plain.get("train_state.tokens_seen", 0))
    sched = manager.states.get("lr_scheduler")
    if sched is not None and "lr_scheduler.last_epoch" in plain:
        epoch = int(plain["lr_scheduler.last_epoch"])
        for scheduler in sched.schedulers:
            groups = scheduler.optimizer.param_groups
            if all("initial_lr" in group for group in groups):  # loaded with the optimizer
                scheduler.base_lrs = [group["initial_lr"] for group in groups]
            scheduler.last_epoch = epoch
            scheduler._step_count = epoch + 1
            scheduler._last_lr = [group["lr"] for group in groups]
    elif sched is not None:
        logger.warning("%s holds no lr_scheduler state; the schedule starts over.", folder)
    if "dataloader" in manager.states:
        logger.warning(
            "initial load from torchtitan: data-loader state not loaded: %s", DATALOADER_WHY
        )
