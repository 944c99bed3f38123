"""A torchtitan 0.3 Llama 3 trained on CPU with its own components, saved by its own manager.

torchtitan's trainer needs CUDA, but its model, ``OptimizersContainer``,
``LRSchedulersContainer`` and ``CheckpointManager`` run on CPU when built
directly (one gloo process, SDPA attention). The model is debugmodel-shaped
but smaller (GQA: 4 query heads on 2 KV heads, fused ``wqkv``, Llama 3 rope
scaling) and learns to *reverse* a sequence, a task that depends on positions:
weights loaded in the wrong rotary layout compute visibly different logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

VOCAB, HALF = 16, 4  # tokens 1..31; sequences of HALF tokens, a separator, then reversed
ARGS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": VOCAB,
    "multiple_of": 32,
    "rope_theta": 500000.0,
    "rope_scaling": "llama",
    "max_seq_len": 64,
}
LR = 1e-2


def model_config(tied: bool = False):
    """A torchtitan ``Llama3Model.Config`` with ARGS, SDPA attention and a fused wqkv."""
    from torchtitan.models.common import (
        ComplexRoPE,
        Embedding,
        Linear,
        RMSNorm,
        compute_ffn_hidden_dim,
    )
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

    dim, heads = ARGS["dim"], ARGS["n_heads"]
    layers = _build_llama3_layers(
        n_layers=ARGS["n_layers"],
        dim=dim,
        n_heads=heads,
        n_kv_heads=ARGS["n_kv_heads"],
        hidden_dim=compute_ffn_hidden_dim(dim, multiple_of=ARGS["multiple_of"]),
        rope=ComplexRoPE.Config(
            dim=dim // heads, max_seq_len=ARGS["max_seq_len"], theta=500000, scaling="llama"
        ),
        attn_backend="flex",
        fuse_qkv=True,
    )
    for layer in layers:  # torchtitan's LM backends are masked (flex/varlen); SDPA runs on CPU
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return Llama3Model.Config(
        dim=dim,
        vocab_size=VOCAB,
        enable_weight_tying=tied,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB),
        layers=layers,
    )


def batch(generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """``[size, 2 * HALF + 1]`` token rows: x, separator 0, reversed x."""
    x = torch.randint(1, VOCAB, (size, HALF), generator=generator)
    return torch.cat([x, torch.zeros(size, 1, dtype=torch.long), x.flip(1)], dim=1)


def loss_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token loss on the reversed half (the part that needs positions)."""
    pred = logits[:, HALF:-1]
    return F.cross_entropy(pred.reshape(-1, VOCAB), tokens[:, HALF + 1 :].reshape(-1))


@dataclass
class Run:
    """A torchtitan model with its optimizer, scheduler and train state."""

    model: torch.nn.Module
    optimizers: object
    schedulers: object
    state: TrainState


class TrainState:
    """torchtitan's trainer keeps ``step`` and ``ntokens_seen`` (``Trainer.state_dict``)."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]


def build(seed: int = 0, tied: bool = False, total_steps: int = 100) -> Run:
    """A fresh torchtitan run (model, AdamW container, warmup-decay scheduler)."""
    from torchtitan.components.optimizer import (
        LRSchedulersContainer,
        OptimizersContainer,
        default_adamw,
    )

    torch.manual_seed(seed)
    model = model_config(tied).build()
    model.init_states()
    opt_config = default_adamw(lr=LR)
    opt_config.implementation = "for-loop"
    optimizers = OptimizersContainer(opt_config, model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=5, decay_ratio=0.5).build(
        optimizers=optimizers, training_steps=total_steps
    )
    return Run(model, optimizers, schedulers, TrainState())


def train_step(run: Run, tokens: torch.Tensor) -> float:
    """One step as torchtitan's trainer takes it."""
    loss = loss_of(run.model(tokens), tokens)
    loss.backward()
    run.optimizers.step()
    run.schedulers.step()
    run.optimizers.zero_grad()
    run.state.step += 1
    run.state.ntokens_seen += tokens.numel()
    return float(loss.detach())


def manager(run: Run, folder: str, sd_adapter=None, **config):
    """torchtitan's own ``CheckpointManager`` over ``run`` (no dataloader, as in its tests)."""
    from torchtitan.components.checkpoint import CheckpointManager

    defaults = dict(enable=True, folder="checkpoint", interval=1, keep_latest_k=0)
    return CheckpointManager(
        CheckpointManager.Config(**{**defaults, **config}),
        dataloader=None,
        model_parts=[run.model],
        optimizers=run.optimizers,
        lr_schedulers=run.schedulers,
        states={"train_state": run.state},
        sd_adapter=sd_adapter,
        base_folder=folder,
    )


def args_file(path) -> str:
    """torchtitan's model arguments of ARGS as a JSON file for ``--model``."""
    path.write_text(json.dumps(ARGS))
    return str(path)
