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


def resolve_source(src: str, step: int | None) -> tuple[str, str]:
    """``(folder, kind)`` with kind ``"hf"`` or ``"dcp"``; picks a step of a checkpoint folder."""
    from ckpt_core.errors import CheckpointError
    from ckpt_core.storage import layout

    if not layout.exists(src):
        raise CheckpointError(f"convert: source {src} does not exist.")
    if not layout.is_uri(src) and not os.path.isdir(layout.filesystem(src)[1]):
        raise CheckpointError(
            f"convert: source {src} is a file; pass its folder (an HF folder, a DCP step "
            "folder or a folder of step-<N> folders)."
        )
    if step is None:
        if layout.exists(layout.join(src, ".metadata")):
            return src, "dcp"
        if layout.exists(layout.join(src, "config.json")):
            return src, "hf"
    steps = layout.committed_steps(src)
    if not steps:
        raise CheckpointError(
            f"convert: {src} is neither a DCP checkpoint (.metadata), an HF folder "
            "(config.json) nor a folder of committed step-<N> folders."
        )
    if step is not None and step not in steps:
        raise CheckpointError(f"convert: --step {step} is not in {src}; committed steps: {steps}.")
    return resolve_source(layout.step_dir(src, steps[-1] if step is None else step), None)


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


def _architecture(folder: str, kind: str, model_arg: str | None, manifest: dict | None):
    """``(model family, HF config dict)`` of the source."""
    from ckpt_core.adapters import family_for_hf_config, model_family
    from ckpt_core.errors import CheckpointError
    from ckpt_core.reference import LlamaStateDictAdapter, model_args, read_hf_config

    if model_arg is not None:
        config = LlamaStateDictAdapter(model_args(model_arg)).hf_config()
        return model_family("llama"), config
    if kind == "hf":
        config = read_hf_config(folder)
        return family_for_hf_config(config), config
    entry = (manifest or {}).get("model")
    if not entry:
        raise CheckpointError(
            f"convert: {folder} has no manifest 'model' entry, so its architecture is "
            "unknown; pass --model (a flavor name or an HF config.json)."
        )
    return model_family(entry["adapter"]), entry["config"]


def source_float_dtype(folder: str, kind: str) -> str | None:
    """The one floating dtype (16 bits or more) of the source's model tensors, if unique."""
    from ckpt_core.transforms import dtype_name, is_castable

    dtypes = set()
    if kind == "dcp":
        from ckpt_core.storage.dcp_io import storage_reader

        meta = storage_reader(folder).read_metadata()
        for key, item in meta.state_dict_metadata.items():
            props = getattr(item, "properties", None)
            if key.startswith("model.") and props is not None and is_castable(props.dtype):
                dtypes.add(props.dtype)
    else:
        from safetensors import safe_open

        from ckpt_core.storage.hf_reader import index_folder
        from ckpt_core.storage.hf_writer import SAFETENSORS_DTYPES

        by_name = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        for file in sorted(set(index_folder(folder).values())):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    dtype = by_name.get(f.get_slice(name).get_dtype())
                    if dtype is not None and is_castable(dtype):
                        dtypes.add(dtype)
    return dtype_name(dtypes.pop()) if len(dtypes) == 1 else None


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
    from ckpt_core.errors import CheckpointError
    from ckpt_core.exporter import write_export
    from ckpt_core.model_wrapper import ModelWrapper
    from ckpt_core.storage import layout, manifest

    if layout.exists(dst) and not overwrite:
        raise CheckpointError(f"convert: {dst} already exists; pass --overwrite to replace it.")
    folder, kind = resolve_source(src, step)
    if overwrite and _inside(folder, dst):
        raise CheckpointError(
            f"convert: --overwrite would delete the source {folder}: DST {dst} is the source "
            "or holds it; write to another folder."
        )
    recorded = manifest.read(folder)
    family, config = _architecture(folder, kind, model, recorded)
    # An export (HF or DCP) already holds the export view: no converters by default.
    is_export = (recorded or {}).get("kind") == "export"
    convs = _converters(converters, (recorded or {}).get("converters"), is_export=is_export)
    net = family.build_model(config)
    convs.convert(net)
    wrapper = ModelWrapper(net, convs)
    adapter = family.adapter(config)
    if dtype is None:  # keep the source's dtype (the model was built in fp32)
        dtype = source_float_dtype(folder, kind)
    target = layout.join(dst.rstrip("/") + ".ckpt-convert-new") if overwrite else dst
    if overwrite:
        layout.remove_tree(target)
    with _progress(progress) as bar:
        if bar is not None:
            size = sum(t.numel() * t.element_size() for t in wrapper.state_dict("full").values())
            reading = bar.add_task(f"reading {folder}", total=size)
        _load_source(wrapper, folder, kind, config, adapter, convs, recorded)
        if bar is not None:
            bar.update(reading, completed=size)
            task = bar.add_task(f"writing {dst}", total=None)
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
    if overwrite:
        layout.remove_tree(dst)
        _rename(target, dst)
    logger.info("converted %s (%s) to %s (%s)", folder, kind, dst, to)
    return folder


