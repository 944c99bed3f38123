"""The qat converter: hooks only; the work lives in sibling modules.

* ``convert``: torchao ``QATConfig(base, step="prepare")`` on the targeted
  linears (fake-quantized forward; fp32 master weights keep their keys).
* ``key_filter``: claims fake-quantizer state (learned scales / zero points).
* ``state_dict_transform``: real quantization into compressed-tensors entries
  (:mod:`ckpt_plugins_qat.export`).
* ``state_dict_adapter``: adds the compressed-tensors ``quantization_config``
  (:mod:`ckpt_plugins_qat.adapter`).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from torch import nn

from ckpt_core.plugin_api import (
    WEIGHT_TRANSFORMS,
    ConfigError,
    Converter,
    StateDictAdapter,
    canonical_fqn,
    hookimpl,
    router_linears,
    stacked_leaf_names,
    transformable_experts,
)
from ckpt_plugins_qat.adapter import QATStateDictAdapter
from ckpt_plugins_qat.config import QATConfig
from ckpt_plugins_qat.experts import StackedFakeQuantizer, supports_experts
from ckpt_plugins_qat.export import is_quantizer_state, quantize_state_dict
from ckpt_plugins_qat.schemes import Scheme, get_scheme
from ckpt_plugins_qat.tensor_parallel import keep_groups_whole

logger = logging.getLogger(__name__)


def check_linear(name: str, in_features: int, scheme: Scheme, group_size: int) -> None:
    """Raise a :class:`ConfigError` when ``in_features`` does not fit the scheme."""
    if scheme.granularity == "group" and in_features % group_size:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise ConfigError(
            f"converters.qat.group_size = {group_size} does not divide the in_features "
            f"({in_features}) of layer {name!r}. Choose a group_size that divides every "
            f"targeted layer's in_features (for this layer: {divisors or 'a divisor of it'}), "
            "or remove the layer from converters.qat.targets."
        )
    per_word = 32 // scheme.weight_bits
    if scheme.packed and in_features % per_word:
        raise ConfigError(
            f"Layer {name!r} has in_features = {in_features}, which is not a multiple of "
            f"{per_word}; scheme {scheme.name!r} packs {per_word} values per int32 word. "
            "Remove the layer from converters.qat.targets."
        )


class QATConverter(Converter):
    """Converter registered as ``qat``."""

    name: ClassVar[str] = "qat"
    Config = QATConfig

    def __init__(self, config: QATConfig | None = None) -> None:
        super().__init__(config)
        self.scheme = get_scheme(self.config.scheme)
        #: Canonical names of the linears ``convert`` fake-quantized.
        self.prepared: list[str] = []
        #: Canonical names of the linears ``convert`` left alone (HF ``ignore``).
        self.unprepared: list[str] = []
        #: Canonical names of the stacked MoE expert weights ``convert`` fake-quantized.
        self.prepared_experts: list[str] = []
        #: Whether ``convert`` ran in this process (offline tools guess from names).
        self.converted = False

    # -- hooks --------------------------------------------------------------------

    @hookimpl
    def convert(self, model: nn.Module) -> None:
        """Swap each targeted ``nn.Linear`` for torchao's ``FakeQuantizedLinear``."""
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

        targets = set(self.config.targets)
        selected: set[str] = set()
        found: set[str] = set()
        linear_leaves: set[str] = set()
        routers = router_linears(model)
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            linear_leaves.add(leaf)
            if leaf in targets and name in routers:
                raise ConfigError(
                    f"converters.qat.targets: {leaf!r} names the MoE router {name!r}; routers "
                    "stay in high precision (a quantized router changes which experts a token "
                    f"reaches). Remove {leaf!r} from converters.qat.targets."
                )
            if leaf not in targets:
                self.unprepared.append(canonical_fqn(name))
                continue
            found.add(leaf)
            if isinstance(module, FakeQuantizedLinear):
                continue  # already prepared (convert called twice)
            if type(module) is not nn.Linear:
                raise ConfigError(
                    f"converters.qat: layer {name!r} is a {type(module).__name__}, not a plain "
                    "nn.Linear; qat fake-quantizes plain linears only. 'qat' and 'float8' "
                    "cannot both convert one linear: remove it from converters.qat.targets or "
                    "add it to converters.float8.filter_fqns ('lora', which wraps qat linears, "
                    "goes after 'qat' in converters.enabled)."
                )
            check_linear(name, module.in_features, self.scheme, self.config.group_size)
            selected.add(name)
        stacked = stacked_leaf_names(model)
        missing = sorted(targets - found - stacked)
        if missing:
            raise ConfigError(
                f"converters.qat.targets: {missing} match no nn.Linear of the model. Linear "
                f"leaf names in the model: {sorted(linear_leaves) or 'none'}."
            )
        experts = self._prepare_experts(model, targets)
        left = sorted((targets & stacked) - experts)
        if left:
            why = (
                f"scheme {self.scheme.name!r} quantizes linear inputs too"
                if not supports_experts(self.scheme)
                else "their module has no expert_weight_transforms hook"
            )
            logger.info(
                "qat: targets %s name stacked MoE expert weights that stay in high precision "
                "(%s) and are exported unquantized",
                left,
                why,
            )
        if not found and not experts:
            raise ConfigError(
                f"converters.qat.targets: {sorted(targets)} name only stacked MoE expert "
                f"weights, which scheme {self.scheme.name!r} does not quantize. Add linears; "
                f"the model's linear leaf names: {sorted(linear_leaves) or 'none'}."
            )
        base = self.scheme.base_config(self.config.group_size)
        quantize_(
            model,
            QATConfig(base, step="prepare"),
            filter_fn=lambda _module, fqn: fqn in selected,
        )
        for name in sorted(selected):  # tensor parallel: groups crossing row-wise shards
            keep_groups_whole(model.get_submodule(name))
        self.prepared.extend(canonical_fqn(n) for n in sorted(selected))
        self.converted = True
        logger.info(
            "qat: %s fake quantization on %d linears and %d stacked expert weights (group_size %s)",
            self.scheme.name,
            len(selected),
            len(self.prepared_experts),
            self.config.group_size if self.scheme.granularity == "group" else "per channel",
        )

    def _prepare_experts(self, model: nn.Module, targets: set[str]) -> set[str]:
        """Fake-quantize the targeted stacked experts; returns the leaf names prepared."""
        if not supports_experts(self.scheme):
            return set()
        done = set()
        fake_quantize = StackedFakeQuantizer(self.scheme, self.config.group_size)
        for name, module in transformable_experts(model).items():
            for leaf, param in module.named_parameters(recurse=False):
                if param.dim() < 3 or leaf not in targets:
                    continue
                fqn = f"{name}.{leaf}" if name else leaf
                check_linear(fqn, param.shape[-1], self.scheme, self.config.group_size)
                getattr(module, WEIGHT_TRANSFORMS)[leaf] = fake_quantize
                if canonical_fqn(fqn) not in self.prepared_experts:
                    self.prepared_experts.append(canonical_fqn(fqn))
                done.add(leaf)
        return done

    @hookimpl
    def key_filter(self, fqn: str) -> bool:
        """Own fake-quantizer state (learned scales and zero points), nothing else."""
        return is_quantizer_state(fqn)

    @hookimpl
    def state_dict_transform(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Targeted ``<mod>.weight`` → compressed-tensors integer entries."""
        out, modules = quantize_state_dict(
            state_dict,
            self.scheme,
            self.config.group_size,
            self.config.targets,
            stacked=self.prepared_experts if self.converted else None,
        )
        if not modules:
            logger.warning(
                "qat: the export state dict has no 2-D '.weight' of a target %s; nothing "
                "was quantized",
                self.config.targets,
            )
        return out

    @hookimpl
    def state_dict_adapter(self, model_adapter: StateDictAdapter | None) -> StateDictAdapter:
        """Adapter adding the compressed-tensors ``quantization_config``."""
        return QATStateDictAdapter(
            self.scheme,
            self.config.group_size,
            unquantized_linears=lambda: list(self.unprepared),
            quantized_linears=lambda: list(self.prepared),
            model_adapter=model_adapter,
        )
