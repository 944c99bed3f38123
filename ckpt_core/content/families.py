"""Model families: how to build a model and its state-dict adapter, found by name.

``ckpt convert`` picks a family from an HF ``config.json`` (its ``model_type``)
or from a manifest's ``{"adapter": <name>, "config": {...}}`` entry. Families
are plugins, discovered like converters: a distribution ships one through the
``ckpt_core.model_families`` entry-point group (:data:`FAMILY_ENTRY_POINT_GROUP`),
naming a :class:`ModelFamily` or a zero-argument callable returning one. The
reference Llama is registered that way by ``ckpt-core`` itself.

Listing reads distributions' metadata only; a family's module is imported when
a run needs it (by name), or when an HF ``model_type`` has to be matched. Two
distributions claiming one name, or a family that fails to import, break only
the runs that need it; ``ckpt plugins`` shows each on its own line.
``CKPT_DISABLE_PLUGIN_AUTOLOAD=1`` turns discovery off, as for converters.

:func:`register_model_family` adds a family in this process only (a test, a
notebook, a training script); it replaces a discovered family of the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ckpt_core.errors import ConfigError, PluginError
from ckpt_core.protocol.discovery import (
    DISABLE_ENV,
    PluginEntry,
    autoload_disabled,
    scan_entry_points,
)
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter
from ckpt_core.storage.hf_config_file import is_hf_path, read_hf_config

#: The entry-point group model families register in.
FAMILY_ENTRY_POINT_GROUP = "ckpt_core.model_families"

#: Where a third party learns to write one (named in errors).
WRITING_FAMILIES_DOC = "docs/writing-model-families.md"


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: builders keyed by the HF ``config.json`` dict.

    ``name`` is the family's registry name: the entry-point name, and the
    ``adapter`` its state-dict adapter records in manifests (``describe()``).
    """

    name: str
    #: ``config.json`` dict → the model's state-dict adapter.
    adapter: Callable[[dict[str, Any]], StateDictAdapter]
    #: ``(config.json dict, device=None)`` → a model; on ``device="meta"`` nothing
    #: is allocated (``ckpt convert`` counts the parameters that way first).
    build_model: Callable[..., nn.Module]
    #: HF ``model_type`` values this family reads.
    model_types: tuple[str, ...] = ()
    #: Named sizes :attr:`config_for` accepts (``ckpt convert --model NAME``).
    flavors: tuple[str, ...] = ()
    #: A flavor name, an HF folder or a ``config.json`` path → the ``config.json``
    #: dict this family builds from. ``None``: ``--model`` takes paths only, and
    #: their ``config.json`` is used as it is.
    config_for: Callable[[str], dict[str, Any]] | None = None
    #: ``(config dict, source=...)`` → ``None``; refuses a config this family cannot
    #: build, before anything is allocated (``source`` names it in the message).
    check_config: Callable[..., None] | None = None
    #: ``model_type`` → whether this family also reads it when no installed family
    #: lists it in ``model_types`` (the ``hf`` family: any causal LM transformers
    #: knows). Its docstring's first line says what it accepts (``ckpt plugins``).
    fallback: Callable[[str], bool] | None = None


class FamilyEntry(PluginEntry):
    """One discovered model family, not yet imported."""

    def load(self) -> ModelFamily:
        """Import and validate the family, wrapping failures in a :class:`PluginError`."""
        if self.entry_point is None and self.conflict is None:
            return _manual[self.name]
        target = self._import("Model family", "")
        try:
            family = target() if callable(target) else target  # a factory, or the family
        except Exception as exc:  # noqa: BLE001 - the factory is the plugin's
            raise PluginError(
                f"Model family {self.name!r} from distribution {self.distribution!r}: "
                f"{self.value}() raised {type(exc).__name__}: {exc}. Fix or reinstall "
                f"{self.distribution!r}."
            ) from exc
        validate_model_family(family, self.name, self.distribution)
        return family


_manual: dict[str, ModelFamily] = {}


