"""The reference Llama: the Hugging Face Llama architecture under native names.

RMSNorm, rotary position embeddings (plain or with Llama 3 frequency scaling),
SwiGLU feed-forward and grouped-query attention, with optional tied input and
output embeddings. Parameter names follow the torchtitan convention
(``tok_embeddings``, ``layers.N.attention.wq``, ``feed_forward.w1``, ``norm``,
``output``); :class:`~ckpt_core.reference.adapter.LlamaStateDictAdapter` maps
them to Hugging Face names.

The rotary layout is Hugging Face's (``rotate_half``: the first and second
halves of each head are the real and imaginary parts), so converting weights
is a pure rename, with no q/k permutation.

With tied embeddings the model has no ``output`` module: the logits use
``tok_embeddings.weight`` directly, so the state dict holds that tensor once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    """Architecture of a reference Llama (one-to-one with an HF ``LlamaConfig``)."""

    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 256
    ffn_hidden_dim: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    #: Llama 3 scaling: ``{"factor", "low_freq_factor", "high_freq_factor",
    #: "original_max_position_embeddings"}``; ``None`` for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    #: Fields of the source ``config.json`` kept for a faithful re-export.
    extra_hf_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})."
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)

    def num_params(self) -> int:
        """Number of parameters of a model with these arguments."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * hd * (2 * self.n_heads + 2 * kv)
        ffn = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3 scaling if configured."""
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for the halves ``x1, x2`` of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 like Hugging Face's."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings and a causal mask."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[batch, heads, seq, head_dim]``, before the rotary embedding."""
        b, s, _ = x.shape
        # -1 heads: under tensor parallel a rank holds n_heads / tp of them.
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.heads(x)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` (gate, down and up projections)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward with residual connections."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The reference Llama. ``forward(tokens[b, s]) -> logits[b, s, vocab]``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): self.make_block(args, i) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = (
            None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        )
        self.register_buffer("rope_inv_freq", rope_inv_freq(args), persistent=False)

    def make_block(self, args: ModelArgs, layer_id: int) -> nn.Module:
        """Block ``layer_id`` (families built on this model return their own)."""
        return TransformerBlock(args)

    def init_weights(self, buffer_device: torch.device | str | None = None, std: float = 0.02):
        """(Re)initialize parameters and the rotary buffer (e.g. after a meta-device build)."""
        device = buffer_device or self.tok_embeddings.weight.device
        if torch.device(device).type == "meta":
            device = "cpu"
        self.rope_inv_freq = rope_inv_freq(self.args, device=device)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def rope(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables ``[seq, head_dim]`` for positions ``0..seq_len-1``."""
        inv_freq = self.rope_inv_freq.float()
        positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # A pipeline stage (ckpt_core.trainer.pipeline) lacks the parts it does not hold:
        # without tok_embeddings it takes hidden states, without norm it returns them.
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        cos, sin = self.rope(tokens.shape[1], h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if self.norm is None:
            return h
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)
