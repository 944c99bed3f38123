"""``ConverterSet``: the enabled converters of one run, composed as one object.

Each hook of :mod:`ckpt_core.protocol.hookspecs` is a method here that applies the
composition rule its spec states. Instances are registered with one pluggy
``PluginManager``; pluggy validates every ``@hookimpl`` against its spec.
Set ``CKPT_TRACE_PLUGINS=1`` to log every hook call with arguments and result.
"""

from __future__ import annotations

import difflib
import logging
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pluggy
from pydantic import ValidationError

from ckpt_core.config import comma_list
from ckpt_core.deprecation import renamed_attribute
from ckpt_core.errors import ConfigError, NotEnabledError, PluginError
from ckpt_core.protocol import hookspecs
from ckpt_core.protocol.discovery import discover_converters
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter

logger = logging.getLogger(__name__)

TRACE_ENV = "CKPT_TRACE_PLUGINS"


def format_validation_error(converter: str, exc: ValidationError, config_cls: Any = None) -> str:
    """``Converter 'lora' option 'rank': ...`` lines from a pydantic error.

    With ``config_cls``, an unknown option also lists the converter's options.
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<options>"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            options = list(getattr(config_cls, "model_fields", {}))
            msg = "unknown option" + (f"; options: {', '.join(options)}" if options else "")
        lines.append(f"Converter {converter!r} option {loc!r}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


def split_list_options(config_cls: Any, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options as given, except that a list option given as ``"a,b"`` becomes ``["a", "b"]``
    (what ``--converters.<name>.<option> a,b`` on a command line produces)."""
    out = dict(raw or {})
    fields = getattr(config_cls, "model_fields", {})
    for key, value in out.items():
        field = fields.get(key)
        if isinstance(value, str) and field is not None:
            if typing.get_origin(field.annotation) in (list, tuple):
                out[key] = comma_list(value)
    return out