def register_model_family(family: ModelFamily) -> None:
    """Add (or replace) a family in this process only, under ``family.name``.

    For tests, notebooks and scripts; a family another project ships is
    installed as a distribution with a ``ckpt_core.model_families`` entry point
    (see ``docs/writing-model-families.md``), so every process, the ``ckpt``
    command included, finds it.
    """
    validate_model_family(family, family.name, "<registered by hand>")
    _manual[family.name] = family


def unregister_model_family(name: str) -> None:
    """Forget a family added with :func:`register_model_family`."""
    _manual.pop(name, None)


def discover_model_families() -> dict[str, FamilyEntry]:
    """All families by name: entry points (unless disabled), then those registered by hand."""
    found = scan_entry_points(FAMILY_ENTRY_POINT_GROUP, "Model family", FamilyEntry)
    for name, family in _manual.items():
        where = getattr(family.adapter, "__module__", None) or "?"
        found[name] = FamilyEntry(name, f"{where} (registered by hand)", "<manual>", "-")
    return found


def validate_model_family(family: Any, name: str, distribution: str) -> None:
    """Check what a :class:`ModelFamily` must hold; one line naming the distribution."""
    where = f"Model family {name!r} from {distribution!r}"
    if not isinstance(family, ModelFamily):
        raise PluginError(
            f"{where}: the entry point must name a ckpt_core.content.families.ModelFamily or a "
            f"function returning one, got {type(family).__name__}."
        )
    if family.name != name:
        raise PluginError(
            f"{where}: its ModelFamily.name is {family.name!r}, but its entry point is named "
            f"{name!r}; they must be equal."
        )
    for field in ("adapter", "build_model"):
        if not callable(getattr(family, field)):
            raise PluginError(f"{where}: {field} must be callable, got {getattr(family, field)!r}.")
    for field in ("config_for", "check_config", "fallback"):
        value = getattr(family, field)
        if value is not None and not callable(value):
            raise PluginError(f"{where}: {field} must be callable or None, got {value!r}.")
    for field in ("model_types", "flavors"):
        value = getattr(family, field)
        if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
            raise PluginError(
                f"{where}: {field} must be a tuple of non-empty strings, got {value!r}."
            )


def model_family(name: str) -> ModelFamily:
    """The family called ``name`` (a manifest's ``model.adapter``); imports only that one."""
    if name in _manual:
        return _manual[name]
    entries = discover_model_families()
    if name not in entries:
        raise ConfigError(
            f"No model family {name!r} is installed (a manifest's model.adapter). "
            + _installed_text(entries)
        )
    return entries[name].load()


def family_for_hf_config(config: dict[str, Any]) -> ModelFamily:
    """The family that reads the config's ``model_type``.

    Precedence: a family registered by hand in this process; then the family
    named like the ``model_type`` (the usual case, which imports that family
    only); then the one other family listing it in ``model_types``: two is an
    error naming both; then the one family whose ``fallback`` accepts it (the
    ``hf`` family reads any causal LM transformers knows). A family that fails
    to load is named when none matches.
    """
    model_type = config.get("model_type")
    for family in _manual.values():
        if model_type in family.model_types:
            return family
    entries = discover_model_families()
    broken: list[str] = []
    own = entries.get(model_type) if isinstance(model_type, str) else None
    if own is not None:
        family = _try_load(own, broken)
        if family is not None and model_type in family.model_types:
            return family
    matches: list[tuple[ModelFamily, str]] = []
    for name in sorted(entries):
        if entries[name] is own or name in _manual:
            continue
        family = _try_load(entries[name], broken)
        if family is not None and model_type in family.model_types:
            matches.append((family, entries[name].distribution))
    for found, how in (
        (matches, ""),
        (_fallbacks(entries, model_type, broken), "the fallback of "),
    ):
        if len(found) > 1:
            names = ", ".join(f"{f.name!r} ({d})" for f, d in found)
            raise PluginError(
                f"config.json model_type {model_type!r} is read by {how}more than one model "
                f"family: {names}. Uninstall one of them, or register the one to use in this "
                "process with ckpt_core.content.families.register_model_family."
            )
        if found:
            return found[0][0]
    raise ConfigError(
        f"config.json model_type {model_type!r} has no installed model family. "
        + _installed_text(entries, broken)
    )


#: The family a bare flavor name (``tiny``) means when several families offer it.
DEFAULT_FAMILY = "llama"


