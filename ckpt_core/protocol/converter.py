"""An optional base class for converters.

Any class works as a converter when it has a ``name`` class attribute, a
nested pydantic ``Config`` and ``__init__(self, config)``; subclassing
:class:`Converter` adds the strict option model and ordering attributes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ckpt_core.deprecation import renamed_attribute


class ConverterOptions(BaseModel):
    """Base for converter option models: unknown options are an error."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class Converter:
    """Base class for converters; implement hooks as ``@hookimpl`` methods."""

    #: The converter's name: entry-point name, config key and ``enabled`` entry.
    name: ClassVar[str]
    #: Converters that, when also enabled, must come *before* this one in
    #: ``converters.enabled`` (LoRA wraps quantized linears: ``("qat", "float8")``).
    runs_after: ClassVar[tuple[str, ...]] = ()
    #: The hook protocol (``ckpt_core.protocol.hookspecs.HOOK_PROTOCOL_VERSION``) this converter was
    #: written for; a ckpt-core that no longer runs it, or does not run it yet, refuses it.
    hook_protocol: ClassVar[int] = 1

    class Config(ConverterOptions):
        """This converter's options (none)."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else type(self).Config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def __getattr__(name: str) -> Any:
    # An old name (ConverterConfig) still resolves, with a DeprecationWarning naming the new one.
    return renamed_attribute(__name__, name)
