"""``ckpt convert SRC DST --to hf|dcp``: offline conversion through the export pipeline.

One process reads a source written on any number of ranks:

* an HF folder (``config.json`` + safetensors): the architecture comes from
  ``config.json`` through the model-family registry (:mod:`ckpt_core.content.families`);
  fp8 block-quantized folders are dequantized;
* a DCP checkpoint or export (``.metadata``): the architecture comes from its
  manifest's ``model`` entry, or from ``--model`` when it has none; a DCP folder
  without a manifest records no q/k layout and is refused unless ``--from ckpt``
  declares it ckpt's (``--from torchtitan`` reads a torchtitan step, and
  ``--to torchtitan`` writes one: :mod:`ckpt_core.torchtitan.convert`);
* a checkpoint folder of ``step-<N>`` folders: the latest step (or ``--step``).

The model is never built: it is planned on the ``meta`` device with the
converters applied (by default those recorded in the source's manifest, with
their options, so a LoRA checkpoint becomes a merged model; ``--converters
none`` exports the raw full view), then read, converted and written one group
of tensors at a time (:mod:`ckpt_core.convert.streaming`), by ``--workers``
processes. The output is what :func:`ckpt_core.policy.exporter.write_export` writes.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from ckpt_core.cli import storage_args

HELP = "convert a checkpoint or export between DCP and Hugging Face formats"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ckpt convert``."""
    parser.epilog = (
        "torchtitan: --from torchtitan reads a torchtitan step folder, --to torchtitan writes "
        "one (docs/torchtitan.md)"
    )
    parser.add_argument("src", help="source: HF folder, DCP step folder or checkpoint folder")
    parser.add_argument("dst", help="destination folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--to", required=True, choices=["hf", "dcp", "torchtitan"], help="output format"
    )
    parser.add_argument(
        "--from",
        dest="source_format",
        default="auto",
        choices=["auto", "ckpt", "torchtitan"],
        help="source format: a torchtitan step folder, or 'ckpt' for a DCP folder without "
        "manifest that ckpt wrote (docs/torchtitan.md)",
    )
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
    parser.add_argument(
        "--max-shard-size",
        default=None,
        help="cap of one output file, e.g. 2GB or 500MiB (default: 5GiB for HF, 1GiB for DCP)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes writing the output files at once (the files are the same for any N)",
    )
    storage_args.add_argument(parser)


def _converters(
    arg: str | None, recorded: list[dict[str, Any]] | None, *, is_export: bool = False
) -> Any:
    """The converters to apply: ``--converters``, else the recorded ones (none for an export).

    Options always come from the source's manifest when it records the converter.
    """
    from ckpt_core.config import comma_list
    from ckpt_core.errors import ConfigError
    from ckpt_core.protocol.discovery import discover_converters
    from ckpt_core.protocol.plugin_host import ConverterSet

    recorded = recorded or []
    if arg is None:
        names = [] if is_export else [c["name"] for c in recorded]
    elif arg.strip().lower() in ("none", ""):
        names = []
    else:
        names = comma_list(arg)
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
    return ConverterSet.from_config(names, options)


