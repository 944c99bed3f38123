"""The reference Llama: model, flavors, Hugging Face adapter and builders.

``build_model("debug")`` builds a named flavor, or the architecture of an HF
``config.json``/folder, freshly initialized; ``from_pretrained(path)`` also
loads the folder's weights (any sharding, any floating dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckpt_core.reference.adapter import LlamaStateDictAdapter
from ckpt_core.reference.flavors import FLAVORS, flavor_args
from ckpt_core.reference.hf_config import from_hf_config, is_hf_path, read_hf_config, to_hf_config
from ckpt_core.reference.model import ModelArgs, Transformer, rope_inv_freq


def model_args(name_or_path: str | dict[str, Any] | ModelArgs) -> ModelArgs:
    """Arguments for a flavor name, an HF folder / config.json path or a config dict.

    A folder's ``config.json`` is checked against its weights before anything is
    built (:func:`ckpt_core.storage.hf_reader.check_fits`).
    """
    return args_from(name_or_path, from_hf_config, FLAVORS, flavor_args)


def args_from(
    name_or_path: str | dict[str, Any] | ModelArgs,
    parse: Callable[..., ModelArgs],
    flavors: Mapping[str, ModelArgs],
    flavor: Callable[[str], ModelArgs],
) -> ModelArgs:
    """:func:`model_args` of any family built on the reference model.

    ``parse(config, source=...)`` reads a ``config.json`` dict, ``flavor(name)``
    copies a named size (and lists ``flavors`` when the name is unknown).
    """
    if isinstance(name_or_path, ModelArgs):
        return name_or_path
    if isinstance(name_or_path, dict):
        return parse(name_or_path)
    if name_or_path in flavors or not is_hf_path(name_or_path):
        return flavor(name_or_path)
    if name_or_path.endswith(".json"):
        return parse(read_hf_config(name_or_path), source=name_or_path)
    from ckpt_core.storage import hf_reader, layout

    source = layout.join(name_or_path, "config.json")
    args = parse(read_hf_config(name_or_path), source=source)
    hf_reader.check_fits(args.num_params(), name_or_path, what=source)  # weights hold it?
    return args


def build_model(
    name_or_path: str | dict[str, Any] | ModelArgs,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Transformer:
    """A freshly initialized reference Llama (``device="meta"`` skips initialization)."""
    return instantiate(Transformer, model_args(name_or_path), device=device, dtype=dtype)


def instantiate(
    model_class: type[Transformer],
    args: ModelArgs,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Transformer:
    """``model_class(args)`` on ``device``, initialized unless on the meta device."""
    with torch.device(device or "cpu"):
        model = model_class(args)
    if torch.device(device or "cpu").type != "meta":
        model.init_weights()
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def from_pretrained(path: str, *, dtype: torch.dtype | None = None) -> Transformer:
    """Architecture and weights of a Hugging Face Llama folder."""
    from ckpt_core.storage.hf_reader import read_into

    args = model_args(path)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")  # every parameter is read below: no random init
    model.rope_inv_freq = rope_inv_freq(args)
    if dtype is not None:
        model.to(dtype=dtype)
    # The adapter only renames, so the containers are the model's own tensors.
    read_into(LlamaStateDictAdapter(args).to_hf(model.state_dict()), path)
    return model


def adapter_for(model: Transformer) -> LlamaStateDictAdapter:
    """The state-dict adapter of a reference model."""
    return LlamaStateDictAdapter(model.args)


__all__ = [
    "FLAVORS",
    "LlamaStateDictAdapter",
    "ModelArgs",
    "Transformer",
    "adapter_for",
    "args_from",
    "build_model",
    "from_hf_config",
    "from_pretrained",
    "instantiate",
    "model_args",
    "read_hf_config",
    "to_hf_config",
]
