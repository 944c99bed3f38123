"""Owned-only checkpoints: resumable steps that hold only converter-owned model keys.

A converter instance whose ``checkpoint_view`` attribute is ``"owned"`` (LoRA
with ``trainable_only_checkpoints = true``) says: "every model key I do not own
is frozen and comes from the base the run started from". The manager then

* saves, under ``model``, only the keys such converters own (the optimizer
  state holds only trainable parameters anyway), and records the base in the
  step's manifest: ``"base": {"path", "format", "checksum"}``;
* resumes by loading that base first (through the same code as
  ``checkpoint.initial_load``), after checking that its checksum is unchanged,
  then the step's owned keys and every other state.

Such runs need ``checkpoint.initial_load.path``: without a base on disk a resume
could not rebuild the frozen weights. The base checksum is the CRC-32 of the
per-file checksums: taken from the base's own ``manifest.json`` when it has one
(a ckpt export or checkpoint), else computed by reading its files once per
process.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any

from ckpt_core.config import CheckpointConfig, InitialLoadConfig
from ckpt_core.errors import CheckpointError, ConfigError, DamagedCheckpointError
from ckpt_core.protocol.plugin_host import ConverterSet
from ckpt_core.storage import layout, manifest

logger = logging.getLogger(__name__)

OWNED = "owned"
_CHECKSUMS: dict[str, str] = {}


def owned_only_converters(converters: ConverterSet | None) -> list[str]:
    """Names of the enabled converters whose ``checkpoint_view`` is ``"owned"``."""
    if not converters:
        return []
    return [c.name for c in converters if getattr(c, "checkpoint_view", "full") == OWNED]


def model_key_filter(converters: ConverterSet | None) -> Callable[[str], bool] | None:
    """Predicate for the model keys an owned-only checkpoint keeps; ``None``: keep all."""
    names = set(owned_only_converters(converters))
    if not names:
        return None
    assert converters is not None

    def keep(fqn: str) -> bool:
        return converters.owner(fqn) in names

    return keep


def check_config(config: CheckpointConfig, converters: ConverterSet | None) -> None:
    """An owned-only run needs a base: ``checkpoint.initial_load.path``."""
    names = owned_only_converters(converters)
    if names and config.enable and not config.load_only and not config.initial_load.path:
        raise ConfigError(
            f"Converter(s) {names} save owned-only checkpoints (e.g. "
            "converters.lora.trainable_only_checkpoints = true), which need the frozen base "
            "to resume from, but checkpoint.initial_load.path is not set. Set it to the base "
            "model (HF folder or DCP checkpoint), or save full checkpoints."
        )


def base_checksum(path: str) -> str:
    """``crc32:<hex>`` over the base's files (name, size and CRC-32 of each)."""
    if path in _CHECKSUMS:
        return _CHECKSUMS[path]
    recorded = manifest.read(path)
    files: dict[str, Any]
    if recorded and recorded.get("files"):
        files = dict(recorded["files"])
    else:
        files = {}
        for rel in manifest.list_files(path):
            if rel == manifest.MANIFEST_NAME or rel.rsplit("/", 1)[-1].startswith("."):
                continue
            full = layout.join(path, rel)
            files[rel] = {"checksum": manifest.file_checksum(full)}
    if not files:
        raise CheckpointError(f"checkpoint.initial_load.path {path!r} holds no files.")
    lines = "".join(f"{rel}:{files[rel]['checksum']}\n" for rel in sorted(files))
    value = manifest.crc32_hex(zlib.crc32(lines.encode()))
    _CHECKSUMS[path] = value
    return value


def base_record(initial: InitialLoadConfig) -> dict[str, Any]:
    """The manifest's ``base`` entry for the run's initial load."""
    assert initial.path is not None
    return {
        "path": initial.path,
        "format": initial.format,
        "checksum": base_checksum(initial.path),
    }


#: Formats a ``base`` record may name (those of ``checkpoint.initial_load.format``).
BASE_FORMATS = ("dcp", "hf", "hf_quantized")


def check_base_record(recorded: Any) -> dict[str, Any]:
    """``recorded`` if it is a manifest ``base`` entry of the right shape, else an error.

    The path is whatever the run was configured with (it may lie anywhere), so it
    is only checked to be a non-empty string; ``format`` must be one of
    :data:`BASE_FORMATS` and ``checksum`` a ``crc32:`` string.
    """
    problem = None
    if not isinstance(recorded, dict):
        problem = f"is a {type(recorded).__name__}, not an object"
    elif not isinstance(recorded.get("path"), str) or not recorded["path"]:
        problem = f"has path {recorded.get('path')!r}, not a folder name"
    elif recorded.get("format", "dcp") not in BASE_FORMATS:
        problem = f"has format {recorded.get('format')!r}, not one of {list(BASE_FORMATS)}"
    elif not isinstance(recorded.get("checksum"), str):
        problem = f"has checksum {recorded.get('checksum')!r}, not a 'crc32:...' string"
    if problem:
        raise DamagedCheckpointError(
            f"The manifest's base entry {problem}; the checkpoint's manifest is damaged or "
            "crafted: restore it, or load a full checkpoint."
        )
    return recorded


def base_to_load(recorded: dict[str, Any], initial: InitialLoadConfig) -> InitialLoadConfig:
    """The base a resume loads: the configured one (or the recorded path), checksum-checked."""
    recorded = check_base_record(recorded)
    path = initial.path or recorded.get("path")
    if not path or not layout.exists(path):
        raise CheckpointError(
            f"This checkpoint holds only converter-owned weights and needs its base "
            f"{recorded.get('path')!r}, which does not exist. Set "
            "checkpoint.initial_load.path to a copy of that base."
        )
    _CHECKSUMS.pop(path, None)  # the base may have changed on disk since
    found = base_checksum(path)
    if found != recorded.get("checksum"):
        raise CheckpointError(
            f"The base at {path!r} has checksum {found}, but this checkpoint was trained on "
            f"{recorded.get('path')!r} with checksum {recorded.get('checksum')}. Point "
            "checkpoint.initial_load.path at the original base."
        )
    return InitialLoadConfig(
        path=path, format=recorded.get("format", initial.format), model_only=True
    )
