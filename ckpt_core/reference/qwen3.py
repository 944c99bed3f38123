"""Qwen3: the reference Llama with per-head q/k RMSNorm (HF ``Qwen3ForCausalLM``).

What differs from the reference Llama:

* q and k are RMS-normalized per head (``q_norm``, ``k_norm``, weights of
  ``head_dim`` elements) after the projections and before the rotary embedding;
* ``head_dim`` is free (Qwen3 uses 128 whatever the width, so the attention
  projections are often wider than the model);
* the RMSNorm epsilon defaults to 1e-6.

Native names follow the reference: ``layers.N.attention.q_norm.weight`` is HF's
``model.layers.N.self_attn.q_norm.weight``; everything else is named as in the
Llama. :mod:`ckpt_core.reference.moe` builds its mixture-of-experts blocks on
this attention.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ckpt_core.reference.model import Attention, ModelArgs, RMSNorm, Transformer, TransformerBlock


@dataclass
class Qwen3Args(ModelArgs):
    """Architecture of a reference Qwen3 (one-to-one with an HF ``Qwen3Config``)."""

    norm_eps: float = 1e-6

    def num_params(self) -> int:
        """Number of parameters: the Llama count plus two ``head_dim`` norms per layer."""
        return super().num_params() + self.n_layers * 2 * self.head_dim


class Qwen3Attention(Attention):
    """Grouped-query attention whose q and k heads are RMS-normalized before RoPE."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().heads(x)
        return self.q_norm(q), self.k_norm(k), v  # over head_dim, the last dimension


class Qwen3Block(TransformerBlock):
    """The Llama block with :class:`Qwen3Attention`."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.attention = Qwen3Attention(args)  # same name and place as the Llama's


class Qwen3Transformer(Transformer):
    """The reference Qwen3. ``forward(tokens[b, s]) -> logits[b, s, vocab]``."""

    def make_block(self, args: ModelArgs, layer_id: int) -> nn.Module:
        return Qwen3Block(args)


#: Named sizes: ``tiny`` for tests (head_dim 64 > dim / n_heads, as in Qwen3),
#: ``debug`` with tied embeddings (like the small Qwen3s) and every linear
#: dimension a multiple of 128 (Float8, QAT group size 128).
QWEN3_FLAVORS: dict[str, Qwen3Args] = {
    "tiny": Qwen3Args(
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        vocab_size=256,
        ffn_hidden_dim=256,
    ),
    "debug": Qwen3Args(
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=128,
        vocab_size=2048,
        ffn_hidden_dim=768,
        rope_theta=1000000.0,
        max_seq_len=2048,
        tie_word_embeddings=True,
    ),
}


def flavor(flavors: dict[str, ModelArgs], name: str, family: str) -> ModelArgs:
    """A copy of flavor ``name`` of ``family``; unknown names list the known ones."""
    from ckpt_core.errors import ConfigError

    if name not in flavors:
        raise ConfigError(
            f"model.name: {family} has no flavor {name!r}; its flavors: {', '.join(flavors)} "
            f"(as {family}:<flavor>), or give the path of a Hugging Face folder."
        )
    return copy.deepcopy(flavors[name])