def _progress(enabled: bool, width: int = 0):
    """A rich progress display (``None`` when disabled); descriptions get ``width`` columns."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )
    from rich.table import Column

    return Progress(
        TextColumn("{task.description}", table_column=Column(min_width=width, no_wrap=True)),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tensors]}"),
    )


def _reporter(bar, folder: str, dst: str, conversion):
    """Progress of reading and writing (bytes and tensors) on the rich bar."""
    import threading

    from ckpt_core.convert.streaming import Reporter

    if bar is None:
        return Reporter()
    full = conversion.full
    read_total = sum(
        full[k].numel() * full[k].element_size() for k in conversion.sources.read_keys(full)
    )
    count = sum(len(f.entries) for f in conversion.plan.files)
    reading = bar.add_task(f"reading {folder}", total=read_total, tensors="")
    writing = bar.add_task(
        f"writing {dst}", total=conversion.plan.data_bytes, tensors=f"0/{count} tensors"
    )

    class _Bar(Reporter):
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.tensors = 0

        def read(self, nbytes: int) -> None:
            bar.advance(reading, nbytes)

        def wrote(self, nbytes: int, tensors: int) -> None:
            with self.lock:
                self.tensors += tensors
                bar.update(writing, advance=nbytes, tensors=f"{self.tensors}/{count} tensors")

    return _Bar()


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
    workers: int = 1,
    max_shard_size: str | int | None = None,
    source_format: str = "auto",
) -> str:
    """Convert ``src`` into ``dst``, one group of tensors at a time; returns the folder read."""
    from ckpt_core.cli import convert_dest
    from ckpt_core.cli.convert_source import (
        architecture,
        hf_load_format,
        resolve_source,
        source_float_dtype,
    )
    from ckpt_core.cli.failures import unwrap
    from ckpt_core.errors import CheckpointError, ConfigError
    from ckpt_core.storage import manifest, pins

    if workers < 1:
        raise ConfigError(f"convert: --workers {workers} must be 1 or more.")
    marker = ".metadata" if to == "torchtitan" else manifest.MANIFEST_NAME
    target = convert_dest.prepare(dst, overwrite=overwrite, marker=marker)
    if "torchtitan" in (source_format, to):  # whole training states (ckpt_core.torchtitan)
        from ckpt_core.cli.convert_torchtitan import convert_cli

        return convert_cli(
            src, dst, target, to=to, source_format=source_format, model=model, step=step,
            dtype=dtype, overwrite=overwrite,
        )  # fmt: skip
    folder, kind = resolve_source(src, step)
    if overwrite and _inside(folder, dst):
        raise CheckpointError(
            f"convert: --overwrite would delete the source {folder}: DST {dst} is the source "
            "or holds it; write to another folder."
        )
    recorded = manifest.read(folder)
    if kind == "dcp" and recorded is None and source_format != "ckpt":
        _refuse_unrecorded(folder)  # no manifest: nothing records its q/k layout
    family, config = architecture(folder, kind, model, recorded)
    if kind == "dcp" and recorded is not None:
        from ckpt_core.content import model_layout

        model_layout.check(recorded.get("model"), family.adapter(config), source=folder)
    # An export (HF or DCP) already holds the export view: no converters by default.
    is_export = (recorded or {}).get("kind") == "export"
    convs = _converters(converters, (recorded or {}).get("converters"), is_export=is_export)
    what = _source_words(folder, kind, model)
    _check_size(family, config, folder, kind, what, recorded)
    quantized = kind == "hf" and hf_load_format(config) == "hf_quantized"
    if dtype is None:  # keep the source's dtype (the model's containers are its own)
        dtype = source_float_dtype(folder, kind)
    convert_dest.clear(dst, overwrite=overwrite)  # object store: the previous DST goes now
    with pins.reading(folder):  # a training run's retention keeps the step meanwhile
        try:
            _stream(
                folder,
                kind,
                family,
                config,
                convs,
                recorded,
                target,
                to=to,
                dtype=dtype,
                quantized=quantized,
                what=what,
                workers=workers,
                progress=progress,
                dst=dst,
                max_file_bytes=_size_arg(max_shard_size),
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


def _refuse_unrecorded(folder: str) -> None:
    """A DCP source without manifest: torchtitan's, or of a layout nothing records."""
    from ckpt_core.storage.safe_metadata import read_metadata
    from ckpt_core.torchtitan.detect import CONVERT, refuse_unrecorded

    refuse_unrecorded(folder, read_metadata(folder).state_dict_metadata, reader=CONVERT)


