"""Pre-flight: find an unwritable or too small folder before step 1, not at the first save.

Before training, for every folder the run will write (checkpoints, exports,
the trainer's metrics):

1. the folder is created and a probe file is written and removed in it
   (a read-only mount, missing permissions or a dangling path fail here);
2. its free space (``shutil.disk_usage``; not for object-store URIs) is
   compared with the planned bytes of one checkpoint plus one export. Folders
   on the same file system share its free space, so their needs add up.

The planned bytes come from the live state: the model's ``full`` view (each
rank's shards, replicated tensors once) plus the optimizer state (its tensors
when it has any; before the first step an Adam-sized estimate of two copies of
the trainable parameters), summed over ranks; the export is every model tensor
at the export dtype; each plus 5% and 1 MiB for metadata and small states.
``checkpoint.preflight`` makes a space shortfall an error (default), a warning,
or skips the space check (``"off"``); the probe always runs.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from typing import Any

import torch

from ckpt_core.errors import PreflightError
from ckpt_core.storage import layout, object_errors

logger = logging.getLogger(__name__)

PREFLIGHT_MODES = ("error", "warn", "off")
#: Added to the tensor bytes of a plan: metadata, manifests, headers, RNG and other small
#: states (measured: the tiny flavor writes 12% more than its tensors, debug 2%).
OVERHEAD_FRACTION = 0.05
OVERHEAD_BYTES = 1 << 20


def with_overhead(nbytes: int) -> int:
    """``nbytes`` of tensors plus what a folder of them holds besides (0 stays 0)."""
    return int(nbytes * (1 + OVERHEAD_FRACTION)) + OVERHEAD_BYTES if nbytes > 0 else 0


def probe(folder: str, what: str) -> None:
    """Create ``folder`` and write then remove a probe file in it; :class:`PreflightError`."""
    name = f".ckpt-probe-{os.getpid()}"
    path = layout.join(folder, name)
    try:
        layout.makedirs(folder)
        fs, inner = layout.filesystem(path)
        if fs is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(inner, flags, 0o644)
            try:
                os.write(fd, b"ckpt pre-flight probe\n")
            finally:
                os.close(fd)
            os.unlink(inner)
        else:
            fs.pipe_file(inner, b"ckpt pre-flight probe\n")
            fs.rm(inner)
    except Exception as exc:
        explained = object_errors.explain(exc, folder)
        if explained is not None:
            raise PreflightError(f"{what}: {explained} Found before step 1.") from exc
        if not isinstance(exc, OSError):
            raise
        raise PreflightError(
            f"{what} {folder!r} is not writable ({exc.strerror or exc}); found before step 1. "
            f"Fix its permissions or mount, or point {what} at a writable folder."
        ) from exc


def tensor_bytes(value: Any, rank: int = 0) -> int:
    """Bytes this rank writes for the tensors in a nested state: a DTensor's local
    shard on every rank, a plain tensor on rank 0 only (DCP writes it once)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        local = value.to_local()
        return local.numel() * local.element_size()
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() if rank == 0 else 0
    if isinstance(value, dict):
        return sum(tensor_bytes(v, rank) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, rank) for v in value)
    return 0


def optimizer_bytes(optimizers: Iterable[torch.optim.Optimizer], rank: int = 0) -> int:
    """This rank's share of the optimizer state; before any step (no state yet) two
    copies of the trainable parameters, as Adam keeps (``state_dict()`` is not
    called: torch would run a zero step to create the state)."""
    total = 0
    for optim in optimizers:
        if optim.state:
            total += sum(tensor_bytes(s, rank) for s in optim.state.values())
            continue
        params = [p for g in optim.param_groups for p in g["params"] if p.requires_grad]
        total += 2 * sum(tensor_bytes(p, rank) for p in params)
    return total


def export_bytes(model_sd: dict[str, Any], dtype: str) -> int:
    """Bytes of an export of ``model_sd``: floating tensors at ``dtype``, whole (global) shapes."""
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    total = 0
    for value in model_sd.values():
        if isinstance(value, torch.Tensor):
            size = itemsize if value.is_floating_point() else value.element_size()
            total += value.numel() * size  # a DTensor's numel is the global one
    return total


def human(nbytes: float) -> str:
    """``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def check_space(needs: list[tuple[str, str, int]], mode: str = "error") -> None:
    """Compare ``(folder, what, bytes)`` needs with the free space of local folders.

    Needs of folders on one file system add up. ``mode``: ``"error"`` raises
    :class:`PreflightError`, ``"warn"`` logs one WARNING line, ``"off"`` skips.
    """
    if mode == "off":
        return
    by_device: dict[int, list[tuple[str, str, int]]] = {}
    for folder, what, nbytes in needs:
        if layout.is_uri(folder) or nbytes <= 0:
            continue
        local = layout.filesystem(folder)[1]
        by_device.setdefault(os.stat(local).st_dev, []).append((local, what, nbytes))
    for entries in by_device.values():
        need = sum(n for _, _, n in entries)
        free = shutil.disk_usage(entries[0][0]).free
        if need <= free:
            continue
        names = " and ".join(f"{what} {folder!r}" for folder, what, _ in entries)
        message = (
            f"{names}: one checkpoint needs about {human(need)} ({need} bytes) but only "
            f"{human(free)} ({free} bytes) is free there. Free space or point the folder "
            "elsewhere; checkpoint.preflight = 'warn' or 'off' runs anyway."
        )
        if mode == "warn":
            logger.warning("pre-flight: %s", message)
        else:
            raise PreflightError(message)


def planned_bytes(
    model_sd: dict[str, Any],
    optimizers: Iterable[torch.optim.Optimizer],
    *,
    rank: int = 0,
    group: Any = None,
    export_dtype: str | None = None,
) -> tuple[int, int]:
    """``(checkpoint bytes, export bytes)`` with :func:`with_overhead`: the checkpoint
    summed over the ranks of ``group`` (collective when given), the export 0 when
    ``export_dtype`` is None."""
    local = tensor_bytes(model_sd, rank) + optimizer_bytes(optimizers, rank)
    if group is not None:
        import torch.distributed as dist

        total = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(total, group=group)
        local = int(total.item())
    export = export_bytes(model_sd, export_dtype) if export_dtype else 0
    return with_overhead(local), with_overhead(export)


def check(folders: list[tuple[str, str]], needs: dict[str, int], mode: str = "error") -> None:
    """Probe every ``(what, folder)``, then :func:`check_space` with ``needs[what]`` bytes."""
    for what, folder in folders:
        probe(folder, what)
    check_space([(folder, what, needs.get(what, 0)) for what, folder in folders], mode)
