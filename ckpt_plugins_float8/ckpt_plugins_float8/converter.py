"""The float8 converter: hooks only; the work lives in sibling modules."""

from __future__ import annotations

from typing import ClassVar

from ckpt_core.converter import Converter
from ckpt_plugins_float8.config import Float8Config


class Float8Converter(Converter):
    """Converter registered as ``float8``."""

    name: ClassVar[str] = "float8"
    Config = Float8Config

    def __init__(self, config: Float8Config | None = None) -> None:
        super().__init__(config)
