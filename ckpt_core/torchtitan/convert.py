"""``ckpt convert --from torchtitan`` and ``--to torchtitan``: whole training states.

* **torchtitan → ckpt** (``--to dcp``): a ckpt step folder holding the model,
  the optimizer (Adam moments and step counts through the same q/k permutation
  and ``wqkv`` split as the weights), the LR scheduler and the train state, with
  a manifest recording the ``llama`` family and the rotate-half layout. Placed
  as ``<checkpoint.folder>/step-<N>`` it is the step a ckpt run resumes from.
  ``--to hf``: the model alone, exported as ckpt exports it (``config.json``
  included).
* **ckpt → torchtitan** (``--to torchtitan``): a step folder torchtitan 0.3's
  ``CheckpointManager`` loads into its model and optimizer, as a resume point
  (``<dump_folder>/<checkpoint.folder>/step-<N>``) or ``initial_load_path``;
  no manifest is written (torchtitan keeps none, and ckpt must not read
  torchtitan's names as its own).

Data-loader state never crosses (:data:`~ckpt_core.torchtitan.translate.DATALOADER_WHY`).
The whole state is held in memory while it is translated.
"""

from __future__ import annotations

import logging
from typing import Any

from ckpt_core.content import model_layout
from ckpt_core.errors import CheckpointError, ConfigError
from ckpt_core.storage import layout, store
from ckpt_core.torchtitan import architecture
from ckpt_core.torchtitan.translate import Heads, Translated, from_torchtitan, to_torchtitan

logger = logging.getLogger(__name__)

FAMILY = "llama"


def resolve_architecture(spec: str | None, *, what: str) -> tuple[Any, dict[str, Any]]:
    """``(llama family, config.json dict)`` from ``--model`` for a torchtitan conversion."""
    from ckpt_core.content.families import family_for_model, model_family

    if spec is None:
        raise ConfigError(
            f"convert: {what} records no architecture; pass --model: a torchtitan flavor "
            f"(llama3:{', llama3:'.join(architecture.LLAMA3_FLAVORS)}), a TOML/JSON file of "
            "torchtitan model arguments (dim, n_layers, n_heads, ...), or an HF config.json."
        )
    config = architecture.from_spec(spec)
    if config is not None:
        family = model_family(FAMILY)
    else:
        family, config = family_for_model(spec)
        if family.name != FAMILY:
            raise ConfigError(
                f"--model {spec!r} is a {family.name!r} model; torchtitan checkpoints convert "
                f"to and from its Llama 3, ckpt's {FAMILY!r} family."
            )
    adapter = family.adapter(config)
    return family, adapter.update_hf_config({})


def _log_dropped(result: Translated, direction: str) -> None:
    from ckpt_core.torchtitan.translate import DATALOADER_WHY

    reasons: dict[str, list[str]] = {}
    for key, why in result.dropped.items():
        reasons.setdefault(why, []).append(key)
    for why, dropped in reasons.items():
        level = logging.INFO if "RNG" in why else logging.WARNING
        what = "data-loader state" if why == DATALOADER_WHY else f"{len(dropped)} entries"
        logger.log(level, "%s: %s left out (%s): %s", direction, what, why, dropped[:5])


