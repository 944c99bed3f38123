"""The ``hf`` model family: transformers models, for ``ckpt convert`` of their checkpoints.

A checkpoint of a transformers model records ``{"adapter": "hf", "config": ...}``
in its manifest (:class:`ckpt_core.content.hf_native.HFNativeAdapter`); converting it
offline builds the model with transformers from that config and keeps every
name. The family lists no ``model_type``; it is the fallback for every
``model_type`` transformers builds as a causal LM (``AutoModelForCausalLM``)
that no installed family lists, so an HF folder of a model type the reference
Llama reads still goes to that family, and one of ``gpt_neox`` or ``olmo``
comes here.
"""

from __future__ import annotations

from ckpt_core.content.families import ModelFamily
from ckpt_core.content.hf_native import REGISTRY_NAME, HFNativeAdapter, build_model


def causal_lm_type(model_type: str) -> bool:
    """any causal LM model_type transformers knows."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # transformers is optional
        return False
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def hf_family() -> ModelFamily:
    """The family of :class:`HFNativeAdapter` (registry name ``hf``)."""
    return ModelFamily(
        name=REGISTRY_NAME,
        adapter=HFNativeAdapter.from_hf_config,
        build_model=build_model,
        fallback=causal_lm_type,
    )
