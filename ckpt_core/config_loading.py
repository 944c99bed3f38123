"""TOML files and ``--section.field VALUE`` overrides into pydantic models."""

from __future__ import annotations

import json
import tomllib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ckpt_core.config import comma_list
from ckpt_core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def parse_value(text: str) -> Any:
    """A command-line value: a TOML or JSON literal when it parses, else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def _field_is_list(model: type[BaseModel] | None, path: Sequence[str]) -> bool:
    for i, part in enumerate(path):
        if model is None or part not in model.model_fields:
            return False
        ann = model.model_fields[part].annotation
        if i == len(path) - 1:
            return typing.get_origin(ann) is list
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return False


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Apply ``["--a.b", "v", "--c=w", ...]`` to a nested dict (returns a new dict).

    Values parse as TOML/JSON literals when they can, else as strings; a list
    field (looked up on ``model``) also takes ``a,b``.
    """
    data = json.loads(json.dumps(data))
    items = list(overrides)
    i = 0
    while i < len(items):
        flag = items[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ConfigError(f"expected an option like --section.field, got {flag!r}.")
        if "=" in flag:
            key, raw = flag[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"option {flag!r} needs a value.")
            key, raw = flag[2:], items[i + 1]
            i += 2
        path = key.split(".")
        value = parse_value(raw)
        if isinstance(value, str) and _field_is_list(model, path):
            value = comma_list(value)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--{key}: {part!r} is a value, not a section.")
            node = nxt
        node[path[-1]] = value
    return data


def known_fields(model: type[BaseModel] | None, loc: Sequence[Any]) -> list[str]:
    """Field names of the (nested) model that holds the field at ``loc``; [] if unknown."""
    for part in loc[:-1]:
        if model is None:
            return []
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            if isinstance(part, int):
                continue  # a list index: stay on the item model found before
            return []
        ann = field.annotation
        args = [ann, *typing.get_args(ann)]
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model is not None else []


def format_config_error(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> str:
    """One line per problem: ``field.path: message (got value)``.

    With ``model``, an unknown field also lists the fields allowed at that place.
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            allowed = known_fields(model, err.get("loc", ()))
            msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{loc}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


def build_config(model: type[M], data: dict[str, Any], prefix: str = "") -> M:
    """Validate ``data`` into ``model``, turning pydantic errors into :class:`ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_config_error(exc, prefix, model)) from None


def load_config(model: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """Read an optional TOML file, apply overrides, validate into ``model``."""
    data = read_toml(path) if path is not None else {}
    data = apply_overrides(data, overrides, model)
    return build_config(model, data)
