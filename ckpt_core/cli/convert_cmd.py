"""``ckpt convert SRC DST --to hf|dcp``: offline conversion through the export pipeline.

One process reads a source written on any number of ranks:

* an HF folder (``config.json`` + safetensors): the architecture comes from
  ``config.json`` through the model-family registry (:mod:`ckpt_core.adapters`);
  fp8 block-quantized folders are dequantized;
* a DCP checkpoint or export (``.metadata``): the architecture comes from its
  manifest's ``model`` entry, or from ``--model`` when it has none;
* a checkpoint folder of ``step-<N>`` folders: the latest step (or ``--step``).

The model is built fresh, the converters are applied (by default those recorded
in the source's manifest, with their options, so a LoRA checkpoint becomes a
merged model; ``--converters none`` exports the raw full view), the weights are
loaded and :func:`ckpt_core.exporter.write_export` writes DST.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

HELP = "convert a checkpoint or export between DCP and Hugging Face formats"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ckpt convert``."""
    parser.add_argument("src", help="source: HF folder, DCP step folder or checkpoint folder")
    parser.add_argument("dst", help="destination folder (must not exist unless --overwrite)")
    parser.add_argument("--to", required=True, choices=["hf", "dcp"], help="output format")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="cast floating tensors to this dtype (default: the source's, when it has one)",
    )
    parser.add_argument(
        "--converters",
        default=None,
        help="comma-separated converters to apply, or 'none' (default: the source manifest's)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="architecture (flavor name or HF config.json) for a DCP source without manifest",
    )
    parser.add_argument("--step", type=int, default=None, help="step of a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def _converters(
    arg: str | None, recorded: list[dict[str, Any]] | None, *, is_export: bool = False
) -> Any:
    """The converters to apply: ``--converters``, else the recorded ones (none for an export).

    Options always come from the source's manifest when it records the converter.
    """
    from ckpt_core.discovery import discover_converters
    from ckpt_core.errors import ConfigError
    from ckpt_core.plugins import Converters

    recorded = recorded or []
    if arg is None:
        names = [] if is_export else [c["name"] for c in recorded]
    elif arg.strip().lower() in ("none", ""):
        names = []
    else:
        names = [n.strip() for n in arg.split(",") if n.strip()]
    options = {c["name"]: c.get("options") or {} for c in recorded if c["name"] in names}
    dropped = [c["name"] for c in recorded if c["name"] not in names]
    if dropped and not is_export:
        logger.warning(
            "convert: the source was written with converters %s that are not applied (--converters "
            "%s): the keys they own (e.g. LoRA factors) are not read, and the output is the "
            "model without them.",
            dropped,
            arg,
        )
    available = discover_converters()
    absent = [n for n in names if n not in available]
    if arg is None and absent:
        others = ",".join(n for n in names if n in available) or "none"
        raise ConfigError(
            f"convert: the source's manifest records converters {names}, and {absent} "
            f"{'is' if len(absent) == 1 else 'are'} not installed (installed: "
            f"{', '.join(sorted(available)) or 'none'}). Install the distribution that "
            f"provides it, or convert without it: --converters {others} (the keys it owns "
            "are then not read; float8, which owns none, changes nothing in a high-precision "
            "output)."
        )
    return Converters.from_config(names, options)


def _progress(enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )


