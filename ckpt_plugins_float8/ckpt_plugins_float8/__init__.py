"""Float8 training converter for ckpt (torchao): unchanged checkpoints, optional fp8 export."""

from ckpt_plugins_float8.converter import Float8Converter

__all__ = ["Float8Converter"]
