"""The qat converter: hooks only; the work lives in sibling modules."""

from __future__ import annotations

from typing import ClassVar

from ckpt_core.converter import Converter
from ckpt_plugins_qat.config import QATConfig


class QATConverter(Converter):
    """Converter registered as ``qat``."""

    name: ClassVar[str] = "qat"
    Config = QATConfig

    def __init__(self, config: QATConfig | None = None) -> None:
        super().__init__(config)
