"""ckpt: checkpoints for PyTorch distributed training, with converters as plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckpt_core.adapter import StateDictAdapter
from ckpt_core.config import CheckpointConfig, ConvertersConfig
from ckpt_core.converter import Converter, ConverterConfig
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
from ckpt_core.hookspecs import hookimpl, hookspec
from ckpt_core.model_wrapper import ModelWrapper
from ckpt_core.plugins import Converters

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ckpt_core.hf_native import HFNativeAdapter
    from ckpt_core.manager import CheckpointManager
    from ckpt_core.transforms import StateDictTransforms

_LAZY = {
    "CheckpointManager": "ckpt_core.manager",
    "HFNativeAdapter": "ckpt_core.hf_native",
    "StateDictTransforms": "ckpt_core.transforms",
}


def __getattr__(name: str) -> Any:
    # The manager and transforms pull in torch.distributed.checkpoint: import on use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ckpt_core' has no attribute {name!r}")


__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "CkptError",
    "ConfigError",
    "Converter",
    "ConverterConfig",
    "Converters",
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
    "hookimpl",
    "hookspec",
    "__version__",
]