def _load_source(wrapper, folder, kind, config, adapter, convs, recorded=None) -> None:
    """Fill the freshly built model from the source folder.

    A checkpoint that holds only converter-owned weights (LoRA
    ``trainable_only_checkpoints``) gets its base from the manifest's ``base``
    entry first (checksum-checked), as a resume would.
    """
    from ckpt_core.exporter import load_hf

    if kind == "hf":
        load_hf(wrapper, folder, fmt=hf_load_format(config), sd_adapter=adapter, converters=convs)
        return
    base = (recorded or {}).get("base")
    if base:
        from ckpt_core.config import InitialLoadConfig
        from ckpt_core.owned_only import base_to_load

        initial = base_to_load(base, InitialLoadConfig())
        logger.info(
            "convert: %s holds converter-owned weights only; base: %s", folder, initial.path
        )
        if initial.format == "dcp":
            base_folder, _ = resolve_source(initial.path, None)
            _load_dcp(wrapper, base_folder, keep=lambda k: not convs.key_filter(k), strict=False)
        else:
            load_hf(wrapper, initial.path, fmt=initial.format, sd_adapter=adapter, converters=convs)
    _load_dcp(wrapper, folder, keep=None, strict=not base)


def _load_dcp(wrapper, folder: str, *, keep, strict: bool) -> None:
    """Load the model keys ``folder`` holds (those ``keep`` accepts) into ``wrapper``.

    With ``strict``, a model key the checkpoint lacks is an error naming it.
    """
    import torch.distributed.checkpoint as dcp

    from ckpt_core.errors import CheckpointError
    from ckpt_core.exporter import single_process_quiet
    from ckpt_core.storage.dcp_io import storage_reader
    from ckpt_core.storage.safe_metadata import read_metadata

    saved = read_metadata(folder).state_dict_metadata
    full = wrapper.state_dict("full")
    state = {k: v for k, v in full.items() if keep is None or keep(k)}
    missing = sorted(k for k in state if f"model.{k}" not in saved)
    if missing and strict:
        raise CheckpointError(
            f"convert: {folder} lacks {len(missing)} model tensors: {missing[:5]}. Is it a "
            "checkpoint of this architecture, written with these converters (--converters)?"
        )
    # Keys the model lacks are skipped on purpose (--converters none leaves LoRA factors
    # out), but float8 values loaded into a wider container would be raw, unscaled codes.
    narrowed = sorted(
        k
        for k, v in state.items()
        if k not in missing and _is_quantized_into_wider(saved[f"model.{k}"], v)
    )
    if narrowed:
        dtype = saved[f"model.{narrowed[0]}"].properties.dtype
        raise CheckpointError(
            f"convert: {folder} stores {len(narrowed)} model tensors as {dtype} (e.g. "
            f"{narrowed[:3]}), quantized values that need their scales: a quantized export "
            "(float8 export = 'fp8') written as DCP. Convert the resumable checkpoint it was "
            "exported from (checkpoint.folder/step-N) instead; an fp8 export in HF format "
            "(checkpoint.export.format = 'hf') is read back dequantized."
        )
    state = {k: v for k, v in state.items() if k not in missing}
    with single_process_quiet():
        dcp.load({"model": state}, storage_reader=storage_reader(folder))
    wrapper.load_state_dict(state, strict=False)


def _is_quantized_into_wider(meta, live) -> bool:
    """Whether ``meta`` stores a 1-byte float (float8) that ``live`` would silently widen."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ckpt_core.transforms import is_float8

    if not isinstance(meta, TensorStorageMetadata) or not isinstance(live, torch.Tensor):
        return False
    stored = meta.properties.dtype
    return is_float8(stored) and live.dtype != stored


def hf_load_format(config: dict) -> str:
    """``"hf_quantized"`` for fp8 weights with scales (DeepSeek-style blocks or
    compressed-tensors ``float-quantized``), else ``"hf"``."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method == "fp8" or (
        method == "compressed-tensors" and quant.get("format") == "float-quantized"
    ):
        return "hf_quantized"
    if quant:
        from ckpt_core.errors import CheckpointError

        raise CheckpointError(
            f"convert: the source is quantized (quant_method {method!r}, format "
            f"{quant.get('format')!r}); only fp8 weights with scales ('fp8' blocks or "
            "compressed-tensors 'float-quantized') are read back. Convert the DCP checkpoint "
            "the export came from instead."
        )
    return "hf"


def _inside(path: str, folder: str) -> bool:
    """Whether local ``path`` is ``folder`` or lies inside it."""
    from ckpt_core.storage import layout

    if layout.is_uri(path) or layout.is_uri(folder):
        return path.rstrip("/") == folder.rstrip("/")
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _rename(old: str, new: str) -> None:
    from ckpt_core.storage import layout

    fs, inner_old = layout.filesystem(old)
    _, inner_new = layout.filesystem(new)
    if fs is None:
        os.rename(inner_old, inner_new)
        layout.fsync_dir(os.path.dirname(inner_new) or ".")
    else:
        fs.mv(inner_old, inner_new, recursive=True)


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
