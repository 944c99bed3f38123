"""``StateDictTransforms``: the content stage between the views and the storage writers.

Exporting runs three pure steps over state dicts (no I/O, no change to the model):

1. the **export view**: the converters' ``state_dict_transform`` chain, in
   reverse config order (:meth:`ckpt_core.ModelWrapper.state_dict`);
2. the **dtype cast**: every floating tensor whose dtype differs from the export
   dtype is cast to it. Integer, boolean and 8-bit float tensors (quantized
   weights, float8 data) pass untouched; an ``float32`` export of a bf16 run is
   really fp32. :func:`cast_dtype` is the rule;
3. **to_hf**: each key goes to an adapter:

   * keys owned by a converter whose adapter has a ``subfolder`` (LoRA's PEFT
     adapter) are taken from the **full** view and written by that adapter into
     its subfolder;
   * keys of the export view owned by a converter whose adapter has no
     subfolder go through that converter's adapter into the model files;
   * every other key goes through the model's adapter.

Loading runs backwards: containers are built from the live (possibly
FSDP2-sharded) state dict through ``to_hf``, filled by a reader, and mapped back
with ``from_hf`` (see :mod:`ckpt_core.policy.exporter`).

The HF writer applies the cast while copying each tensor into its write buffer
(the same :func:`cast_dtype` rule), so a bf16 export never holds a second copy
of the model; :func:`cast_state_dict` is the eager form used by DCP exports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckpt_core.errors import CheckpointError, ConfigError
from ckpt_core.export_spec import (  # noqa: F401 (re-exported: the old home of these names)
    DTYPES,
    HFGroup,
    cast_dtype,
    cast_state_dict,
    dtype_name,
    is_castable,
    is_float8,
    parse_dtype,
)
from ckpt_core.protocol.plugin_host import ConverterSet
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter


class StateDictTransforms:
    """Export view → dtype cast → to_hf, and the routing that loads use backwards."""

    def __init__(
        self, sd_adapter: StateDictAdapter | None, converters: ConverterSet | None = None
    ) -> None:
        self.sd_adapter = sd_adapter
        self.converters = converters if converters is not None else ConverterSet([])
        self._adapters: dict[str, StateDictAdapter] | None = None

    @property
    def converter_adapters(self) -> dict[str, StateDictAdapter]:
        """Converter name → its adapter (converters without one omitted)."""
        if self._adapters is None:
            self._adapters = self.converters.state_dict_adapters(self.sd_adapter)
        return self._adapters

    def _model_adapter(self) -> StateDictAdapter:
        if self.sd_adapter is None:
            raise ConfigError(
                "A Hugging Face export or load needs the model's state-dict adapter: pass "
                "sd_adapter (e.g. ckpt_core.reference.LlamaStateDictAdapter) to the manager."
            )
        return self.sd_adapter

    # -- export ---------------------------------------------------------------

    def export_view(self, wrapper: Any, dtype: str | torch.dtype | None) -> dict[str, Any]:
        """The export view cast to ``dtype`` (eager; used by DCP exports)."""
        return cast_state_dict(wrapper.state_dict("export"), parse_dtype(dtype))

    def to_hf(self, export_sd: Mapping[str, Any], full_sd: Mapping[str, Any]) -> list[HFGroup]:
        """Route keys to adapters; the model's group comes first."""
        model_adapter = self._model_adapter()
        adapters = self.converter_adapters
        model = HFGroup(None, model_adapter)
        groups = [model]
        by_adapter: dict[str | None, dict[str, Any]] = {}
        for key, value in export_sd.items():
            owner = self.converters.owner(key) if self.converters else None
            adapter = adapters.get(owner) if owner else None
            if adapter is not None and adapter.subfolder is not None:
                continue  # written from the full view by its own adapter
            by_adapter.setdefault(owner if adapter is not None else None, {})[key] = value
        for owner, part in by_adapter.items():
            adapter = model_adapter if owner is None else adapters[owner]
            _merge(model.tensors, adapter.to_hf(part), owner or "model")
        for name, adapter in adapters.items():
            if adapter.subfolder is None:
                continue
            owned = {k: v for k, v in full_sd.items() if self.converters.owner(k) == name}
            groups.append(HFGroup(adapter.subfolder, adapter, dict(adapter.to_hf(owned))))
        return groups

    def export_groups(self, wrapper: Any) -> list[HFGroup]:
        """The HF export of a model: export view routed to adapters (cast left to writers)."""
        full = wrapper.state_dict("full")
        export = self.converters.state_dict_transform(dict(full)) if self.converters else full
        return self.to_hf(export, full)

    def hf_config(self, dtype: torch.dtype | None, groups: list[HFGroup]) -> dict[str, Any]:
        """``config.json``: the model adapter's, then each converter adapter's additions."""
        if dtype is None:
            dtype = next(
                (
                    t.dtype
                    for g in groups
                    for t in g.tensors.values()
                    if isinstance(t, torch.Tensor) and is_castable(t.dtype)
                ),
                torch.float32,
            )
        config = self._model_adapter().update_hf_config({"dtype": dtype_name(dtype)})
        for adapter in self.converter_adapters.values():
            config = adapter.update_hf_config(config)
        return config

    # -- load -----------------------------------------------------------------

    def base_containers(self, full_sd: Mapping[str, Any]) -> dict[str, Any]:
        """HF name → live tensor for every key no converter owns (an HF base load)."""
        base = {k: v for k, v in full_sd.items() if not self.converters.key_filter(k)}
        return dict(self._model_adapter().to_hf(base))

    def owned_containers(
        self, full_sd: Mapping[str, Any], converter: str
    ) -> tuple[StateDictAdapter, dict[str, list[str]], dict[str, Any]]:
        """For one converter: its adapter, native key → HF names, and HF name → tensor."""
        adapters = self.converter_adapters
        if converter not in adapters:
            enabled = ", ".join(self.converters.names) or "none"
            with_adapter = ", ".join(adapters) or "none"
            raise ConfigError(
                f"additional_load.converter {converter!r} has no state-dict adapter among the "
                f"enabled converters ({enabled}); converters with adapters: {with_adapter}."
            )
        adapter = adapters[converter]
        names: dict[str, list[str]] = {}
        containers: dict[str, Any] = {}
        for key, value in full_sd.items():
            if self.converters.owner(key) != converter:
                continue
            hf = adapter.to_hf({key: value})
            names[key] = list(hf)
            containers.update(hf)
        return adapter, names, containers


def _merge(into: dict[str, Any], new: Mapping[str, Any], who: str) -> None:
    for key, value in new.items():
        if key in into:
            raise CheckpointError(
                f"HF key {key!r} is produced twice (the second time by {who!r}'s adapter); "
                "each adapter must convert only the keys its converter owns."
            )
        into[key] = value
