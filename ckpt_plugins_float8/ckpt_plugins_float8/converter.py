"""The float8 converter: hooks only; the work lives in sibling modules.

* ``convert``: torchao ``convert_to_float8_training`` on the target linears
  (:mod:`ckpt_plugins_float8.conversion`).
* no ``key_filter``: float8 owns no keys. Master weights stay high precision under the
  same keys, so a float8 checkpoint and a plain one are interchangeable.
* ``post_optimizer_step``: precomputes FSDP float8 all-gather scales when
  ``enable_fsdp_float8_all_gather`` is on.
* ``state_dict_transform`` / ``state_dict_adapter``: only with ``export = "fp8"``
  (:mod:`ckpt_plugins_float8.fp8_export`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ckpt_core.plugin_api import Converter, PluginError, StateDictAdapter, hookimpl
from ckpt_plugins_float8 import conversion
from ckpt_plugins_float8.config import Float8Config
from ckpt_plugins_float8.fp8_export import Float8ExportAdapter, fp8_state_dict


class Float8Converter(Converter):
    """Converter registered as ``float8``."""

    name: ClassVar[str] = "float8"
    Config = Float8Config

    def __init__(self, config: Float8Config | None = None) -> None:
        super().__init__(config)
        self.config: Float8Config
        self._emulate: bool | None = None
        #: Converted linears (canonical module FQN → weight shape), over all model parts.
        self.converted: dict[str, tuple[int, int]] = {}
        #: Linears left high precision (FQN → reason), over all model parts.
        self.skipped: dict[str, str] = {}

    @property
    def emulate(self) -> bool:
        """The resolved ``emulate`` option (``"auto"`` decided once, on first use)."""
        if self._emulate is None:
            self._emulate = conversion.resolve_emulate(self.config.emulate)
        return self._emulate

    @hookimpl
    def convert(self, model: nn.Module) -> None:
        """Swap the target linears of one model part for ``Float8Linear``."""
        targets = conversion.convert_model(model, self.config, self.emulate)
        self.converted.update(targets.converted)
        self.skipped.update(targets.skipped)

    @hookimpl
    def post_optimizer_step(self, model_parts: list[nn.Module]) -> None:
        """Precompute the float8 all-gather scales (only with FSDP float8 all-gather)."""
        if self.config.enable_fsdp_float8_all_gather:
            conversion.precompute_scales(list(model_parts))

    @hookimpl
    def state_dict_transform(self, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        """With ``export = "fp8"``: converted weights → float8 bits plus ``weight_scale``."""
        if self.config.export != "fp8":
            return None
        self._require_converted()
        return fp8_state_dict(state_dict, self.converted, self.config.recipe)

    @hookimpl
    def state_dict_adapter(self, model_adapter: StateDictAdapter | None) -> StateDictAdapter | None:
        """With ``export = "fp8"``: the adapter that writes ``quantization_config``."""
        if self.config.export != "fp8":
            return None
        return Float8ExportAdapter(
            model_adapter,
            self.config.recipe,
            fp8_linears=list(self.converted),
            high_precision_linears=list(self.skipped),
        )

    def _require_converted(self) -> None:
        if not self.converted:
            raise PluginError(
                "Converter 'float8' option 'export': 'fp8' quantizes the linears that "
                "'convert' swapped, and none were (convert was not called on this model, or "
                "every linear was skipped). Call converters.convert(model) before exporting, "
                "or set export = 'high_precision'."
            )