class ConverterSet:
    """The enabled converters, in config order, behind one hook-per-method face."""

    def __init__(self, converters: Iterable[Any] = ()) -> None:
        self._items: list[Any] = list(converters)
        names = [self._name_of(c) for c in self._items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"converters.enabled lists {dupes} more than once.")
        check_ordering(names, {self._name_of(c): type(c) for c in self._items})
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        for conv, name in zip(self._items, names):
            try:
                self._pm.register(conv, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"Converter {name!r}: {exc}") from exc
            _check_unmarked_hooks(self._pm, conv, name)
            check_hook_protocol(conv, name)
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"{exc} (a @hookimpl whose name matches no hook of ckpt_core.protocol.hookspecs; "
                f"known hooks: {', '.join(hookspecs.HOOK_NAMES)})"
            ) from exc
        self._callers: dict[tuple[str, int], Any] = {}
        if os.environ.get(TRACE_ENV, "").strip() not in ("", "0"):
            self._enable_tracing()

    # -- construction ---------------------------------------------------------

    @classmethod
    def from_config(
        cls, enabled: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None
    ) -> ConverterSet:
        """Discover, import, validate and instantiate the converters ``enabled`` names."""
        options = dict(options or {})
        if not enabled:
            return cls([])
        available = discover_converters()
        unknown = [n for n in enabled if n not in available]
        if unknown:
            installed = ", ".join(sorted(available)) or "none"
            close = difflib.get_close_matches(unknown[0], list(available), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"converters.enabled: unknown converter {unknown[0]!r}.{hint} Installed "
                f"converters: {installed}. Otherwise install the distribution that provides "
                "it (the bundled ones are ckpt-plugins-lora, ckpt-plugins-qat and "
                "ckpt-plugins-float8)."
            )
        for name in options:
            if name not in enabled:
                logger.warning(
                    "[converters.%s] has options but %r is not in converters.enabled; ignored",
                    name,
                    name,
                )
        classes = {n: available[n].load() for n in enabled}
        check_ordering(list(enabled), classes)
        instances = []
        for name in enabled:
            conv_cls = classes[name]
            try:
                config = conv_cls.Config(**split_list_options(conv_cls.Config, options.get(name)))
            except ValidationError as exc:
                raise ConfigError(format_validation_error(name, exc, conv_cls.Config)) from None
            try:
                instances.append(conv_cls(config))
            except (ConfigError, PluginError):
                raise
            except Exception as exc:  # noqa: BLE001
                raise PluginError(
                    f"Converter {name!r} failed to initialize: {type(exc).__name__}: {exc}"
                ) from exc
        return cls(instances)

    # -- introspection --------------------------------------------------------

    @staticmethod
    def _name_of(conv: Any) -> str:
        name = getattr(conv, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"Converter {conv!r} has no string 'name' attribute.")
        return name

    @property
    def names(self) -> list[str]:
        """Names in config order."""
        return [self._name_of(c) for c in self._items]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __getitem__(self, name: str) -> Any:
        for conv in self._items:
            if self._name_of(conv) == name:
                return conv
        raise NotEnabledError(
            f"converter {name!r} is not enabled; enabled: {self.names or 'none'}. Add it to "
            "converters.enabled, or look up one of those."
        )

    def describe(self) -> list[dict[str, Any]]:
        """Names and options, for manifests: ``[{"name": ..., "options": {...}}]``."""
        out = []
        for conv in self._items:
            cfg = getattr(conv, "config", None)
            opts = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else {}
            out.append({"name": self._name_of(conv), "options": opts})
        return out

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The underlying pluggy manager (for tracing or advanced use)."""
        return self._pm

    # -- per-converter calls --------------------------------------------------

    def _call(self, index: int, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` on the converter at ``index`` only; ``None`` if it lacks it."""
        key = (hook, index)
        caller = self._callers.get(key)
        if caller is None:
            others = [c for i, c in enumerate(self._items) if i != index]
            caller = self._pm.subset_hook_caller(hook, remove_plugins=others)
            self._callers[key] = caller
        if not caller.get_hookimpls():
            return None
        try:
            results = caller(**kwargs)
        except (ConfigError, PluginError):
            raise
        except Exception as exc:
            name = self._name_of(self._items[index])
            raise PluginError(
                f"Converter {name!r} hook {hook!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        return results[0] if results else None

    # -- composed hooks -------------------------------------------------------

    def convert(self, model: Any) -> None:
        """Apply every converter's ``convert`` to one model part, in config order."""
        parts = model if isinstance(model, (list, tuple)) else [model]
        for part in parts:
            for i in range(len(self._items)):
                self._call(i, "convert", model=part)

    def owner(self, fqn: str) -> str | None:
        """Name of the converter that owns ``fqn``; ``None`` when none does."""
        owner = None
        for i, conv in enumerate(self._items):
            if self._call(i, "key_filter", fqn=fqn):
                name = self._name_of(conv)
                if owner is not None:
                    raise PluginError(
                        f"Key {fqn!r} is claimed by two converters: {owner!r} and {name!r}. "
                        "Each key may belong to at most one converter."
                    )
                owner = name
        return owner

    def key_filter(self, fqn: str) -> bool:
        """True when any converter owns ``fqn`` (two owners is an error)."""
        return self.owner(fqn) is not None

    def state_dict_transform(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Chain the transforms in reverse config order; ``None`` keeps the input."""
        for i in reversed(range(len(self._items))):
            out = self._call(i, "state_dict_transform", state_dict=state_dict)
            if out is not None:
                if not isinstance(out, Mapping):
                    raise PluginError(
                        f"Converter {self._name_of(self._items[i])!r} hook "
                        f"'state_dict_transform' returned {type(out).__name__}, expected a dict."
                    )
                state_dict = dict(out)
        return state_dict

    def state_dict_adapters(
        self, model_adapter: StateDictAdapter | None = None
    ) -> dict[str, StateDictAdapter]:
        """Each converter's adapter by name (converters returning ``None`` omitted)."""
        out: dict[str, StateDictAdapter] = {}
        for i, conv in enumerate(self._items):
            adapter = self._call(i, "state_dict_adapter", model_adapter=model_adapter)
            if adapter is None:
                continue
            if not isinstance(adapter, StateDictAdapter):
                raise PluginError(
                    f"Converter {self._name_of(conv)!r} hook 'state_dict_adapter' returned "
                    f"{type(adapter).__name__}, expected a ckpt_core.StateDictAdapter or None."
                )
            out[self._name_of(conv)] = adapter
        return out

    def post_optimizer_step(self, model_parts: Any) -> None:
        """Call every converter's ``post_optimizer_step`` in config order."""
        parts = list(model_parts) if isinstance(model_parts, (list, tuple)) else [model_parts]
        for i in range(len(self._items)):
            self._call(i, "post_optimizer_step", model_parts=parts)

    # -- tracing --------------------------------------------------------------

    def _enable_tracing(self) -> None:
        trace = logging.getLogger("ckpt_core.trace")
        # The variable is an explicit request: make the lines visible even when the
        # program configured no logging (Python would drop INFO records then).
        if trace.getEffectiveLevel() > logging.INFO:
            trace.setLevel(logging.INFO)
        if not trace.hasHandlers():
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            trace.addHandler(handler)

        def before(hook_name: str, impls: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
            who = ", ".join(impl.plugin_name for impl in impls)
            trace.info("hook %s -> [%s] args=%s", hook_name, who, _short(kwargs))

        def after(outcome: Any, hook_name: str, impls: Sequence[Any], kwargs: Any) -> None:
            exc = outcome.exception
            if exc is not None:
                trace.info("hook %s raised %r", hook_name, exc)
            else:
                trace.info("hook %s returned %s", hook_name, _short(outcome.get_result()))

        self._pm.add_hookcall_monitoring(before, after)


def _short(value: Any, limit: int = 200) -> str:
    if isinstance(value, Mapping) and len(value) > 8:
        text = f"<dict with {len(value)} keys: {list(value)[:4]}...>"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_unmarked_hooks(pm: pluggy.PluginManager, conv: Any, name: str) -> None:
    """A method named like a hook but without ``@hookimpl`` would be silently ignored."""
    for hook in hookspecs.HOOK_NAMES:
        if not callable(getattr(conv, hook, None)):
            continue
        if not any(impl.plugin is conv for impl in getattr(pm.hook, hook).get_hookimpls()):
            raise PluginError(
                f"Converter {name!r} defines {hook}() without the @hookimpl marker, so "
                f"pluggy would never call it. Decorate it with @ckpt_core.hookimpl."
            )


def check_hook_protocol(conv: Any, name: str) -> None:
    """Refuse a converter written for a hook protocol this ckpt-core does not run."""
    version = getattr(conv, "hook_protocol", 1)
    newest, oldest = hookspecs.HOOK_PROTOCOL_VERSION, hookspecs.OLDEST_HOOK_PROTOCOL
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PluginError(
            f"Converter {name!r}: hook_protocol must be a positive int, got {version!r}."
        )
    if version > newest:
        raise PluginError(
            f"Converter {name!r} was written for hook protocol {version}, newer than this "
            f"ckpt-core's ({newest}): upgrade ckpt-core, or install an older release of the plugin."
        )
    if version < oldest:
        raise PluginError(
            f"Converter {name!r} was written for hook protocol {version}, which this ckpt-core "
            f"no longer runs (oldest: {oldest}): upgrade the plugin, or pin an older ckpt-core."
        )


def check_ordering(names: Sequence[str], classes: Mapping[str, type]) -> None:
    """Raise when an enabled converter must run after one listed later."""
    position = {n: i for i, n in enumerate(names)}
    for name in names:
        for earlier in getattr(classes[name], "runs_after", ()) or ():
            if earlier in position and position[earlier] > position[name]:
                raise ConfigError(
                    f"converters.enabled: {earlier!r} must come before {name!r} "
                    f"({name!r} wraps what {earlier!r} builds); got {list(names)}. "
                    f"Reorder to put {earlier!r} first."
                )


def __getattr__(name: str) -> Any:
    # An old name (Converters) still resolves, with a DeprecationWarning naming the new one.
    return renamed_attribute(__name__, name)