def _stream(folder, kind, family, config, convs, recorded, target, **opts) -> None:
    """Plan, check, write and commit the conversion into ``target``."""
    from ckpt_core.convert.streaming import (
        DCP_FILE_BYTES,
        Conversion,
        Request,
        finish,
        write_all,
    )
    from ckpt_core.policy.exporter import _export_manifest
    from ckpt_core.storage import layout, store
    from ckpt_core.storage.hf_writer import DEFAULT_MAX_SHARD_BYTES

    tmp = store.staging_for(target)  # beside it locally, in place on an object store
    request = Request(
        folder=folder,
        kind=kind,
        family=family.name,
        config=config,
        converters=convs.describe(),
        fmt=opts["to"],
        dtype=opts["dtype"],
        out=tmp,
        max_file_bytes=opts["max_file_bytes"]
        or (DEFAULT_MAX_SHARD_BYTES if opts["to"] == "hf" else DCP_FILE_BYTES),
        hf_quantized=opts["quantized"],
        base=_base(folder, recorded),
    )
    conversion = Conversion(request, family=family)
    conversion.sources.check(conversion.full, opts["what"], folder)
    store.begin_folder(target, what="an export")  # removes what a cut-off convert left
    for adapter in conversion.converter.subfolder_parts().values():
        layout.makedirs(layout.join(tmp, adapter.subfolder.strip("/")))
    width = len("writing ") + max(len(folder), len(opts["dst"]))
    with _progress(opts["progress"], width) as bar:
        reporter = _reporter(bar, folder, opts["dst"], conversion)
        results = write_all(conversion, request, opts["workers"], reporter)
    known = finish(conversion, results)
    step = (recorded or {}).get("step")
    data = _export_manifest(tmp, known, step, 1, conversion.converters, conversion.adapter)
    store.commit_folder(tmp, target, data)  # manifest last: the convert is complete


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def _size_arg(value: str | int | None) -> int | None:
    """``--max-shard-size``: bytes, or a number with a unit (``5GB``, ``500MiB``)."""
    import re

    from ckpt_core.errors import ConfigError

    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise ConfigError(
            f"convert: --max-shard-size {value!r} is not a size; pass bytes or a number with "
            "a unit: 5GB, 500MiB."
        )
    return int(float(match.group(1)) * _UNITS[unit])


def _base(folder: str, recorded) -> tuple[str, str] | None:
    """An owned-only checkpoint's base as ``(folder, format)``, from its manifest."""
    base = (recorded or {}).get("base")
    if not base:
        return None
    from ckpt_core.cli.convert_source import resolve_source
    from ckpt_core.config import InitialLoadConfig
    from ckpt_core.content.owned_only import base_to_load

    initial = base_to_load(base, InitialLoadConfig())
    logger.info("convert: %s holds converter-owned weights only; base: %s", folder, initial.path)
    if initial.format == "dcp":
        return resolve_source(initial.path, None)[0], "dcp"
    return initial.path, initial.format


def _source_words(folder: str, kind: str, model: str | None) -> str:
    """Where the source's architecture comes from, in an error message's words."""
    from ckpt_core.storage import layout

    if model is not None:
        return f"--model {model}"
    if kind == "hf":
        return layout.join(folder, "config.json")
    return f"the 'model' entry of {layout.join(folder, 'manifest.json')}"


def _inside(path: str, folder: str) -> bool:
    """Whether local ``path`` is ``folder`` or lies inside it."""
    from ckpt_core.storage import layout

    if layout.is_uri(path) or layout.is_uri(folder):
        return path.rstrip("/") == folder.rstrip("/")
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_size(family, config, folder: str, kind: str, source: str, recorded) -> None:
    """Refuse declared sizes that are malformed or that the source's data cannot hold.

    Runs before the model is built: the config's size fields are checked
    (:func:`~ckpt_core.content.hf_config_checks.check_sizes`, then the family's own
    ``check_config`` when it has one), then the parameters of
    the model built on the ``meta`` device (no memory) are compared with the
    bytes of the source's files; each parameter takes at least one stored byte.
    ``source`` names where the config came from.
    """
    from ckpt_core.content.hf_config_checks import check_sizes
    from ckpt_core.storage import layout

    # Bounds of the fields present; which fields a config needs is its family's to say.
    check_sizes(config, source=source, required=False)
    if family.check_config is not None:
        family.check_config(config, source=source)
    if (layout.is_uri(folder) and kind != "hf") or (kind == "dcp" and (recorded or {}).get("base")):
        return  # remote DCP, or the weights live in the recorded base: nothing to compare
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


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Run ``ckpt convert``."""
    storage_args.apply(args, args.src, args.dst)
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
        workers=args.workers,
        max_shard_size=args.max_shard_size,
        source_format=args.source_format,
    )
    print(f"converted {folder} -> {args.dst} ({args.to})")
    return 0
