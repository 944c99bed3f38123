"""Public names that were renamed: the old name still works for one release, with a warning.

A module that exported an old name has a module ``__getattr__`` that returns
``renamed_attribute(__name__, name)``: reading the old name returns the new object and
warns (:class:`DeprecationWarning`) with the name to use instead.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

#: old name → (new name, the module that defines it, the modules that exported the old name).
RENAMED: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "Converters": (
        "ConverterSet",
        "ckpt_core.protocol.plugin_host",
        ("ckpt_core", "ckpt_core.protocol.plugin_host"),
    ),
    "ConverterConfig": (
        "ConverterOptions",
        "ckpt_core.protocol.converter",
        ("ckpt_core", "ckpt_core.plugin_api", "ckpt_core.protocol.converter"),
    ),
}

#: The release that drops the old names.
REMOVED_IN = "0.2"


def renamed_attribute(module: str, name: str) -> Any:
    """The object ``module.name`` now has under its new name, warning that ``name`` is old.

    Raises ``AttributeError`` (the normal missing-attribute error) for any other name.
    """
    entry = RENAMED.get(name)
    if entry is None or module not in entry[2]:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new, home, _ = entry
    where = "ckpt_core.plugin_api" if module == "ckpt_core.plugin_api" else "ckpt_core"
    warnings.warn(
        f"{module}.{name} is renamed {where}.{new}; the old name goes away in "
        f"ckpt-core {REMOVED_IN}.",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(home), new)
