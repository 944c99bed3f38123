"""``ckpt plugins``: the discovered converters, their distributions and options."""

from __future__ import annotations

import argparse
import json
import typing
from typing import Any

HELP = "list discovered converters with their options"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ckpt plugins``."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def describe_options(config_cls: Any) -> list[dict[str, Any]]:
    """Each option of a converter ``Config``: name, type, default, description."""
    from pydantic_core import PydanticUndefined

    out = []
    for name, field in config_cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if default is PydanticUndefined:
            default = "<required>"
        type_name = _type_name(field.annotation)
        out.append(
            {
                "name": name,
                "type": type_name,
                "default": _jsonable(default),
                "description": field.description or "",
            }
        )
    return out


def _type_name(ann: Any) -> str:
    """``int``, ``list[str]``, ``Literal['a', 'b']``: the allowed values stay visible."""
    if isinstance(ann, type) and not typing.get_args(ann):
        return ann.__name__
    return str(ann).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def collect() -> list[dict[str, Any]]:
    """One record per discovered converter; import failures are recorded, not raised."""
    from ckpt_core.discovery import discover_converters
    from ckpt_core.errors import PluginError

    records = []
    for name, entry in sorted(discover_converters().items()):
        rec: dict[str, Any] = {
            "name": name,
            "distribution": entry.distribution,
            "version": entry.version,
            "value": entry.value,
        }
        try:
            cls = entry.load()
            rec["options"] = describe_options(cls.Config)
            rec["runs_after"] = list(getattr(cls, "runs_after", ()) or ())
        except PluginError as exc:
            rec["error"] = str(exc)
        records.append(rec)
    return records


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Print the converters; exit 1 when one fails to import."""
    records = collect()
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        if not records:
            print("No converters found (is CKPT_DISABLE_PLUGIN_AUTOLOAD set?).")
        for rec in records:
            print(f"{rec['name']}  ({rec['distribution']} {rec['version']})  {rec['value']}")
            if "error" in rec:
                print(f"    ERROR: {rec['error']}")
                continue
            if rec.get("runs_after"):
                print(f"    comes after: {', '.join(rec['runs_after'])}")
            for opt in rec["options"]:
                print(
                    f"    {opt['name']}: {opt['type']} = {json.dumps(opt['default'])}"
                    f"    {opt['description']}"
                )
    return 1 if any("error" in r for r in records) else 0