def _check_model(native: dict[str, Any], family: Any, config: dict[str, Any], source: str) -> None:
    """The translated weights are exactly the model's keys, with its shapes."""
    meta = family.build_model(config, device="meta").state_dict()
    want = {k: tuple(v.shape) for k, v in meta.items()}
    got = {k: tuple(v.shape) for k, v in native.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = [k for k in sorted(set(want) & set(got)) if want[k] != got[k]]
    if missing or extra or wrong:
        shown = "".join(
            f"; {k!r} is {list(got[k])}, the model's {list(want[k])}" for k in wrong[:3]
        )
        raise CheckpointError(
            f"convert: {source} does not fit the architecture given with --model "
            f"(missing {missing[:3]}, not in the model {extra[:3]}{shown}). "
            "Pass the model arguments the torchtitan run trained with."
        )


def from_torchtitan_step(
    folder: str, target: str, *, to: str, model: str | None, dtype: str | None
) -> None:
    """Write ``folder`` (a torchtitan step) into ``target`` as a ckpt step (``dcp``) or HF."""
    from ckpt_core.content.transforms import parse_dtype
    from ckpt_core.storage import manifest
    from ckpt_core.storage.dcp_entries import read_entries, write_entries

    family, config = resolve_architecture(model, what=f"the torchtitan step {folder}")
    if manifest.read(folder) is not None:
        raise CheckpointError(
            f"convert: {folder} has a ckpt manifest, so it is a ckpt checkpoint; drop "
            "--from torchtitan."
        )
    result = from_torchtitan(read_entries(folder), Heads.from_hf_config(config), source=folder)
    _log_dropped(result, "convert --from torchtitan")
    entries = result.entries
    native = {k[len("model.") :]: v for k, v in entries.items() if k.startswith("model.")}
    _check_model(native, family, config, folder)
    adapter = family.adapter(config)
    step = int(entries.get("train_state.step", -1))
    target_dtype = parse_dtype(dtype)
    if target_dtype is not None:
        for key, value in native.items():
            if value.is_floating_point():
                native[key] = value.to(target_dtype)
                entries[f"model.{key}"] = native[key]
    if to == "hf":
        _export_hf(native, family, config, adapter, target, dtype=dtype, step=step)
        return
    tmp = store.begin_folder(target, what="a checkpoint")  # in place on an object store
    known = write_entries(tmp, entries)
    described = model_layout.record({"adapter": family.name, "config": config}, adapter)
    data = manifest.build(
        kind="checkpoint", step=step, files=manifest.file_entries(tmp, known), model=described
    )
    store.commit_folder(tmp, target, data)  # manifest last
    states = sorted({k.split(".", 1)[0] for k in entries})
    logger.info("convert: torchtitan step %s -> ckpt step %s (states %s)", folder, target, states)


def _export_hf(native, family, config, adapter, target: str, *, dtype, step: int) -> None:
    from ckpt_core.content.model_wrapper import ModelWrapper
    from ckpt_core.policy.exporter import write_export
    from ckpt_core.protocol.plugin_host import ConverterSet

    model = family.build_model(config)
    wrapper = ModelWrapper(model, converters=ConverterSet([]))
    wrapper.load_state_dict(native, strict=True)
    write_export(
        wrapper, target, fmt="hf", dtype=dtype, sd_adapter=adapter, converters=ConverterSet([]),
        step=step,
    )  # fmt: skip


def to_torchtitan_step(
    folder: str, target: str, *, recorded: dict[str, Any] | None, model: str | None
) -> None:
    """Write the ckpt step ``folder`` into ``target`` as a torchtitan 0.3 step folder."""
    from ckpt_core.content.families import model_family
    from ckpt_core.storage.dcp_entries import read_entries, write_entries

    entry = (recorded or {}).get("model")
    if model is not None:
        family, config = resolve_architecture(model, what=folder)
    elif entry:
        family, config = model_family(entry["adapter"]), entry["config"]
        if family.name != FAMILY:
            raise ConfigError(
                f"convert: {folder} holds a {family.name!r} model; --to torchtitan writes "
                f"torchtitan's Llama 3 from ckpt's {FAMILY!r} family."
            )
    else:
        raise ConfigError(
            f"convert: {folder} has no manifest 'model' entry, so its architecture is unknown; "
            "pass --model (a flavor or an HF config.json)."
        )
    model_layout.check(entry, family.adapter(config), source=folder)
    converters = [c.get("name") for c in (recorded or {}).get("converters") or []]
    if converters:
        raise ConfigError(
            f"convert: {folder} was written with converters {converters}, whose keys and "
            "transforms torchtitan does not have; export the merged model (--to hf) and load it "
            "in torchtitan with checkpoint.initial_load_in_hf = true."
        )
    entries = read_entries(folder)
    result = to_torchtitan(entries, Heads.from_hf_config(config), source=folder)
    _log_dropped(result, "convert --to torchtitan")
    # torchtitan's step has no manifest: in place on an object store, DCP's .metadata,
    # written after every data file, is what makes it complete.
    tmp = store.begin_folder(target, what="a torchtitan step", marker=".metadata")
    write_entries(tmp, result.entries)
    if tmp != target:
        layout.commit(tmp, target)
    logger.info(
        "convert: ckpt step %s -> torchtitan step %s; torchtitan resumes it with "
        "checkpoint.exclude_from_loading = ['dataloader']",
        folder,
        target,
    )
