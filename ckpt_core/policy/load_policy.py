"""The manager's load policy: resume > initial load > fresh start, then additional loads.

* **Resume** from ``<folder>/step-<N>`` (the newest committed step with a
  manifest, or ``load_step`` / ``load(step)``, which must exist): every state
  except ``exclude_from_loading``.
* **Initial load**, only when the folder holds no committed step: DCP (model
  only, or every state when ``model_only = false``), or Hugging Face weights
  through :func:`ckpt_core.policy.exporter.load_hf`.
* **Fresh start** otherwise, logged.
* ``additional_load`` entries (e.g. a PEFT adapter) are applied after an
  initial load or a fresh start, never on resume: the checkpoint already holds
  the converter's trained weights.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ckpt_core.config import InitialLoadConfig
from ckpt_core.content import model_layout, owned_only
from ckpt_core.content.states import ModelState
from ckpt_core.errors import CheckpointError
from ckpt_core.policy import load_mechanics as resume
from ckpt_core.storage import layout, manifest, pins, signing
from ckpt_core.storage.safe_metadata import METADATA_NAME, read_metadata

if TYPE_CHECKING:
    from ckpt_core.policy.manager import CheckpointManager

logger = logging.getLogger(__name__)


def load_into(manager: CheckpointManager, step: int = -1) -> bool:
    """Run the load policy for ``manager``; see the module docstring."""
    config = manager.config
    requested = step if step >= 0 else config.load_step
    found = resume.find_step(config.folder, requested)
    if found is not None:
        with pins.reading_step(config.folder, found):  # retention leaves it alone meanwhile
            _resume(manager, found, explicit=requested >= 0)
        return True
    initial = config.initial_load
    loaded = False
    if initial.path:
        _initial_load(manager)
        loaded = True
    else:
        logger.info(
            "Fresh start: %s holds no committed step and no checkpoint.initial_load.path is set.",
            config.folder,
        )
    _additional_loads(manager)
    return loaded


def _states_to_load(manager: CheckpointManager, model_only: bool = False) -> dict[str, Any]:
    if model_only:
        return {"model": manager.states["model"]}
    excluded = set(manager.config.exclude_from_loading)
    return {k: v for k, v in manager.states.items() if k not in excluded}


def _load_dcp(
    manager: CheckpointManager, path: str, states: dict[str, Any], *, exact: bool
) -> None:
    metadata = read_metadata(path)
    model_sd = (states["model"] if "model" in states else manager.states["model"]).state_dict()
    elsewhere = _keys_elsewhere(manager, model_sd)
    resume.check_model(metadata, model_sd, source=path, dtypes=exact, elsewhere=elsewhere)
    resume.check_states(metadata, [n for n in states if n != "model"], source=path)
    resume.dcp_load(path, states, process_group=manager.process_group, metadata=metadata)


def _keys_elsewhere(manager: CheckpointManager, model_sd: dict[str, Any]) -> set[str]:
    """Model keys any rank holds (pipeline stages hold disjoint layers); empty on one rank."""
    group = manager.process_group
    if group is None:
        return set()
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, sorted(model_sd), group=group)
    return set().union(*gathered)


def _resume(manager: CheckpointManager, step: int, explicit: bool = False) -> None:
    folder = manager.config.folder
    found = resume.check_step(folder, step, explicit=explicit)
    path = layout.step_dir(folder, step)
    _check_layout(manager, path, found or None, own=True)
    signing.require_valid(path, manager.config.verify_key)
    states = _states_to_load(manager)
    if found.get("base"):  # an owned-only checkpoint: its frozen base first, then owned keys
        _initial_load(manager, owned_only.base_to_load(found["base"], manager.config.initial_load))
        keep = manager.keep_model_key or manager.converters.key_filter
        states["model"] = ModelState(manager.wrapper, keep)
    elif manager.keep_model_key is not None:  # a full checkpoint resumed by an owned-only run
        states["model"] = ModelState(manager.wrapper)
    _load_dcp(manager, path, states, exact=True)
    manager._loaded_step = step
    newer = [s for s in resume.steps_with_manifest(folder) if s > step]
    if newer:
        logger.warning(
            "Resumed from step %d, but %s also holds newer steps %s from the run that went on "
            "from there. Committed steps are never overwritten: saves at those steps will be "
            "skipped, and a later resume with load_step = -1 would pick step %d of that other "
            "run. Move them out of the folder to continue from step %d only.",
            step,
            folder,
            newer,
            newer[-1],
            step,
        )
    logger.info(
        "Resumed from %s (states: %s; excluded: %s)",
        path,
        ", ".join(states),
        manager.config.exclude_from_loading or "none",
    )


def _initial_load(manager: CheckpointManager, initial: InitialLoadConfig | None = None) -> None:
    # The base of an owned-only run (or of an owned-only checkpoint) has no converter keys.
    base_only = initial is not None or manager.keep_model_key is not None
    initial = initial or manager.config.initial_load
    path = initial.path
    assert path is not None
    if initial.format == "torchtitan":
        from ckpt_core.torchtitan.initial_load import load_torchtitan

        signing.require_valid(path, manager.config.verify_key)
        path = load_torchtitan(manager, initial)
    elif initial.format == "dcp":
        if not layout.exists(layout.join(path, METADATA_NAME)):
            steps = resume.steps_with_manifest(path)
            if not steps:
                raise CheckpointError(
                    f"checkpoint.initial_load.path = {path!r} is not a DCP checkpoint (no "
                    f"{METADATA_NAME}) and holds no committed step-<N> folder. Point it at a "
                    "DCP checkpoint folder, or set checkpoint.initial_load.format to 'hf'."
                )
            resume.check_step(path, steps[-1])
            path = layout.step_dir(path, steps[-1])
        signing.require_valid(path, manager.config.verify_key)
        _check_layout(manager, path, manifest.read(path), own=False)
        states = _states_to_load(manager, model_only=initial.model_only)
        owned = manager.converters.key_filter
        if base_only:
            states["model"] = ModelState(manager.wrapper, keep=lambda k: not owned(k))
        else:  # a plain base has no converter keys (LoRA factors keep their init)
            saved = read_metadata(path).state_dict_metadata
            states["model"] = ModelState(
                manager.wrapper, keep=lambda k: not owned(k) or f"model.{k}" in saved
            )
        with pins.reading(path):  # another run's step: its retention waits for us
            _load_dcp(manager, path, states, exact=False)
    else:
        from ckpt_core.policy.exporter import load_hf

        signing.require_valid(path, manager.config.verify_key)
        load_hf(
            manager.wrapper,
            path,
            fmt=initial.format,
            sd_adapter=manager.sd_adapter,
            converters=manager.converters,
        )
    logger.info(
        "Initial load from %s (format %s%s)",
        path,
        initial.format,
        ", model only" if initial.model_only or initial.format not in ("dcp", "torchtitan") else "",
    )


def _check_layout(
    manager: CheckpointManager, path: str, found: dict[str, Any] | None, *, own: bool
) -> None:
    """Refuse a step whose recorded rotary layout is not the model's, or that records none.

    Without a manifest: a step of the run's own folder (loaded because
    ``load_step`` asked for it) is refused only when its keys are torchtitan's;
    an initial-load folder is refused whatever its keys, since nothing says
    which layout its q/k weights are in (:mod:`ckpt_core.torchtitan.detect`).
    """
    from ckpt_core.torchtitan import detect

    if found is not None:
        model_layout.check(found.get("model"), manager.sd_adapter, source=path)
        if own:  # a resume continues the same model; an initial load may change RoPE on purpose
            model_layout.check_config(found.get("model"), manager._model_description, source=path)
        return
    saved = read_metadata(path).state_dict_metadata
    if own:
        detect.refuse_torchtitan(path, saved, reader=detect.CONFIG)
    else:
        detect.refuse_unrecorded(path, saved, reader=detect.CONFIG)


def _additional_loads(manager: CheckpointManager) -> None:
    entries = manager.config.additional_load
    if not entries:
        return
    from ckpt_core.policy.exporter import load_additional

    for entry in entries:
        not_found = load_additional(
            manager.wrapper,
            entry.path,
            converter=entry.converter,
            sd_adapter=manager.sd_adapter,
            converters=manager.converters,
        )
        if not_found:
            logger.warning(
                "additional_load %s (converter %s) did not provide %d key(s): %s",
                entry.path,
                entry.converter,
                len(not_found),
                ", ".join(not_found[:20]),
            )
        logger.info("Loaded %s through converter %s", entry.path, entry.converter)
