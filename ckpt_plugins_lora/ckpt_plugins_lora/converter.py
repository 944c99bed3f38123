"""The lora converter: hooks only; the work lives in sibling modules."""

from __future__ import annotations

from typing import ClassVar

from ckpt_core.converter import Converter
from ckpt_plugins_lora.config import LoRAConfig


class LoRAConverter(Converter):
    """Converter registered as ``lora``."""

    name: ClassVar[str] = "lora"
    runs_after: ClassVar[tuple[str, ...]] = ("qat", "float8")
    Config = LoRAConfig

    def __init__(self, config: LoRAConfig | None = None) -> None:
        super().__init__(config)
