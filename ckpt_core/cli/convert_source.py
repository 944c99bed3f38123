"""Reading the source of ``ckpt convert``: what it is, its architecture, its weights.

* :func:`resolve_source`: an HF folder, a DCP step, or the latest (or ``--step``)
  step of a checkpoint folder;
* :func:`architecture`: the model family and HF config, from ``config.json``, the
  manifest's ``model`` entry, or ``--model``;
* :func:`source_float_dtype`: the one floating dtype the source holds, if unique;
* :func:`load_source`: fills a freshly built model from the source (an owned-only
  checkpoint's base first), refusing float8 codes it would widen without scales.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


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


def architecture(folder: str, kind: str, model_arg: str | None, manifest: dict | None):
    """``(model family, HF config dict)`` of the source.

    From ``--model`` (a family's flavor or an HF config path), else an HF
    source's ``config.json`` (its ``model_type``), else the manifest's ``model``
    entry (the family's name and config); families are plugins (:mod:`ckpt_core.adapters`).
    """
    from ckpt_core.adapters import family_for_hf_config, family_for_model, model_family
    from ckpt_core.errors import CheckpointError
    from ckpt_core.storage.hf_config_file import read_hf_config

    if model_arg is not None:
        return family_for_model(model_arg)
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
        from ckpt_core.storage.safe_metadata import read_metadata

        meta = read_metadata(folder)
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


def load_source(wrapper, folder, kind, config, adapter, convs, recorded=None) -> None:
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
    from ckpt_core.errors import CheckpointError
    from ckpt_core.exporter import single_process_quiet
    from ckpt_core.storage.safe_metadata import read_metadata, safe_load

    metadata = read_metadata(folder)
    saved = metadata.state_dict_metadata
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
        safe_load({"model": state}, folder, metadata=metadata)
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
    from ckpt_core.errors import DamagedCheckpointError

    quant = config.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise DamagedCheckpointError(
            f"convert: the source's config.json field quantization_config is a "
            f"{type(quant).__name__}, not an object; the config is damaged: fix or remove it."
        )
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
