"""Small random Hugging Face Llamas built with transformers' own code, for tests."""

from __future__ import annotations

import torch

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def hf_llama(
    *,
    tied: bool = False,
    llama3: bool = False,
    seed: int = 0,
    layers: int = 2,
    vocab: int = 96,
    **overrides,
):
    """A random ``transformers.LlamaForCausalLM`` with tiny dimensions (fp32, eval mode).

    ``overrides`` replace ``LlamaConfig`` fields (e.g. ``head_dim``, ``num_key_value_heads``).
    """
    import transformers

    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if llama3:
        rope = {**LLAMA3_SCALING, "rope_theta": 500000.0}
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=tied,
    )
    config = transformers.LlamaConfig(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # HF's init leaves norms at 1: make every tensor informative
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def save_hf_llama(folder, **kwargs):
    """Save a random HF Llama to ``folder``; returns the model."""
    model = hf_llama(**kwargs)
    model.save_pretrained(str(folder))
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a transformers model, without cache."""
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits
