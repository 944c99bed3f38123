"""Loading a DCP step: choose it, check it, compare it with the model, read it.

Used by :class:`ckpt_core.policy.manager.CheckpointManager` (policy) and by the CLI.
Nothing here decides *whether* to load; it makes a load either exact or a
clear error:

* :func:`find_step` — the newest committed step with a manifest, or the one asked for.
* :func:`check_step` — every file the manifest lists is present with its size
  (one ``stat`` each) before DCP opens anything; a damaged step is refused,
  naming the file and the newest intact step to pass as ``load_step``.
* :func:`check_model` — the live model's keys and shapes against the
  checkpoint's ``.metadata`` (read with the restricted unpickler).
* :func:`dcp_load` — DCP loads in place into the live (possibly sharded)
  tensors, which reshards N ranks to M for free.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ckpt_core.content.model_wrapper import tensor_shape
from ckpt_core.errors import CheckpointError, DamagedCheckpointError, first_of
from ckpt_core.storage import layout, manifest
from ckpt_core.storage.safe_metadata import read_metadata, safe_load

logger = logging.getLogger(__name__)

#: Entries a checkpoint may lack without error (e.g. saved without CUDA).
OPTIONAL_PREFIXES = ("train_state.rng.",)


def steps_with_manifest(folder: str) -> list[int]:
    """Committed steps that carry a manifest (the others are not resume points)."""
    steps = []
    for s in layout.committed_steps(folder):
        try:
            found = manifest.read(layout.step_dir(folder, s))
        except CheckpointError as exc:
            logger.warning("Ignoring %s: %s", layout.step_dir(folder, s), exc)
            continue
        if found is not None:
            steps.append(s)
        else:
            logger.warning(
                "Ignoring %s: it has no readable %s (not written by a completed save).",
                layout.step_dir(folder, s),
                manifest.MANIFEST_NAME,
            )
    return steps


def find_step(folder: str, requested: int = -1) -> int | None:
    """``requested`` if committed (else :class:`CheckpointError`); with -1 the newest."""
    if requested >= 0:
        if requested not in layout.committed_steps(folder):
            available = steps_with_manifest(folder)
            raise CheckpointError(
                f"checkpoint step {requested} was requested (load_step / load(step)) but "
                f"{layout.step_dir(folder, requested)} is not a committed step. Committed "
                f"steps in {folder}: {available or 'none'}. Pass one of them, or -1 for the "
                "latest."
            )
        return requested
    steps = steps_with_manifest(folder)
    return steps[-1] if steps else None


def newest_intact(folder: str, exclude: int | None = None) -> int | None:
    """Newest step whose files all match their manifest sizes."""
    for s in reversed(steps_with_manifest(folder)):
        if s == exclude:
            continue
        try:
            if not manifest.check_sizes(layout.step_dir(folder, s)):
                return s
        except CheckpointError:
            continue
    return None


def check_step(folder: str, step: int, *, explicit: bool = False) -> dict[str, Any]:
    """Manifest of ``step`` after checking files and sizes; raises naming bad files.

    A step without a manifest (written by another tool) is refused unless it was
    asked for explicitly (``explicit``): then it loads, with a warning.
    """
    path = layout.step_dir(folder, step)
    found = manifest.read(path)
    if found is None and explicit:
        logger.warning(
            "%s has no %s: loading it as asked, without checking its files.",
            path,
            manifest.MANIFEST_NAME,
        )
        return {}
    problems = manifest.check_sizes(path, found)
    unsafe = [p for p in problems if p.reason == "unsafe"]
    if unsafe:
        raise DamagedCheckpointError(
            f"Checkpoint {path} is refused: its manifest entry {unsafe[0].file!r} was "
            f"{unsafe[0].detail}. A step holds only plain files; it was crafted or damaged."
        )
    if problems:
        intact = newest_intact(folder, exclude=step)
        hint = (
            f"The newest intact step is {intact} (its file sizes match its manifest; "
            f"`ckpt verify {layout.step_dir(folder, intact)}` also checks checksums): set "
            f"checkpoint.load_step = {intact} to resume from it (and remove or move the "
            "damaged folder)."
            if intact is not None
            else "No other intact step exists in this folder."
        )
        listed = first_of(problems, 3, sep="; ")
        raise DamagedCheckpointError(f"Checkpoint {path} is damaged ({listed}). {hint}")
    return found or {}


def check_model(
    metadata: Metadata,
    model_sd: Mapping[str, Any],
    *,
    source: str,
    dtypes: bool = True,
    elsewhere: Collection[str] = (),
) -> None:
    """Compare live model keys/shapes (and dtypes) with ``model.*`` entries of ``metadata``.

    ``elsewhere``: keys other ranks' model parts hold (pipeline stages); a
    checkpoint key among them is not unexpected here.
    """
    saved = {
        k[len("model.") :]: v
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith("model.")
    }
    missing = sorted(k for k in model_sd if k not in saved)
    held = set(elsewhere)
    unexpected = sorted(k for k in saved if k not in model_sd and k not in held)
    lines = []
    if missing:
        lines.append(f"Model keys missing from the checkpoint ({len(missing)}): {_few(missing)}")
    if unexpected:
        lines.append(
            f"Checkpoint keys the model does not have ({len(unexpected)}): {_few(unexpected)}"
        )
    mismatches = []
    for key in sorted(set(model_sd) & set(saved)):
        meta, live = saved[key], model_sd[key]
        if not isinstance(meta, TensorStorageMetadata) or not isinstance(live, torch.Tensor):
            continue
        want, got = tensor_shape(live), tuple(meta.size)
        if want != got:
            mismatches.append(
                f"Shape mismatch for {key!r}: model {list(want)}, checkpoint {list(got)}"
            )
        elif dtypes and meta.properties.dtype != live.dtype:
            mismatches.append(
                f"Dtype mismatch for {key!r}: model {live.dtype}, checkpoint "
                f"{meta.properties.dtype}"
            )
    lines += mismatches[:_SHOWN]
    if len(mismatches) > _SHOWN:
        lines.append(f"... and {len(mismatches) - _SHOWN} more tensors whose shape or dtype differ")
    if lines:
        raise CheckpointError(
            f"{source} does not match the model (a checkpoint from a different architecture "
            "or converter set?):\n" + "\n".join(lines)
        )


_SHOWN = 5  # mismatched tensors listed one per line; the rest are counted


def _few(keys: list[str], limit: int = 20) -> str:
    return first_of(keys, limit)


def check_states(metadata: Metadata, names: list[str], *, source: str) -> None:
    """Each state in ``names`` must have at least one entry in the checkpoint."""
    present = {k.split(".", 1)[0] for k in metadata.state_dict_metadata}
    absent = [n for n in names if n not in present]
    if absent:
        raise CheckpointError(
            f"{source} holds no {', '.join(repr(a) for a in absent)} state (it has: "
            f"{sorted(present)}). Add {absent} to checkpoint.exclude_from_loading to load "
            "the rest."
        )


def drop_optional_absent(metadata: Metadata, state: dict[str, Any], name: str) -> dict[str, Any]:
    """Drop optional nested entries (see :data:`OPTIONAL_PREFIXES`) the checkpoint lacks."""
    saved = metadata.state_dict_metadata

    def prune(prefix: str, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        out = {}
        for k, v in value.items():
            key = f"{prefix}.{k}"
            if not isinstance(v, Mapping) and key.startswith(OPTIONAL_PREFIXES):
                if key not in saved:
                    continue
            out[k] = prune(key, v)
        return out

    return prune(name, state)


def dcp_load(
    path: str,
    states: dict[str, Any],
    *,
    process_group: Any = None,
    metadata: Metadata | None = None,
) -> None:
    """Load ``states`` (name -> Stateful) in place from the DCP checkpoint at ``path``.

    Stateful objects are turned into state dicts here, loaded in place, then given
    back through their ``load_state_dict``.
    """
    metadata = metadata if metadata is not None else read_metadata(path)
    plain = {}
    for name, obj in states.items():
        sd = obj.state_dict() if hasattr(obj, "state_dict") else obj
        plain[name] = drop_optional_absent(metadata, sd, name)
    safe_load(plain, path, process_group=process_group, metadata=metadata)
    for name, obj in states.items():
        if hasattr(obj, "load_state_dict"):
            obj.load_state_dict(plain[name])
