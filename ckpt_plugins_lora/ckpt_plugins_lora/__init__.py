"""LoRA converter for ckpt: adapters, merged HF export, PEFT adapter export."""

from ckpt_plugins_lora.converter import LoRAConverter

__all__ = ["LoRAConverter"]