def convert(
    src: str,
    dst: str,
    *,
    to: str,
    dtype: str | None = None,
    converters: str | None = None,
    model: str | None = None,
    step: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Convert ``src`` into ``dst``; returns the source folder actually read."""
    from ckpt_core.cli import convert_dest
    from ckpt_core.cli.convert_source import (
        architecture,
        load_source,
        resolve_source,
        source_float_dtype,
    )
    from ckpt_core.cli.failures import unwrap
    from ckpt_core.errors import CheckpointError
    from ckpt_core.exporter import write_export
    from ckpt_core.model_wrapper import ModelWrapper
    from ckpt_core.storage import manifest, pins

    target = convert_dest.prepare(dst, overwrite=overwrite)
    folder, kind = resolve_source(src, step)
    if overwrite and _inside(folder, dst):
        raise CheckpointError(
            f"convert: --overwrite would delete the source {folder}: DST {dst} is the source "
            "or holds it; write to another folder."
        )
    recorded = manifest.read(folder)
    family, config = architecture(folder, kind, model, recorded)
    # An export (HF or DCP) already holds the export view: no converters by default.
    is_export = (recorded or {}).get("kind") == "export"
    convs = _converters(converters, (recorded or {}).get("converters"), is_export=is_export)
    _check_size(family, config, folder, kind, model, recorded)
    adapter = family.adapter(config)
    net = _build(family, config)
    convs.convert(net)
    wrapper = ModelWrapper(net, convs)
    if dtype is None:  # keep the source's dtype (the model was built in fp32)
        dtype = source_float_dtype(folder, kind)
    with _progress(progress) as bar:
        if bar is not None:
            size = sum(t.numel() * t.element_size() for t in wrapper.state_dict("full").values())
            reading = bar.add_task(f"reading {folder}", total=size)
        with pins.reading(folder):  # a training run's retention keeps the step meanwhile
            load_source(wrapper, folder, kind, config, adapter, convs, recorded)
        if bar is not None:
            bar.update(reading, completed=size)
            task = bar.add_task(f"writing {dst}", total=None)
        try:
            write_export(
                wrapper,
                target,
                fmt=to,
                dtype=dtype,
                sd_adapter=adapter,
                converters=convs,
                step=(recorded or {}).get("step"),
                on_total=(lambda n: bar.update(task, total=n)) if bar is not None else None,
                progress=(lambda n: bar.advance(task, n)) if bar is not None else None,
            )
        except BaseException as exc:
            convert_dest.discard(target, overwrite=overwrite)
            cause = unwrap(exc)  # DCP wraps a failed write in its CheckpointException
            if isinstance(cause, OSError) and cause.filename is None:  # a write(2) names no path
                raise OSError(cause.errno, cause.strerror, dst) from exc
            raise
    if overwrite:
        convert_dest.replace(target, dst)
    logger.info("converted %s (%s) to %s (%s)", folder, kind, dst, to)
    return folder


def _inside(path: str, folder: str) -> bool:
    """Whether local ``path`` is ``folder`` or lies inside it."""
    from ckpt_core.storage import layout

    if layout.is_uri(path) or layout.is_uri(folder):
        return path.rstrip("/") == folder.rstrip("/")
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_size(family, config, folder: str, kind: str, model: str | None, recorded) -> None:
    """Refuse declared sizes that are malformed or that the source's data cannot hold.

    Runs before the model is built: the config's size fields are checked
    (:func:`~ckpt_core.hf_config_checks.check_sizes`, then the family's own
    ``check_config`` when it has one), then the parameters of
    the model built on the ``meta`` device (no memory) are compared with the
    bytes of the source's files; each parameter takes at least one stored byte.
    """
    from ckpt_core.hf_config_checks import check_sizes
    from ckpt_core.storage import layout

    if model is not None:
        source = f"--model {model}"
    elif kind == "hf":
        source = layout.join(folder, "config.json")
    else:
        source = f"the 'model' entry of {layout.join(folder, 'manifest.json')}"
    # Bounds of the fields present; which fields a config needs is its family's to say.
    check_sizes(config, source=source, required=False)
    if family.check_config is not None:
        family.check_config(config, source=source)
    if layout.is_uri(folder) or (kind == "dcp" and (recorded or {}).get("base")):
        return  # remote, or the weights live in the recorded base: nothing local to compare
    meta = family.build_model(config, device="meta")
    params = sum(p.numel() for p in meta.parameters())
    if kind == "hf":
        from ckpt_core.storage.hf_reader import check_fits

        check_fits(params, folder, what=source)
        return
    held = _regular_file_bytes(folder)
    if params > held:
        from ckpt_core.errors import DamagedCheckpointError

        raise DamagedCheckpointError(
            f"{source} describes a model of {params:,} parameters, but the files of {folder} "
            f"hold only {held:,} bytes; the entry does not belong to this checkpoint (or was "
            "crafted). Nothing was allocated."
        )


def _regular_file_bytes(folder: str) -> int:
    """Bytes of the regular files directly in the local ``folder`` (symlinks not followed)."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def _build(family, config):
    """The model built from ``config``; running out of memory is one line naming its size."""
    try:
        return family.build_model(config)
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
            raise
        from ckpt_core.errors import CheckpointError

        params = sum(p.numel() for p in family.build_model(config, device="meta").parameters())
        raise CheckpointError(
            f"convert: building the model ({params:,} parameters, {params * 4 / 2**30:.1f} GiB "
            "in fp32) ran out of memory; convert on a machine with more memory."
        ) from None


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Run ``ckpt convert``."""
    folder = convert(
        args.src,
        args.dst,
        to=args.to,
        dtype=args.dtype,
        converters=args.converters,
        model=args.model,
        step=args.step,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"converted {folder} -> {args.dst} ({args.to})")
    return 0
