"""LoRA adapters attached to existing linears, without moving their weights.

A target linear keeps its class, its ``weight`` and its ``bias`` under the same
names, so the ``base`` view of a LoRA model equals a plain model's state dict.
Two small children are attached to it instead::

    wq.lora_a.weight : (r, in_features), kaiming-uniform (a = sqrt(5))
    wq.lora_b.weight : (out_features, r), zeros

and a forward hook adds ``scaling · lora_b(lora_a(dropout(x)))`` to whatever the
linear computed. Because nothing about the linear itself changes, this composes
with every ``nn.Linear`` subclass (torchao's ``FakeQuantizedLinear`` and
``Float8Linear``), with FSDP2's ``fully_shard`` (which swaps the class of the
module it wraps) and with ``torch.compile`` (which traces module hooks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ckpt_core.plugin_api import ConfigError, stacked_leaf_names

#: Names of the adapter children of a target linear (also their state-dict segments).
LORA_A = "lora_a"
LORA_B = "lora_b"
LORA_DROPOUT = "lora_dropout"
ADAPTER_CHILDREN = (LORA_A, LORA_B)


class LoRAFactor(nn.Module):
    """One LoRA factor: a bias-free projection ``x @ weight.T`` with its own init.

    ``init="kaiming"`` (A: kaiming-uniform, a = sqrt(5)) or ``"zeros"`` (B, so a
    fresh adapter is a no-op). It is deliberately *not* an ``nn.Linear``: model
    initializers that re-init every linear (``init_weights``) and converters that
    swap linears (Float8, QAT) leave it alone. When a meta-device model is
    materialized with ``to_empty``, the factor re-initializes itself.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init: str,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if init not in ("kaiming", "zeros"):
            raise ValueError(f"LoRAFactor init must be 'kaiming' or 'zeros', got {init!r}.")
        self.in_features, self.out_features, self.init = in_features, out_features, init
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize the weight the way PEFT initializes this factor."""
        with torch.no_grad():
            if self.init == "zeros":
                nn.init.zeros_(self.weight)
            else:
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def tp_shard_dim(self, style: str) -> int | None:
        """Under tensor parallel, the dimension of ``weight`` split like the base linear's.

        A column-wise linear splits its outputs: B (``zeros``) splits its rows and
        A stays whole. A row-wise linear splits its inputs: A (``kaiming``) splits
        its columns and B stays whole (``ckpt_core.trainer.parallel``).
        """
        if style == "colwise":
            return 0 if self.init == "zeros" else None
        return 1 if self.init == "kaiming" else None

    def _apply(self, fn: Any, recurse: bool = True) -> LoRAFactor:
        was_meta = self.weight.is_meta
        out = super()._apply(fn, recurse)
        if was_meta and not self.weight.is_meta:
            self.reset_parameters()
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, init={self.init}"


def lora_forward_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
) -> torch.Tensor:
    """Add the low-rank update to the output of an adapted linear."""
    x = args[0] if args else kwargs["input"]
    lora_a: LoRAFactor = getattr(module, LORA_A)
    lora_b: LoRAFactor = getattr(module, LORA_B)
    dropout: nn.Module = getattr(module, LORA_DROPOUT)
    h = dropout(x.to(lora_a.weight.dtype))
    update = lora_b(lora_a(h)) * module.lora_scaling
    return output + update.to(output.dtype)


def is_adapted(module: nn.Module) -> bool:
    """True when ``module`` carries LoRA children attached by :func:`attach_lora`."""
    return isinstance(getattr(module, LORA_A, None), LoRAFactor) and isinstance(
        getattr(module, LORA_B, None), LoRAFactor
    )


def attach_lora(linear: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
    """Attach ``lora_a``/``lora_b`` to ``linear`` and register the forward hook.

    The factors take the device and dtype of the linear's weight; on the meta
    device they initialize themselves when the model is materialized.
    """
    weight = linear.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    linear.add_module(LORA_A, LoRAFactor(linear.in_features, rank, "kaiming", **factory))
    linear.add_module(LORA_B, LoRAFactor(rank, linear.out_features, "zeros", **factory))
    linear.add_module(LORA_DROPOUT, nn.Dropout(dropout) if dropout > 0 else nn.Identity())
    linear.lora_scaling = alpha / rank
    linear.register_forward_hook(lora_forward_hook, with_kwargs=True)


def init_adapters(model: nn.Module) -> int:
    """Re-initialize every LoRA factor of ``model`` (A kaiming-uniform, B zeros).

    Returns the number of factors initialized.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, LoRAFactor):
            module.reset_parameters()
            count += 1
    return count


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` (subclasses included), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def select_targets(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Linear]:
    """The linears whose leaf name is in ``target_modules``, by module name.

    A target naming stacked MoE experts (3-D parameters such as
    ``moe.experts.w1``, not ``nn.Linear``) selects nothing there: those stay
    frozen, and :func:`skipped_expert_targets` names them. Raises
    :class:`ConfigError` naming the unknown targets and listing the model's
    linear leaf names when a target matches neither, when no linear is left, or
    when a target is already adapted.
    """
    linears = linear_modules(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
    stacked = stacked_leaf_names(model)
    unknown = [t for t in target_modules if t not in leaves and t not in stacked]
    if unknown:
        raise ConfigError(
            f"converters.lora.target_modules: {unknown} match no linear of the model. "
            f"Its linear leaf names are: {leaves}."
        )
    wanted = set(target_modules)
    targets = {n: m for n, m in linears.items() if n.rsplit(".", 1)[-1] in wanted}
    if not targets:
        raise ConfigError(
            f"converters.lora.target_modules: {target_modules} name only stacked MoE expert "
            "weights, which LoRA does not adapt (they are not nn.Linear). Add linears to "
            f"adapt; the model's linear leaf names are: {leaves}."
        )
    already = [n for n, m in targets.items() if is_adapted(m)]
    if already:
        raise ConfigError(
            f"LoRA is already attached to {already[:4]} (convert ran twice on this model); "
            "enable 'lora' once in converters.enabled."
        )
    return targets


def skipped_expert_targets(model: nn.Module, target_modules: list[str]) -> list[str]:
    """The targets that name stacked MoE expert weights, which LoRA leaves frozen."""
    stacked = stacked_leaf_names(model)
    return [t for t in target_modules if t in stacked]


def freeze_all_but_adapters(model: nn.Module) -> tuple[int, int]:
    """Freeze every parameter except LoRA factors; returns (trainable, frozen) element counts."""
    factor_params = {
        id(p)
        for module in model.modules()
        if isinstance(module, LoRAFactor)
        for p in module.parameters()
    }
    trainable = frozen = 0
    for param in model.parameters():
        is_factor = id(param) in factor_params
        param.requires_grad_(is_factor)
        if is_factor:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return trainable, frozen
