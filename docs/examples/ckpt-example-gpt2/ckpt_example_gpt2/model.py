"""A small GPT-2 in plain PyTorch, with its own parameter names.

The arithmetic is GPT-2's (pre-norm blocks, learned positions, tanh GELU,
embeddings tied to the output), and the linear weights are stored the way
GPT-2 stores them, ``[in, out]``, so the adapter only renames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPT2Args:
    """The sizes a ``config.json`` of ``model_type`` ``gpt2`` describes."""

    vocab_size: int = 96
    n_positions: int = 32
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_inner: int | None = None  # None: 4 * n_embd
    layer_norm_epsilon: float = 1e-5


class Linear(nn.Module):
    """``x @ weight + bias`` with ``weight`` of shape ``[in, out]`` (GPT-2's ``Conv1D``)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Block(nn.Module):
    def __init__(self, args: GPT2Args) -> None:
        super().__init__()
        dim, inner = args.n_embd, args.n_inner or 4 * args.n_embd
        self.n_head = args.n_head
        self.norm_attn = nn.LayerNorm(dim, eps=args.layer_norm_epsilon)
        self.qkv = Linear(dim, 3 * dim)
        self.attn_out = Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=args.layer_norm_epsilon)
        self.mlp_in = Linear(dim, inner)
        self.mlp_out = Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).split(d, dim=-1)
        q, k, v = (y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for y in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm_mlp(x)), approximate="tanh"))


class TinyGPT2(nn.Module):
    """Token ids ``[batch, seq]`` → logits ``[batch, seq, vocab]``."""

    def __init__(self, args: GPT2Args) -> None:
        super().__init__()
        self.args = args
        self.tok_emb = nn.Embedding(args.vocab_size, args.n_embd)
        self.pos_emb = nn.Embedding(args.n_positions, args.n_embd)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tok_emb.weight.T  # tied output projection
