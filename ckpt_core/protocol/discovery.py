"""Entry-point discovery of converters (and the scan model families share).

Listing reads installed distributions' metadata only; a converter's module is
imported by :meth:`ConverterEntry.load`, i.e. only when a run enables it.
``CKPT_DISABLE_PLUGIN_AUTOLOAD=1`` turns discovery off; classes can then be
added with :func:`register_converter_class` or passed to ``ConverterSet`` by hand.
Model families (:mod:`ckpt_core.content.families`) are found by :func:`scan_entry_points`
in their own group, under the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

from ckpt_core.errors import PluginError
from ckpt_core.protocol.hookspecs import ENTRY_POINT_GROUP

DISABLE_ENV = "CKPT_DISABLE_PLUGIN_AUTOLOAD"

_manual: dict[str, type] = {}


@dataclass(frozen=True)
class PluginEntry:
    """One discovered entry point (a converter, a model family), not yet imported."""

    name: str
    value: str  # "module:attribute"
    distribution: str
    version: str
    entry_point: metadata.EntryPoint | None = None
    #: Set when two distributions claim this name: the error ``load`` raises.
    conflict: str | None = None

    def _import(self, noun: str, remedy: str) -> Any:
        """The entry point's target; a conflict or any import failure is a :class:`PluginError`
        naming ``noun``, the distribution, and ``remedy``."""
        if self.conflict is not None:
            raise PluginError(self.conflict)
        try:
            return self.entry_point.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's
            raise PluginError(
                f"{noun} {self.name!r} from distribution {self.distribution!r} "
                f"({self.value}) failed to import: {type(exc).__name__}: {exc}. "
                f"Fix or reinstall {self.distribution!r}{remedy}."
            ) from exc


class ConverterEntry(PluginEntry):
    """One discovered converter, not yet imported."""

    def load(self) -> type:
        """Import the converter class, wrapping failures in a :class:`PluginError`."""
        if self.entry_point is None and self.conflict is None:
            return _manual[self.name]
        remedy = f", or remove {self.name!r} from converters.enabled"
        cls = self._import("Converter", remedy)
        validate_converter_class(cls, self.name, self.distribution)
        return cls


def autoload_disabled() -> bool:
    """Whether ``CKPT_DISABLE_PLUGIN_AUTOLOAD`` turns entry-point discovery off."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def register_converter_class(cls: type, name: str | None = None) -> None:
    """Make a converter class findable by name without an entry point."""
    name = name or getattr(cls, "name", None)
    validate_converter_class(cls, name, "<registered by hand>")
    _manual[name] = cls


def unregister_converter_class(name: str) -> None:
    """Forget a class added with :func:`register_converter_class`."""
    _manual.pop(name, None)


def discover_converters() -> dict[str, ConverterEntry]:
    """All converters by name: entry points (unless disabled) plus manual ones.

    A name two distributions claim is listed with a ``conflict``: loading it (a
    run that enables it, ``ckpt plugins``) raises a :class:`PluginError` naming
    both; runs that do not enable it are unaffected.
    """
    found = scan_entry_points(ENTRY_POINT_GROUP, "Converter", ConverterEntry)
    for name, cls in _manual.items():
        found.setdefault(
            name, ConverterEntry(name, f"{cls.__module__}:{cls.__qualname__}", "<manual>", "-")
        )
    return found


E = TypeVar("E")


def scan_entry_points(group: str, noun: str, make: Callable[..., E]) -> dict[str, E]:
    """Entries of entry-point ``group`` by name, none imported; ``{}`` when autoload is off.

    ``make(name, value, distribution, version, entry_point, conflict=None)``
    builds one entry. A name two distributions claim gets one entry whose
    ``conflict`` is the error naming both (``noun`` starts it: "Converter name
    'x' is claimed by two distributions ..."), raised only when it is loaded.
    """
    found: dict[str, E] = {}
    if autoload_disabled():
        return found
    first: dict[str, tuple[str, str, str]] = {}
    for ep in metadata.entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        version = ep.dist.version if ep.dist is not None else "?"
        prior = first.setdefault(ep.name, (dist, ep.value, version))
        if prior[:2] == (dist, ep.value):
            found.setdefault(ep.name, make(ep.name, ep.value, dist, version, ep))
            continue
        found[ep.name] = make(
            ep.name,
            f"{prior[1]} | {ep.value}",
            f"{prior[0]}, {dist}",
            f"{prior[2]}, {version}",
            None,
            conflict=(
                f"{noun} name {ep.name!r} is claimed by two distributions: "
                f"{prior[0]!r} ({prior[1]}) and {dist!r} ({ep.value}). Uninstall one of them."
            ),
        )
    return found


def validate_converter_class(cls: Any, name: str | None, distribution: str) -> None:
    """Check the class shape DESIGN.md requires: ``name``, ``Config``, ``__init__(config)``."""
    where = f"Converter {name!r} from {distribution!r}"
    if not isinstance(cls, type):
        raise PluginError(f"{where}: entry point must name a class, got {cls!r}.")
    cls_name = getattr(cls, "name", None)
    if not isinstance(cls_name, str) or not cls_name:
        raise PluginError(f"{where}: class {cls.__qualname__} has no string 'name' attribute.")
    if name is not None and cls_name != name:
        raise PluginError(
            f"{where}: class {cls.__qualname__}.name is {cls_name!r}, but its entry point "
            f"is named {name!r}; they must be equal."
        )
    config = getattr(cls, "Config", None)
    from pydantic import BaseModel

    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise PluginError(
            f"{where}: class {cls.__qualname__} needs a nested pydantic 'Config' model "
            "(subclass ckpt_core.protocol.converter.ConverterOptions)."
        )
