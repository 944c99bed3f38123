"""QAT converter for ckpt (torchao): fake-quantized training, int4/int8 export."""

from ckpt_plugins_qat.converter import QATConverter

__all__ = ["QATConverter"]
