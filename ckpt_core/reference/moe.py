"""The reference mixture of experts: Qwen3 attention with routed, stacked experts.

It computes what transformers' ``Qwen3MoeForCausalLM`` computes (HF
``model_type`` ``qwen3_moe``). Each MoE layer holds:

* a **router**, ``moe.router.gate`` (an ``nn.Linear`` from ``dim`` to
  ``num_experts``): softmax over all experts in fp32, the ``top_k`` largest
  probabilities, renormalized to sum to one when ``norm_topk_prob``, cast back
  to the activations' dtype (exactly transformers' order);
* the **experts as three stacked tensors** (torchtitan's layout), one per
  projection: ``moe.experts.w1`` (gate) and ``w3`` (up) ``[E, hidden, dim]``,
  ``w2`` (down) ``[E, dim, hidden]``. ``w1[e]`` is expert ``e``'s HF
  ``gate_proj.weight`` as it is, so exporting splits along the first dimension
  and loading stacks (:mod:`ckpt_core.reference.qwen3_adapter`).

Each token's output is the sum over its ``top_k`` experts of
``weight · w2[e](silu(w1[e] x) · w3[e] x)``, accumulated in expert order as
transformers does. Layers in ``mlp_only_layers``, or off the
``decoder_sparse_step`` grid, have a dense ``feed_forward`` instead.

The stacked tensors are not ``nn.Linear``: LoRA and Float8 leave them (and the
router) in high precision and say so (``ckpt plugins``); QAT fake-quantizes them
through ``expert_weight_transforms`` (:mod:`ckpt_core.content.experts`). No auxiliary
load-balancing loss is added; HF's does not change the logits either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ckpt_core.content.experts import expert_weight
from ckpt_core.reference.model import FeedForward, ModelArgs, RMSNorm
from ckpt_core.reference.qwen3 import Qwen3Args, Qwen3Attention, Qwen3Transformer

#: Names of the stacked expert tensors, in HF's order of projections (gate, up, down).
EXPERT_WEIGHTS = ("w1", "w3", "w2")


@dataclass
class MoEArgs(Qwen3Args):
    """Architecture of a reference MoE (one-to-one with an HF ``Qwen3MoeConfig``).

    ``ffn_hidden_dim`` is the hidden size of dense layers (``intermediate_size``),
    ``moe_hidden_dim`` that of each expert (``moe_intermediate_size``).
    """

    num_experts: int = 4
    top_k: int = 2
    moe_hidden_dim: int = 64
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether layer ``layer_id`` routes to experts (transformers' rule)."""
        return (
            layer_id not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    def num_params(self) -> int:
        """Number of parameters of a model with these arguments."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * hd * (2 * self.n_heads + 2 * kv) + 2 * hd
        dense = 3 * self.dim * self.ffn_hidden_dim
        moe = self.num_experts * (self.dim + 3 * self.dim * self.moe_hidden_dim)
        ffn = sum(moe if self.is_moe_layer(i) else dense for i in range(self.n_layers))
        emb = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * (attn + 2 * self.dim) + ffn + emb + self.dim


class Router(nn.Module):
    """Top-k routing: ``(weights[T, k], experts[T, k])`` for tokens ``x[T, dim]``."""

    def __init__(self, dim: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), experts


class GroupedExperts(nn.Module):
    """Every expert of a layer as three stacked weights (see the module docstring)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        #: Converters' views of the weights (QAT's fake quantization): name → fn.
        self.expert_weight_transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def init_weights(self, std: float) -> None:
        """Normal initialization of every expert, like the linears."""
        for weight in (self.w1, self.w2, self.w3):
            nn.init.normal_(weight, std=std)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        w1, w2, w3 = (expert_weight(self, name) for name in ("w1", "w2", "w3"))
        return expert_outputs(x, weights, experts, (w1, w2, w3))


def expert_outputs(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    first: int = 0,
) -> torch.Tensor:
    """Each token's weighted sum over its routed experts among ``stacked = (w1, w2, w3)``.

    ``stacked`` holds experts ``first .. first + len(w1) - 1`` (all of them
    unless expert parallel gives a rank a slice); other experts add nothing.
    Accumulated in expert order, as transformers does.
    """
    w1, w2, w3 = stacked
    out = torch.zeros_like(x)
    for i in range(w1.shape[0]):
        token, slot = torch.where(experts == first + i)
        if token.numel() == 0:
            continue
        h = x[token]
        h = F.silu(F.linear(h, w1[i])) * F.linear(h, w3[i])
        h = F.linear(h, w2[i]) * weights[token, slot, None]
        out = out.index_add(0, token, h.to(out.dtype))
    return out


class MoE(nn.Module):
    """Router plus stacked experts over ``x[b, s, dim]``."""

    def __init__(self, args: MoEArgs) -> None:
        super().__init__()
        self.router = Router(args.dim, args.num_experts, args.top_k, args.norm_topk_prob)
        self.experts = GroupedExperts(args.dim, args.moe_hidden_dim, args.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.router(flat)
        return self.experts(flat, weights, experts).reshape(x.shape)


class MoEBlock(nn.Module):
    """Pre-norm Qwen3 attention, then experts (``moe``) or a dense ``feed_forward``."""

    def __init__(self, args: MoEArgs, layer_id: int) -> None:
        super().__init__()
        self.attention = Qwen3Attention(args)
        sparse = args.is_moe_layer(layer_id)
        self.moe = MoE(args) if sparse else None
        self.feed_forward = None if sparse else FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        ffn = self.moe if self.moe is not None else self.feed_forward
        return h + ffn(self.ffn_norm(h))


class MoETransformer(Qwen3Transformer):
    """The reference MoE. ``forward(tokens[b, s]) -> logits[b, s, vocab]``."""

    def make_block(self, args: ModelArgs, layer_id: int) -> nn.Module:
        return MoEBlock(args, layer_id)

    def init_weights(self, buffer_device: torch.device | str | None = None, std: float = 0.02):
        """The Llama initialization, then every expert (normal, ``std``)."""
        super().init_weights(buffer_device, std)
        for module in self.modules():
            if isinstance(module, GroupedExperts):
                module.init_weights(std)


#: ``tiny``: tests (4 experts, 2 per token). ``debug``: 8 experts. Every dimension
#: outside the router is a multiple of 128 (QAT group size 128, experts included).
MOE_FLAVORS: dict[str, MoEArgs] = {
    "tiny": MoEArgs(
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=256,
        ffn_hidden_dim=256,
        num_experts=4,
        top_k=2,
        moe_hidden_dim=128,
    ),
    "debug": MoEArgs(
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        vocab_size=2048,
        ffn_hidden_dim=768,
        num_experts=8,
        top_k=2,
        moe_hidden_dim=256,
        rope_theta=1000000.0,
        max_seq_len=2048,
    ),
}