def family_for_model(name_or_path: str) -> tuple[ModelFamily, dict[str, Any]]:
    """``(family, config.json dict)`` for ``ckpt convert --model``.

    ``name_or_path`` is an HF folder or ``config.json`` path (its ``model_type``
    picks the family), or a flavor name: ``tiny`` when one family offers it (or
    the :data:`DEFAULT_FAMILY`'s when several do, as in ckpt 0.1), ``qwen3:tiny``
    to pick another.
    """
    if is_hf_path(name_or_path):
        config = read_hf_config(name_or_path)
        family = family_for_hf_config(config)
        return family, family.config_for(name_or_path) if family.config_for else config
    wanted, _, flavor = name_or_path.rpartition(":")
    families = {e.name: f for e, f, _ in installed_families() if f is not None}
    having = [
        f
        for n, f in families.items()
        if flavor in f.flavors and f.config_for is not None and wanted in ("", n)
    ]
    if len(having) == 1:
        return having[0], having[0].config_for(flavor)
    default = [f for f in having if f.name == DEFAULT_FAMILY] if not wanted else []
    if default:  # a bare flavor was always the reference Llama's (ckpt 0.1)
        return default[0], default[0].config_for(flavor)
    if having:
        names = ", ".join(f"{f.name}:{flavor}" for f in having)
        raise ConfigError(
            f"--model {name_or_path!r}: several families offer it; pass one of {names}."
        )
    listed = "; ".join(
        f"{n}: {', '.join(f.flavors)}" for n, f in sorted(families.items()) if f.flavors
    )
    raise ConfigError(
        f"--model {name_or_path!r} is neither a flavor of an installed model family "
        f"({listed or 'none has flavors'}) nor a path to an HF folder or config.json."
    )


def installed_families() -> list[tuple[FamilyEntry, ModelFamily | None, str | None]]:
    """``(entry, family or None, error or None)`` for every family, sorted by name."""
    out = []
    for _, entry in sorted(discover_model_families().items()):
        try:
            out.append((entry, entry.load(), None))
        except PluginError as exc:
            out.append((entry, None, str(exc)))
    return out


def _try_load(entry: FamilyEntry, broken: list[str]) -> ModelFamily | None:
    """The entry's family, or ``None`` with its error appended to ``broken``."""
    try:
        return entry.load()
    except PluginError as exc:
        broken.append(str(exc))
        return None


def _fallbacks(
    entries: dict[str, FamilyEntry], model_type: Any, broken: list[str]
) -> list[tuple[ModelFamily, str]]:
    """``(family, distribution)`` of the families whose ``fallback`` accepts ``model_type``."""
    if not isinstance(model_type, str) or not model_type:
        return []
    found = []
    for name in sorted(entries):
        family = _manual.get(name) or _try_load(entries[name], broken)
        if family is not None and family.fallback is not None and family.fallback(model_type):
            found.append((family, entries[name].distribution))
    return found


def fallback_text(family: ModelFamily) -> str:
    """What a family's ``fallback`` accepts, from its docstring's first line ('' if none)."""
    if family.fallback is None:
        return ""
    doc = (getattr(family.fallback, "__doc__", None) or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else "other model types"


def _installed_text(entries: dict[str, FamilyEntry], broken: list[str] | None = None) -> str:
    """What is installed, what failed, and how to get more: the tail of a lookup error."""
    parts = []
    for name in sorted(entries):
        family = _try_load(entries[name], [])
        if family is None:
            continue
        listed = list(family.model_types) + ([fallback_text(family)] if family.fallback else [])
        types = ", ".join(listed) or "no model_type"
        parts.append(f"{name} from {entries[name].distribution} reads {types}")
    text = "Installed: " + ("; ".join(parts) if parts else "none") + "."
    if broken:
        text += f" Failed to load: {' | '.join(broken)}"
    if autoload_disabled():
        text += f" ({DISABLE_ENV} is set, so no installed family is discovered.)"
    return (
        text + " Install the distribution that provides the family (its entry point in the "
        f"{FAMILY_ENTRY_POINT_GROUP!r} group), or write one: {WRITING_FAMILIES_DOC}."
    )
