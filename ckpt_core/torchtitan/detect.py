"""Refusing rather than guessing: DCP folders whose layout nothing records.

A DCP folder without ckpt's ``manifest.json`` says nothing about the rotary
layout of its q/k weights (:mod:`ckpt_core.content.model_layout`). Two cases reach a
reader:

* keys that look like torchtitan's (:func:`~ckpt_core.torchtitan.keys.torchtitan_evidence`):
  refused, naming torchtitan and the option that reads it;
* keys that look like ckpt's: a torchtitan step whose keys were renamed by
  hand looks exactly like this, and would load and compute something else,
  so it is refused too unless the caller declared the layout (``ckpt convert
  --from ckpt``).
"""

from __future__ import annotations

from collections.abc import Iterable

from ckpt_core.errors import CheckpointError
from ckpt_core.torchtitan.keys import torchtitan_evidence

#: How each reader declares a torchtitan source, for the error messages.
CONVERT = "convert"
CONFIG = "config"


def _how(reader: str) -> str:
    if reader == CONVERT:
        return "ckpt convert SRC DST --from torchtitan --model ARCH"
    return '[checkpoint.initial_load] format = "torchtitan"'


def refuse_torchtitan(folder: str, keys: Iterable[str], *, reader: str) -> None:
    """Raise when ``keys`` look like a torchtitan step's (naming the key that shows it)."""
    evidence = torchtitan_evidence(keys)
    if evidence is None:
        return
    raise CheckpointError(
        f"{folder} is a torchtitan checkpoint (entry {evidence!r}; no ckpt manifest), whose "
        "q/k weights are in torchtitan's interleaved rotary layout; read it as one: "
        f"{_how(reader)}."
    )


def refuse_unrecorded(folder: str, keys: Iterable[str], *, reader: str) -> None:
    """Raise for a manifest-less DCP folder: torchtitan's by its keys, or of unknown layout."""
    keys = list(keys)
    refuse_torchtitan(folder, keys, reader=reader)
    declare = (
        "--from ckpt if ckpt's reference model wrote it (rotate-half q/k)"
        if reader == CONVERT
        else "convert it with ckpt convert SRC DST --to dcp --from ckpt --model ARCH if "
        "ckpt's reference model wrote it"
    )
    raise CheckpointError(
        f"{folder} has no ckpt manifest, so nothing records the rotary layout of its q/k "
        "weights, and a torchtitan checkpoint with its keys renamed to ckpt's looks exactly "
        f"like it (and would compute something else). If it came from torchtitan, renamed or "
        f"not: {_how(reader)}; else {declare}."
    )
