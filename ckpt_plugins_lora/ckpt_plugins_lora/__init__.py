"""LoRA converter for ckpt: adapters, merged HF export, PEFT adapter export."""

from ckpt_plugins_lora.config import LoRAConfig
from ckpt_plugins_lora.converter import LoRAConverter
from ckpt_plugins_lora.layers import LoRAFactor, init_adapters
from ckpt_plugins_lora.merge import merge_adapters, merged_weight
from ckpt_plugins_lora.peft_format import PeftLoraAdapter, peft_adapter_config

__all__ = [
    "LoRAConfig",
    "LoRAConverter",
    "LoRAFactor",
    "PeftLoraAdapter",
    "init_adapters",
    "merge_adapters",
    "merged_weight",
    "peft_adapter_config",
]
