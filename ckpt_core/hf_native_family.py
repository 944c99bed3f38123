"""The ``hf`` model family: transformers models, for ``ckpt convert`` of their checkpoints.

A checkpoint of a transformers model records ``{"adapter": "hf", "config": ...}``
in its manifest (:class:`ckpt_core.hf_native.HFNativeAdapter`); converting it
offline builds the model with transformers from that config and keeps every
name. The family lists no ``model_type``: an HF folder of a model type the
reference Llama reads still goes to that family.
"""

from __future__ import annotations

from ckpt_core.adapters import ModelFamily
from ckpt_core.hf_native import REGISTRY_NAME, HFNativeAdapter, build_model


def hf_family() -> ModelFamily:
    """The family of :class:`HFNativeAdapter` (registry name ``hf``)."""
    return ModelFamily(
        name=REGISTRY_NAME,
        adapter=HFNativeAdapter.from_hf_config,
        build_model=build_model,
    )
