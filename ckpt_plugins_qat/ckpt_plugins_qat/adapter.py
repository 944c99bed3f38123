"""The QAT state-dict adapter: a compressed-tensors ``quantization_config``.

The export view already holds the compressed-tensors entries (``weight_packed``,
``weight_scale``, ``weight_shape``) under native module paths; the model's
adapter renames module paths and keeps those suffixes. So this adapter renames
nothing: it owns no export keys and adds the ``quantization_config`` that tells
transformers, vLLM and llm-compressor how to read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ckpt_core.plugin_api import StateDictAdapter, add_quantization_config
from ckpt_plugins_qat.schemes import Scheme

#: The HF name of the output projection, never quantized.
LM_HEAD = "lm_head"


def quantization_config(scheme: Scheme, group_size: int, ignore: Iterable[str]) -> dict[str, Any]:
    """The ``config.json`` ``quantization_config`` of a compressed-tensors export."""
    return {
        "quant_method": "compressed-tensors",
        "format": scheme.ct_format,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": scheme.weights_args(group_size),
                "input_activations": scheme.input_activations_args(),
                "output_activations": None,
                "format": scheme.ct_format,
            }
        },
        "ignore": sorted(set(ignore) | {LM_HEAD}),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


class QATStateDictAdapter(StateDictAdapter):
    """Adds ``quantization_config``; its keys pass through unchanged.

    Args:
        scheme: the trained scheme.
        group_size: the configured group size.
        unquantized_linears: returns the native module names of the model's
            linears that were not quantized (they go to ``ignore`` under their
            HF names); called when ``config.json`` is written.
        quantized_linears: returns the native module names of the linears that
            were quantized; needed to merge with another quantizing converter's
            ``quantization_config`` (e.g. float8's fp8 export on other linears).
        model_adapter: the model's adapter, used to name modules the HF way.
    """

    subfolder = None

    def __init__(
        self,
        scheme: Scheme,
        group_size: int,
        unquantized_linears: Callable[[], Iterable[str]],
        quantized_linears: Callable[[], Iterable[str]],
        model_adapter: StateDictAdapter | None = None,
    ) -> None:
        self.scheme = scheme
        self.group_size = group_size
        self.unquantized_linears = unquantized_linears
        self.quantized_linears = quantized_linears
        self.model_adapter = model_adapter

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Identity: module paths are the model adapter's business."""
        return dict(state_dict)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """Identity (inverse of :meth:`to_hf`)."""
        return dict(hf_state_dict)

    def hf_module(self, module: str) -> str:
        """HF name of a native module path (through the model adapter, if any)."""
        return module if self.model_adapter is None else self.model_adapter.hf_module(module)

    def update_hf_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` plus this export's ``quantization_config`` (merged with one already there)."""
        ignore = [self.hf_module(m) for m in self.unquantized_linears()]
        quantized = [self.hf_module(m) for m in self.quantized_linears()]
        qc = quantization_config(self.scheme, self.group_size, ignore)
        return add_quantization_config(config, qc, quantized, owner="qat")

    def describe(self) -> dict[str, Any]:
        """Scheme and group size, for manifests."""
        return {"scheme": self.scheme.name, "group_size": self.group_size}
