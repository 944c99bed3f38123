"""Tiny transformers models of several families and the user loop the HF-native tests run.

Every model is built by transformers itself from a tiny config (random init, no
download). The loop is what a user writes around ``AutoModelForCausalLM``:
AdamW, ``CheckpointManager`` with no ``sd_adapter``, ``load()`` then
``save(step)`` each step. Checkpoints every 2 steps, fp32 HF exports every 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

VOCAB = 128
STEPS = 4
COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
#: family -> (model_type, its own options). qwen2 and gemma3 tie lm_head to the embeddings.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "gemma3": ("gemma3_text", {"head_dim": 8}),
    "phi3": ("phi3", {}),
    "qwen3_moe": (
        "qwen3_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
}
TIED = {"qwen2", "gemma3"}
#: The linears LoRA / QAT adapt in every dense family but phi3 (fused qkv_proj, gate_up_proj).
LINEARS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def build(family: str, seed: int = 0) -> nn.Module:
    """The family's tiny causal LM, randomly initialized from ``seed``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, options = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **COMMON, **options)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 the usual way: each decoder layer, then the root (collective)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int) -> torch.Tensor:
    """The tokens of ``step``: the same on every rank and in every run."""
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1000 + step))


def probe() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))


def config(folder: str, **overrides: Any) -> Any:
    """Checkpoints every 2 steps under ``folder/ckpt``, fp32 HF exports every 2 under ``export``."""
    from ckpt_core import CheckpointConfig

    fields: dict[str, Any] = {
        "folder": f"{folder}/ckpt",
        "interval": 2,
        "export": {"folder": f"{folder}/export", "dtype": "float32", "interval": 2},
    }
    fields.update(overrides)
    return CheckpointConfig(**fields)


def run(
    model: nn.Module,
    cfg: Any,
    *,
    load_step: int = -1,
    steps: int = STEPS,
    converters: Any = None,
    lr: float = 1e-2,
) -> tuple[Any, torch.optim.Optimizer]:
    """The user loop: load, then train to ``steps`` saving each step; returns (manager, opt)."""
    from ckpt_core import CheckpointManager

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    manager = CheckpointManager(cfg, model, optimizers=opt, converters=converters)
    manager.load(load_step)
    for step in range(manager.train_state.step + 1, steps + 1):
        tokens = batch(step)
        model(input_ids=tokens, labels=tokens).loss.backward()
        manager.maybe_wait_for_staging()
        opt.step()
        opt.zero_grad()
        if converters is not None:
            converters.post_optimizer_step([model])
        manager.save(step, last_step=step == steps)
    manager.close()
    return manager, opt


def full_state(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, np.ndarray]:
    """Model (and optimizer) state as full numpy arrays (gathered under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, opt or [], options=options)
    out = {f"model.{k}": v for k, v in model_sd.items()}
    out.update({f"optimizer.{k}": v for k, v in optim_sd.items()})
    return {
        k: v.detach().float().cpu().clone().numpy() if isinstance(v, torch.Tensor) else np.array(v)
        for k, v in out.items()
    }


def logits(model: nn.Module, tokens: torch.Tensor | None = None) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=probe() if tokens is None else tokens).logits.float().numpy()


def assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key


def from_export(path: str) -> nn.Module:
    """transformers' own load of an export; a missing or unexpected key is a failure."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not bad and not info.get("error_msgs"), info
    return model.eval()
