"""Export and HF load orchestration: content from the transforms, bytes from storage.

Called on every rank (each function is collective when a process group is
initialized) by the manager, ``ckpt convert`` and user code:

* :func:`write_export`: the export view as an HF folder (``fmt="hf"``) or a
  model-only DCP checkpoint (``fmt="dcp"``), written under a temporary name,
  committed by rename and described by ``manifest.json`` (kind ``"export"``).
* :func:`load_hf`: an HF safetensors folder (``"hf"``) or fp8 block-quantized
  one (``"hf_quantized"``) into the model's non-converter keys; each rank reads
  only its own shards.
* :func:`load_additional`: one converter's keys from its own format (a PEFT
  adapter folder); partial by nature, returns what it did not find.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ckpt_core.content import model_layout
from ckpt_core.content.transforms import StateDictTransforms, parse_dtype
from ckpt_core.errors import (
    CheckpointError,
    ConfigError,
    DamagedCheckpointError,
)
from ckpt_core.protocol.plugin_host import ConverterSet
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter
from ckpt_core.rank_zero import distributed_on, on_rank_zero
from ckpt_core.storage import layout, store

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("hf", "dcp")
LOAD_FORMATS = ("hf", "hf_quantized")


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if distributed_on():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if distributed_on():
        dist.barrier()


def _default_group() -> Any:
    """The default process group when one is initialized (what :func:`on_rank_zero` takes)."""
    import torch.distributed as dist

    return dist.group.WORLD if distributed_on() else None


def tmp_path_for(final_path: str) -> str:
    """The temporary folder beside ``final_path`` (``.tmp-step-N`` for ``step-N``)."""
    return store.sibling_tmp(final_path)


def write_export(
    wrapper: Any,
    final_path: str,
    *,
    fmt: str,
    dtype: str | torch.dtype | None,
    sd_adapter: StateDictAdapter | None,
    converters: ConverterSet | None = None,
    step: int | None = None,
    progress: Callable[[int], None] | None = None,
    max_shard_bytes: int | None = None,
    on_total: Callable[[int], None] | None = None,
    sign_key: Any = None,
) -> None:
    """Write the model's export view to ``final_path`` (collective on every rank).

    ``fmt``: ``"hf"`` (safetensors folder that transformers loads) or ``"dcp"``
    (model-only DCP, keys ``model.<fqn>``). ``dtype``: floating tensors are cast
    to it (``None`` keeps them). Refuses an existing ``final_path``.
    ``on_total(nbytes)`` is called once with the bytes of tensor data to write,
    then ``progress(nbytes)`` as they are written (per tensor for HF, once at the
    end for DCP); ``max_shard_bytes`` caps each HF safetensors file (default 5 GiB).
    ``sign_key`` (a private key or its PEM path) signs the folder before its commit.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r} is not supported; allowed: {EXPORT_FORMATS}.")
    target = parse_dtype(dtype)
    converters = converters if converters is not None else wrapper.converters
    transforms = StateDictTransforms(sd_adapter, converters)
    rank, world = _dist()
    tmp = store.staging_for(final_path)  # beside it locally, in place on an object store

    # Rank 0 writes the files: whatever fails there (an existing destination, a folder that
    # cannot be made, a full disk) is raised on every rank, none waits or goes on alone.
    # begin_folder refuses a committed export and clears what a crashed one left.
    group = _default_group()
    on_rank_zero(lambda: store.begin_folder(final_path, what="an export"), rank, group)
    try:
        known = _write_files(
            wrapper, tmp, fmt, target, transforms, rank, progress, on_total, max_shard_bytes
        )
        failure = None
    except Exception as exc:  # noqa: BLE001 - rank 0's is shared below; others raise theirs
        if rank != 0:
            raise
        known, failure = {}, exc
    _barrier()

    def commit() -> None:
        if failure is not None:
            raise failure
        data = _export_manifest(tmp, known, step, world, converters, sd_adapter)
        store.commit_folder(tmp, final_path, data, sign_key)

    on_rank_zero(commit, rank, group)
    logger.info(
        "exported the model as %s (%s) to %s", fmt, dtype or "dtypes as trained", final_path
    )


def _write_files(
    wrapper: Any,
    tmp: str,
    fmt: str,
    target: torch.dtype | None,
    transforms: StateDictTransforms,
    rank: int,
    progress: Callable[[int], None] | None,
    on_total: Callable[[int], None] | None,
    max_shard_bytes: int | None,
) -> dict[str, tuple[int, str]]:
    """The export's data files in ``tmp`` (collective); ``relative path → (size, crc)``."""
    if fmt == "hf":
        from ckpt_core.storage.hf_writer import (
            DEFAULT_MAX_SHARD_BYTES,
            total_bytes,
            write_hf_folder,
        )

        groups = transforms.export_groups(wrapper)
        config = transforms.hf_config(target, groups)
        if on_total is not None:
            on_total(total_bytes(groups, target))
        known = write_hf_folder(
            tmp,
            groups,
            dtype=target,
            config=config,
            is_writer=rank == 0,
            progress=progress,
            max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
        )
    else:
        view = transforms.export_view(wrapper, target)
        nbytes = sum(t.numel() * t.element_size() for t in view.values() if _is_tensor(t))
        if on_total is not None:
            on_total(nbytes)
        known = _write_dcp(tmp, view)
        if progress is not None:
            progress(nbytes)
    return known


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save in a single process" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_dcp(folder: str, state_dict: dict[str, Any]) -> dict[str, tuple[int, str]]:
    with single_process_quiet():
        return _dcp_save(folder, state_dict)


