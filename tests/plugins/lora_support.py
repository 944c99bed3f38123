"""A tiny Llama-shaped model and a name-mapping adapter for the LoRA unit tests.

The model has the reference Llama's module names (``layers.N.attention.wq``,
``feed_forward.w1``, norms, embeddings, ``output``) but trivial math, so the
unit tests need neither the reference model nor transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ckpt_core.protocol.state_dict_adapter import StateDictAdapter

DIM, HIDDEN, KV, VOCAB = 32, 48, 16, 64

LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(DIM, DIM, bias=False)
        self.wk = nn.Linear(DIM, KV, bias=False)
        self.wv = nn.Linear(DIM, KV, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        mix = torch.tanh(q[..., :KV] * k) * v
        return self.wo(torch.cat([mix, q[..., KV:]], dim=-1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.feed_forward = FeedForward()
        self.attention_norm = nn.RMSNorm(DIM)
        self.ffn_norm = nn.RMSNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class TinyLlama(nn.Module):
    """``forward(tokens[b, s]) -> logits[b, s, vocab]`` with reference-Llama names."""

    def __init__(self, n_layers: int = 2) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(n_layers)})
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def init_weights(self) -> None:
        """Re-initialize like the reference model: every nn.Linear gets normal(0.02)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


def _map(name: str, layer_map: dict[str, str], top_map: dict[str, str], layer_prefix: str) -> str:
    for src, dst in top_map.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src) :]
    head, _, rest = name.partition(layer_prefix)
    index, _, path = rest.partition(".")
    for src, dst in layer_map.items():
        if path == src or path.startswith(src + "."):
            new_prefix = "model.layers." if layer_prefix == "layers." else "layers."
            return f"{new_prefix}{index}.{dst}{path[len(src) :]}"
    raise KeyError(name)


class ToyLlamaAdapter(StateDictAdapter):
    """Maps module paths (keeping the suffix), like the reference LlamaStateDictAdapter."""

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {_map(k, LAYER_NAMES, TOP_NAMES, "layers."): v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        layer_rev = {v: k for k, v in LAYER_NAMES.items()}
        top_rev = {v: k for k, v in TOP_NAMES.items()}
        return {_map(k, layer_rev, top_rev, "model.layers."): v for k, v in hf_state_dict.items()}


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every LoRA B factor non-zero values so the update is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def tokens(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def save_tiny_hf_llama(folder: str, vocab: int, perturb: bool = False) -> str:
    """Save a small random ``transformers`` Llama (fp32, untied) to ``folder``.

    With ``perturb``, weights are drawn N(0, 0.1) (norm weights around 1) so an
    adapter's effect on logits is well above rounding.
    """
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(folder)
    return folder
