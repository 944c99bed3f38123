"""Reading the source of ``ckpt convert``: what it is, its architecture, its weights.

* :func:`resolve_source`: an HF folder, a DCP step, or the latest (or ``--step``)
  step of a checkpoint folder;
* :func:`architecture`: the model family and HF config, from ``config.json``, the
  manifest's ``model`` entry, or ``--model``;
* :func:`source_float_dtype`: the one floating dtype the source holds, if unique;
* :func:`hf_load_format`: how an HF source's weights are read (fp8 with scales or plain).

Reading the weights themselves is :mod:`ckpt_core.convert.sources`' (one group at a time).
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
        if layout.exists(layout.join(src, "config.json")) or _holds_safetensors(src):
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


def _holds_safetensors(folder: str) -> bool:
    """Whether ``folder`` holds ``*.safetensors`` files directly (an HF folder without config)."""
    from ckpt_core.storage import layout

    try:
        return any(name.endswith(".safetensors") for name in layout.listdir(folder))
    except OSError:
        return False


def architecture(folder: str, kind: str, model_arg: str | None, manifest: dict | None):
    """``(model family, HF config dict)`` of the source.

    From ``--model`` (a family's flavor or an HF config path), else an HF
    source's ``config.json`` (its ``model_type``), else the manifest's ``model``
    entry (the family's name and config); families are plugins (:mod:`ckpt_core.content.families`).
    """
    from ckpt_core.content.families import family_for_hf_config, family_for_model, model_family
    from ckpt_core.errors import CheckpointError
    from ckpt_core.storage.hf_config_file import read_hf_config

    if model_arg is not None:
        return family_for_model(model_arg)
    if kind == "hf":
        from ckpt_core.storage import layout

        if not layout.exists(layout.join(folder, "config.json")):
            raise CheckpointError(
                f"convert: {folder} holds safetensors files but no config.json, so its "
                "architecture is unknown; pass --model with the config.json (or HF folder) "
                "these weights belong to, or a flavor such as llama:tiny (ckpt plugins lists "
                "the flavors)."
            )
        config = read_hf_config(folder)
        return family_for_hf_config(config), config
    entry = (manifest or {}).get("model")
    if not entry:
        raise CheckpointError(
            f"convert: {folder} has no manifest 'model' entry, so its architecture is "
            "unknown; pass --model (a flavor name such as llama:tiny, which ckpt plugins "
            "lists, or the HF config.json of the model it was saved from)."
        )
    return model_family(entry["adapter"]), entry["config"]


def source_float_dtype(folder: str, kind: str) -> str | None:
    """The one floating dtype (16 bits or more) of the source's model tensors, if unique."""
    from ckpt_core.content.transforms import dtype_name, is_castable

    dtypes = set()
    if kind == "dcp":
        from ckpt_core.storage.safe_metadata import read_metadata

        meta = read_metadata(folder)
        for key, item in meta.state_dict_metadata.items():
            props = getattr(item, "properties", None)
            if key.startswith("model.") and props is not None and is_castable(props.dtype):
                dtypes.add(props.dtype)
    else:
        from ckpt_core.storage.hf_reader import index_folder, open_safetensors
        from ckpt_core.storage.hf_writer import SAFETENSORS_DTYPES

        by_name = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        for file in sorted(set(index_folder(folder).values())):
            with open_safetensors(file) as f:
                for name in f.keys():
                    dtype = by_name.get(f.get_slice(name).get_dtype())
                    if dtype is not None and is_castable(dtype):
                        dtypes.add(dtype)
    return dtype_name(dtypes.pop()) if len(dtypes) == 1 else None


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