def _dcp_save(folder: str, state_dict: dict[str, Any]) -> dict[str, tuple[int, str]]:
    import torch.distributed.checkpoint as dcp

    try:
        from ckpt_core.storage.dcp_io import storage_writer, written_checksums
    except ImportError:  # the manager's storage module is optional here
        writer = dcp.FileSystemWriter(layout.filesystem(folder)[1], sync_files=True)
        dcp.save({"model": state_dict}, storage_writer=writer)
        return {}
    writer = storage_writer(folder)
    dcp.save({"model": state_dict}, storage_writer=writer)
    return written_checksums(writer)


def _export_manifest(
    folder: str,
    known: dict[str, tuple[int, str]],
    step: int | None,
    world: int,
    converters: ConverterSet | None,
    sd_adapter: StateDictAdapter | None,
) -> dict[str, Any]:
    """The export manifest of the files in ``folder``."""
    from ckpt_core.storage import manifest

    return manifest.build(
        kind="export",
        step=step if step is not None else -1,
        files=manifest.file_entries(folder, known),
        world_size=world,
        converters=converters.describe() if converters else [],
        model=model_layout.record(sd_adapter.describe() or None, sd_adapter)
        if sd_adapter is not None
        else None,
    )


def load_hf(
    wrapper: Any,
    path: str,
    *,
    fmt: str = "hf",
    sd_adapter: StateDictAdapter | None,
    converters: ConverterSet | None = None,
) -> None:
    """Load an HF folder into every key no converter owns (collective-free, per rank).

    Containers come from the live state dict through ``to_hf``: with FSDP2 each
    rank fills only its own shards. A key the folder lacks is an error.
    """
    from ckpt_core.storage.hf_reader import read_into

    if fmt not in LOAD_FORMATS:
        raise ConfigError(
            f"initial_load.format {fmt!r} is not an HF format; allowed: {LOAD_FORMATS}."
        )
    converters = converters if converters is not None else wrapper.converters
    transforms = StateDictTransforms(sd_adapter, converters)
    containers = transforms.base_containers(wrapper.state_dict("full"))
    # Pipeline stages (wrapper.partial) leave the other stages' tensors to other ranks.
    read_into(
        containers,
        path,
        quantized=fmt == "hf_quantized",
        strict=True,
        report_unexpected=not getattr(wrapper, "partial", False),
    )
    wrapper.load_state_dict(transforms.sd_adapter.from_hf(containers), strict=False)
    logger.info("loaded %d tensors from %s (%s)", len(containers), path, fmt)


def load_additional(
    wrapper: Any,
    path: str,
    *,
    converter: str,
    sd_adapter: StateDictAdapter | None,
    converters: ConverterSet | None,
) -> list[str]:
    """Load one converter's keys from its own format at ``path``; returns native keys not found.

    ``path`` may be the converter's folder itself or an export holding it in the
    adapter's ``subfolder``.
    """
    from ckpt_core.storage.hf_reader import read_into

    converters = converters if converters is not None else wrapper.converters
    transforms = StateDictTransforms(sd_adapter, converters)
    adapter, names, containers = transforms.owned_containers(wrapper.state_dict("full"), converter)
    folder = path
    if adapter.subfolder and layout.exists(layout.join(path, adapter.subfolder)):
        folder = layout.join(path, adapter.subfolder)
        _check_subfolder(path, folder, converter)
    from ckpt_core.storage.hf_reader import index_folder

    adapter.check_source(folder)
    available = index_folder(folder)
    unmatched = sorted(n for n in available if n not in containers)
    if containers and not any(n in available for n in containers):
        # PEFT's own loader only warns here and loads an adapter that does nothing.
        holds = f"it holds e.g. {unmatched[0]!r}" if unmatched else "it holds no tensors"
        raise CheckpointError(
            f"additional load of {converter!r} from {folder}: none of its "
            f"{len(available)} tensors matches the {len(containers)} that the model's "
            f"{converter!r} keys expect ({holds}; the model expects e.g. "
            f"{sorted(containers)[0]!r}). Wrong prefix, wrong base model, or other "
            "target modules?"
        )
    if unmatched:
        logger.warning(
            "additional load of %r from %s: %d tensors match no key of the model: %s",
            converter,
            folder,
            len(unmatched),
            unmatched[:10],
        )
    missing_hf = set(read_into(containers, folder, strict=False))
    found = {k: v for k, v in containers.items() if k not in missing_hf}
    if found:
        wrapper.load_state_dict(adapter.from_hf(found), strict=False)
    missing = sorted(k for k, hf in names.items() if any(n in missing_hf for n in hf))
    if missing:
        logger.warning(
            "additional load of %r from %s: %d keys not found: %s",
            converter,
            folder,
            len(missing),
            missing[:10],
        )
    if not names:
        logger.warning("additional load of %r: the model has no keys it owns", converter)
    return missing


def _check_subfolder(path: str, folder: str, converter: str) -> None:
    """Refuse a converter subfolder that is not a folder inside ``path`` (a symlink out)."""
    if layout.is_uri(path):
        return  # object stores have no symlinks
    root, real = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([root, real]) != root or not os.path.isdir(real):
        raise DamagedCheckpointError(
            f"additional load of {converter!r}: {folder} leads to {real}, which is not a "
            f"folder inside {root}; the export is damaged or was crafted: do not load it."
        )
