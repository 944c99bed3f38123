"""ckpt: checkpoints for PyTorch distributed training, with converters as plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckpt_core._version import __version__
from ckpt_core.config import CheckpointConfig, ConvertersConfig
from ckpt_core.content.model_wrapper import ModelWrapper
from ckpt_core.deprecation import renamed_attribute as _renamed_attribute
from ckpt_core.errors import (
    CheckpointError,
    CkptError,
    ConfigError,
    DamagedCheckpointError,
    FolderLockedError,
    PluginError,
    PreflightError,
    SaveError,
)
from ckpt_core.protocol.converter import Converter, ConverterOptions
from ckpt_core.protocol.hookspecs import hookimpl
from ckpt_core.protocol.plugin_host import ConverterSet
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter

if TYPE_CHECKING:
    from ckpt_core.content.families import ModelFamily, register_model_family
    from ckpt_core.content.hf_native import HFNativeAdapter
    from ckpt_core.content.transforms import StateDictTransforms
    from ckpt_core.policy.exporter import load_hf, write_export
    from ckpt_core.policy.manager import CheckpointManager

_LAZY = {
    "CheckpointManager": "ckpt_core.policy.manager",
    "HFNativeAdapter": "ckpt_core.content.hf_native",
    "StateDictTransforms": "ckpt_core.content.transforms",
    "ModelFamily": "ckpt_core.content.families",
    "register_model_family": "ckpt_core.content.families",
    "load_hf": "ckpt_core.policy.exporter",
    "write_export": "ckpt_core.policy.exporter",
}


def __getattr__(name: str) -> Any:
    # The manager and transforms pull in torch.distributed.checkpoint: import on use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    return _renamed_attribute(__name__, name)  # an old name warns; others: AttributeError


__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "CkptError",
    "ConfigError",
    "Converter",
    "ConverterOptions",
    "ConverterSet",
    "ConvertersConfig",
    "DamagedCheckpointError",
    "FolderLockedError",
    "HFNativeAdapter",
    "ModelWrapper",
    "PluginError",
    "PreflightError",
    "SaveError",
    "StateDictAdapter",
    "StateDictTransforms",
    "ModelFamily",
    "hookimpl",
    "load_hf",
    "register_model_family",
    "write_export",
    "__version__",
]
