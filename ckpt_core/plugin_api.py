"""What a converter or model-family plugin may import from ckpt, in one public module.

The bundled plugins import only from here and from the package root; every other
module is internal and may move between releases (see ``docs/design.md``, "Where
things live"). Names here keep their meaning for the whole 0.x ``ckpt-core`` range
a plugin pins.

* Protocol: :class:`Converter`, :class:`ConverterOptions`, :class:`StateDictAdapter`,
  :data:`hookimpl`, :class:`ModelFamily`.
* Naming and tensors: :func:`canonical_fqn`, :func:`full_tensor`, :func:`with_local`.
* Mixture-of-experts layers: :func:`router_linears`, :func:`stacked_leaf_names`,
  :func:`transformable_experts`, :data:`WEIGHT_TRANSFORMS`.
* Export metadata: :func:`add_quantization_config`.
* Reading a checkpoint folder: :func:`read_json_object`, :func:`read_hf_config`,
  :func:`path_join`, :func:`path_exists` (local paths and fsspec URIs).
* Options and errors: :func:`comma_list`, :func:`first_of` and the ``CkptError`` classes.
"""

from __future__ import annotations

from typing import Any

from ckpt_core.config import comma_list
from ckpt_core.content.experts import (
    WEIGHT_TRANSFORMS,
    router_linears,
    stacked_leaf_names,
    transformable_experts,
)
from ckpt_core.content.families import ModelFamily
from ckpt_core.content.model_wrapper import canonical_fqn
from ckpt_core.content.quantization_config import add_quantization_config
from ckpt_core.deprecation import renamed_attribute
from ckpt_core.dtensor_utils import full_tensor, with_local
from ckpt_core.errors import (
    CheckpointError,
    CkptError,
    ConfigError,
    DamagedCheckpointError,
    PluginError,
    first_of,
)
from ckpt_core.protocol.converter import Converter, ConverterOptions
from ckpt_core.protocol.hookspecs import hookimpl
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter
from ckpt_core.storage.hf_config_file import read_hf_config
from ckpt_core.storage.hf_reader import read_json_object
from ckpt_core.storage.layout import exists as path_exists
from ckpt_core.storage.layout import join as path_join

__all__ = [
    "WEIGHT_TRANSFORMS",
    "CheckpointError",
    "CkptError",
    "ConfigError",
    "Converter",
    "ConverterOptions",
    "DamagedCheckpointError",
    "ModelFamily",
    "PluginError",
    "StateDictAdapter",
    "add_quantization_config",
    "canonical_fqn",
    "comma_list",
    "first_of",
    "full_tensor",
    "hookimpl",
    "path_exists",
    "path_join",
    "read_hf_config",
    "read_json_object",
    "router_linears",
    "stacked_leaf_names",
    "transformable_experts",
    "with_local",
]


def __getattr__(name: str) -> Any:
    # An old name (ConverterConfig) still resolves, with a DeprecationWarning naming the new one.
    return renamed_attribute(__name__, name)
