"""State-dict adapters of the reference Qwen3 and MoE: native ↔ HF names.

:class:`Qwen3StateDictAdapter` is the Llama mapping plus the q/k norms
(``attention.q_norm`` ↔ ``self_attn.q_norm``).

:class:`MoEStateDictAdapter` adds the router (``moe.router.gate`` ↔ ``mlp.gate``)
and the experts: one native tensor ``layers.N.moe.experts.w1`` of shape
``[E, hidden, dim]`` is ``E`` HF tensors
``model.layers.N.mlp.experts.<e>.gate_proj.weight`` (``w3`` → ``up_proj``,
``w2`` → ``down_proj``), the per-expert layout of Qwen3-MoE checkpoints on the
Hub, which transformers stacks again as it loads. ``to_hf`` hands out views
(``w1[e]``), so an HF load through ``read_into`` fills the live tensor, and
``from_hf`` stacks the experts back, refusing a layer with a missing expert.
A converter's entry of one expert (QAT's ``layers.N.moe.experts.w1.<e>.weight_packed``)
is named ``model.layers.N.mlp.experts.<e>.gate_proj.weight_packed``.

FSDP2 shards the stacked tensors along the experts by default (``Shard(0)``);
``to_hf`` then first redistributes them along the next dimension (an
all-to-all, so every rank must call it for the same keys, as exports and HF
loads do), after which ``w1[e]`` is a ``Shard(0)`` DTensor the HF writer
gathers expert by expert. The reference trainer shards them along that
dimension from the start, and nothing moves.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ckpt_core.errors import CheckpointError
from ckpt_core.reference.adapter import LLAMA_KEYS, LlamaStateDictAdapter
from ckpt_core.reference.moe import MoEArgs
from ckpt_core.reference.qwen3 import Qwen3Args
from ckpt_core.reference.qwen3_config import (
    moe_from_hf_config,
    moe_to_hf_config,
    qwen3_from_hf_config,
    qwen3_to_hf_config,
)

QWEN3_KEYS = LLAMA_KEYS.extended(
    {"attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm"}
)
MOE_KEYS = QWEN3_KEYS.extended({"moe.router.gate": "mlp.gate"})

#: Native stacked expert weight → HF per-expert projection.
EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_NATIVE_EXPERTS = re.compile(r"^layers\.(\d+)\.moe\.experts\.(w1|w2|w3)$")
#: One expert's converter entry (QAT's ``<stacked key>.<e>.weight_packed``).
_NATIVE_EXPERT_ENTRY = re.compile(r"^layers\.(\d+)\.moe\.experts\.(w1|w2|w3)\.(\d+)\.(\w+)$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.(\w+)$")
_PROJ_NATIVE = {v: k for k, v in EXPERT_PROJ.items()}


class Qwen3StateDictAdapter(LlamaStateDictAdapter):
    """Converts reference-Qwen3 state dicts to and from HF ``Qwen3ForCausalLM`` ones."""

    registry_name = "qwen3"
    keys = QWEN3_KEYS
    model_name = "the reference Qwen3"
    args: Qwen3Args

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> Qwen3StateDictAdapter:
        return cls(qwen3_from_hf_config(config))

    def hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        return qwen3_to_hf_config(self.args, dtype)


class MoEStateDictAdapter(Qwen3StateDictAdapter):
    """Converts reference-MoE state dicts to and from HF ``Qwen3MoeForCausalLM`` ones."""

    registry_name = "moe"
    keys = MOE_KEYS
    model_name = "the reference MoE"
    args: MoEArgs

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> MoEStateDictAdapter:
        return cls(moe_from_hf_config(config))

    def hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        return moe_to_hf_config(self.args, dtype)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        rest: dict[str, Any] = {}
        out: dict[str, Any] = {}
        for fqn, value in state_dict.items():
            entry = _NATIVE_EXPERT_ENTRY.match(fqn)
            if entry is not None:
                layer, weight, e, suffix = entry.groups()
                out[f"model.layers.{layer}.mlp.experts.{e}.{EXPERT_PROJ[weight]}.{suffix}"] = value
                continue
            m = _NATIVE_EXPERTS.match(fqn)
            if m is None:
                rest[fqn] = value
                continue
            layer, weight = m.groups()
            for e, part in enumerate(self._split(fqn, value)):
                out[f"model.layers.{layer}.mlp.experts.{e}.{EXPERT_PROJ[weight]}.weight"] = part
        return {**super().to_hf(rest), **out}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        rest: dict[str, Any] = {}
        rest_out: dict[str, Any] = {}
        experts: dict[str, dict[int, Any]] = {}
        for name, value in hf_state_dict.items():
            m = _HF_EXPERT.match(name)
            if m is None or m.group(3) not in _PROJ_NATIVE:
                rest[name] = value
                continue
            layer, e, proj, suffix = m.groups()
            fqn = f"layers.{layer}.moe.experts.{_PROJ_NATIVE[proj]}"
            if suffix != "weight":  # a converter's entry of one expert
                rest_out[f"{fqn}.{e}.{suffix}"] = value
                continue
            experts.setdefault(fqn, {})[int(e)] = value
        out = {**super().from_hf(rest), **rest_out}
        n = self.args.num_experts
        for fqn, parts in experts.items():
            missing = [e for e in range(n) if e not in parts]
            extra = sorted(e for e in parts if e >= n)
            if missing or extra:
                raise CheckpointError(
                    f"{fqn}: the model has {n} experts, the Hugging Face weights "
                    + (f"lack experts {missing[:8]}" if missing else f"add experts {extra[:8]}")
                    + ". Is it a checkpoint of this architecture (num_experts)?"
                )
            out[fqn] = torch.stack([parts[e] for e in range(n)])
        return out

    def hf_key(self, fqn: str) -> str:
        if _NATIVE_EXPERTS.match(fqn):
            raise CheckpointError(
                f"Key {fqn!r} holds {self.args.num_experts} experts: it is that many Hugging "
                "Face tensors (mlp.experts.<e>.*), not one; use to_hf."
            )
        return super().hf_key(fqn)

    def _split(self, fqn: str, value: Any) -> list[Any]:
        """Expert ``e`` of a stacked tensor is ``value[e]`` (a view; DTensors see module doc)."""
        n = self.args.num_experts
        if value is None:
            return [None] * n
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[0] != n:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"{fqn} is {shape}; the reference MoE stacks {n} experts along the first "
                "dimension of a 3-D tensor."
            )
        value = _experts_unsharded(value)
        return [value[e] for e in range(n)]


def _experts_unsharded(value: torch.Tensor) -> torch.Tensor:
    """``value`` itself, or a DTensor sharded along its second dimension instead of its first."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(value, DTensor):
        return value
    placements = [Shard(1) if p == Shard(0) else p for p in value.placements]
    if placements == list(value.placements):
        return value
    return value.redistribute(value.device_mesh, placements)
