"""Small random transformers Qwen3 / Qwen3-MoE models, and the reference families' round trips."""

from __future__ import annotations

import torch

from ckpt_core import ModelWrapper
from ckpt_core.content.families import model_family
from ckpt_core.policy.exporter import load_hf, write_export

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # wider than hidden_size / heads, as in Qwen3
    vocab_size=96,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)


def hf_model(model_type: str, seed: int = 0, **overrides):
    """A random ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` (fp32, eval mode).

    Every tensor is informative: norms away from 1, router away from 0.
    """
    import transformers

    config_class = {"qwen3": transformers.Qwen3Config, "qwen3_moe": transformers.Qwen3MoeConfig}
    config = config_class[model_type](**{**SIZES, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF's init leaves norms at 1 and the router at 0
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def native_from_hf_folder(folder: str, family_name: str):
    """``(model, adapter)``: the family's model built from the folder's config, weights loaded."""
    family = model_family(family_name)
    config = family.config_for(folder)
    model = family.build_model(config).eval()
    adapter = family.adapter(config)
    load_hf(ModelWrapper(model), folder, sd_adapter=adapter)
    return model, adapter


def export_fp32(model, adapter, folder: str) -> None:
    """The model's HF export in fp32 (the writer the manager uses)."""
    write_export(ModelWrapper(model), folder, fmt="hf", dtype="float32", sd_adapter=adapter, step=1)


def tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))
