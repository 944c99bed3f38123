"""A DCP folder as a flat ``{key: value}`` dict: read some or all entries, write a new folder.

For tools that move entries between layouts (``ckpt convert`` to and from
other frameworks' step folders): keys are DCP's own flat, dotted entry names,
values tensors or plain values. Reads go through
:func:`~ckpt_core.storage.safe_metadata.safe_load` (checked metadata, bytes
entries unpickled with ``weights_only``); writes through ckpt's DCP writer, so
the checksums for a manifest come with them. Nothing here knows what the
entries mean.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ckpt_core.storage.safe_metadata import read_metadata, safe_load


def entry_keys(metadata: Metadata) -> list[str]:
    """Every entry of a checkpoint, in the order its ``.metadata`` lists them."""
    return list(metadata.state_dict_metadata)


def read_entries(
    folder: str, keys: Iterable[str] | None = None, *, metadata: Metadata | None = None
) -> dict[str, Any]:
    """The entries ``keys`` (all by default) of the DCP folder, read in one partial load."""
    import warnings

    metadata = metadata if metadata is not None else read_metadata(folder)
    saved = metadata.state_dict_metadata
    wanted = list(saved) if keys is None else list(keys)
    state: dict[str, Any] = {}
    for key in wanted:
        entry = saved[key]
        if isinstance(entry, TensorStorageMetadata):
            state[key] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        else:
            state[key] = None
    if state:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            safe_load(state, folder, metadata=metadata)
    return state


def write_entries(folder: str, entries: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Write ``entries`` as the DCP checkpoint ``folder`` (one process); returns its checksums."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from ckpt_core.storage.dcp_io import storage_writer, written_checksums

    writer = storage_writer(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(dict(entries), storage_writer=writer, no_dist=True)
    return written_checksums(writer)
