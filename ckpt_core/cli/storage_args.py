"""``--storage-option KEY=VALUE`` of ``ckpt convert``, ``inspect`` and ``verify``.

Each option (repeatable) goes to fsspec for the URIs of that one command, as
``checkpoint.storage_options`` does for a run: ``endpoint_url=http://minio:9000``,
``profile=training``, ``anon=true``. VALUE is read as JSON when it parses as JSON
(``true``, ``3``, ``{"region_name": "eu-west-1"}``), else as a string. Values may
be secrets (``secret=...``): they are never printed, not even in an error.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

FLAG = "--storage-option"


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--storage-option KEY=VALUE`` to ``parser``."""
    parser.add_argument(
        FLAG,
        dest="storage_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for this command's URIs (repeatable; VALUE as JSON when it parses, "
        "e.g. anon=true); values are never printed",
    )


def parse(items: Sequence[str]) -> dict[str, Any]:
    """``{KEY: VALUE}`` of ``KEY=VALUE`` items; a malformed item is one line without its value."""
    from ckpt_core.errors import ConfigError

    out: dict[str, Any] = {}
    for number, item in enumerate(items, 1):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ConfigError(
                f"{FLAG} number {number} is not KEY=VALUE with KEY a plain name (the item is not "
                "shown: it may hold a secret); write e.g. --storage-option endpoint_url=http://..."
            )
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def apply(args: argparse.Namespace, *paths: str) -> None:
    """Pass the command's ``--storage-option`` items to fsspec for every URI in ``paths``."""
    from ckpt_core.storage import store

    options = parse(getattr(args, "storage_options", None) or [])
    if options:
        store.use_storage_options(options, *paths)


def named_uris(argv: Sequence[str]) -> list[str]:
    """The URIs a command line names, leaving out ``--storage-option`` values."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith(FLAG + "="):
            skip = False
            continue
        if arg == FLAG:
            skip = True
            continue
        if "://" in arg:
            out.append(arg.split("=", 1)[-1])
    return out
