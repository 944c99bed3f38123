"""Streaming ``ckpt convert``: one group of tensors in memory at a time, whatever the model's size.

:class:`Conversion` builds the model on the ``meta`` device (nothing
allocated), applies the converters there, and plans the output
(:mod:`ckpt_core.convert.plan`): the groups of tensors that must meet, what
each group writes, and the files those outputs fill. Writing then goes group by
group: read the group's tensors from the source (:mod:`ckpt_core.convert.sources`:
DCP partial reads, safetensors slices) into one reused buffer, run the
converters' export transform and the adapters' ``to_hf`` on them, write the
results, and drop them before the next group. Peak memory above the
interpreter is the largest group plus the write buffer.

Safetensors files are planned to the byte (headers from the dry run's shapes),
so the output can be cut into pieces that meet at page boundaries, and
``--workers N`` writes those pieces in N processes at once (the parent plus
N-1 spawned workers that redo the same deterministic plan): the files are the
same whatever N is. DCP output is cut into data files (``__<i>_0.distcp``)
that the workers share; the parent writes ``.metadata``, ``config.json``, the
index, the manifest, and commits the folder by rename.

The write loop lives in :mod:`ckpt_core.convert.write`, the worker processes and
their plain-data frames in :mod:`ckpt_core.convert.workers`; this module keeps the
names the CLI and callers import from here.
"""

from __future__ import annotations

from ckpt_core.convert.workers import WORKERS_ENV, write_all
from ckpt_core.convert.write import (
    DCP_FILE_BYTES,
    Conversion,
    Piece,
    PieceResult,
    Reporter,
    Request,
    finish,
    hf_layout,
    split_pieces,
)

__all__ = [
    "DCP_FILE_BYTES",
    "WORKERS_ENV",
    "Conversion",
    "Piece",
    "PieceResult",
    "Reporter",
    "Request",
    "finish",
    "hf_layout",
    "split_pieces",
    "write_all",
]
