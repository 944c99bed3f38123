"""Finding a torchtitan step: a ``step-<N>`` folder, or the newest in its checkpoint folder."""

from __future__ import annotations

import os
import re

from ckpt_core.errors import CheckpointError
from ckpt_core.storage import layout
from ckpt_core.storage.safe_metadata import METADATA_NAME

_STEP = re.compile(r"^step-(\d+)$")


def step_folder(path: str, step: int | None = None) -> str:
    """``path`` if it is a DCP folder, else its newest (or ``step``) ``step-<N>`` DCP folder.

    Like torchtitan's own loader, a step counts only when it holds ``.metadata``.
    """
    if step is None and layout.exists(layout.join(path, METADATA_NAME)):
        return path
    if not layout.exists(path):
        raise CheckpointError(f"torchtitan checkpoint {path} does not exist.")
    fs, inner = layout.filesystem(path)
    names = os.listdir(inner) if fs is None else [p.rsplit("/", 1)[-1] for p in fs.ls(inner)]
    steps = sorted(
        int(m.group(1))
        for n in names
        if (m := _STEP.match(n)) and layout.exists(layout.join(path, n, METADATA_NAME))
    )
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{path} holds no torchtitan step {step}; it has {steps}.")
        return layout.join(path, f"step-{step}")
    if not steps:
        raise CheckpointError(
            f"{path} is neither a DCP step folder (no {METADATA_NAME}) nor a torchtitan "
            "checkpoint folder of step-<N> folders."
        )
    return layout.join(path, f"step-{steps[-1]}")
