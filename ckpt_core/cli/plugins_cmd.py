"""``ckpt plugins``: the discovered converters and model families, with their distributions.

Converters are listed with their options; model families with the HF
``model_type`` values they read and their flavors. An entry that fails to load
(import error, bad shape, a name two distributions claim) gets its own line and
makes the command exit 1; the others are listed as usual.
"""

from __future__ import annotations

import argparse
import json
import typing
from typing import Any

HELP = "list discovered converters (with their options) and model families"


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
    from ckpt_core.errors import PluginError
    from ckpt_core.protocol.discovery import discover_converters

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


def collect_families() -> list[dict[str, Any]]:
    """One record per discovered model family; load failures are recorded, not raised."""
    from ckpt_core.content.families import installed_families

    records = []
    for entry, family, error in installed_families():
        rec: dict[str, Any] = {
            "name": entry.name,
            "distribution": entry.distribution,
            "version": entry.version,
            "value": entry.value,
        }
        if family is None:
            rec["error"] = error
        else:
            rec["model_types"] = list(family.model_types)
            rec["flavors"] = list(family.flavors)
            if family.fallback is not None:
                from ckpt_core.content.families import fallback_text

                rec["fallback"] = fallback_text(family)
        records.append(rec)
    return records


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Print the converters and model families; exit 1 when one fails to load."""
    records, families = collect(), collect_families()
    if args.json:
        print(json.dumps({"converters": records, "model_families": families}, indent=2))
    else:
        _print_section("Converters", records, _converter_lines)
        _print_section("Model families", families, _family_lines)
    return 1 if any("error" in r for r in records + families) else 0


def _print_section(title: str, records: list[dict[str, Any]], details: Any) -> None:
    """A title, then per record its header line and either its error or ``details(rec)``."""
    print(f"{title}:")
    if not records:
        print("  none found (is CKPT_DISABLE_PLUGIN_AUTOLOAD set?)")
    for rec in records:
        print(f"{rec['name']}  ({rec['distribution']} {rec['version']})  {rec['value']}")
        lines = [f"ERROR: {rec['error']}"] if "error" in rec else details(rec)
        for line in lines:
            print(f"    {line}")


def _converter_lines(rec: dict[str, Any]) -> list[str]:
    lines = [f"comes after: {', '.join(rec['runs_after'])}"] if rec.get("runs_after") else []
    for opt in rec["options"]:
        lines.append(
            f"{opt['name']}: {opt['type']} = {json.dumps(opt['default'])}    {opt['description']}"
        )
    return lines


def _family_lines(rec: dict[str, Any]) -> list[str]:
    lines = [f"reads model_type: {', '.join(rec['model_types']) or '-'}"]
    if rec.get("fallback"):
        lines.append(f"and, when no family lists it: {rec['fallback']}")
    if rec["flavors"]:
        lines.append(f"flavors: {', '.join(rec['flavors'])}")
    return lines
