"""``ckpt pin`` / ``ckpt unpin``: steps that retention never deletes.

``ckpt pin PATH STEP [STEP ...] [--note TEXT]`` records the steps in
``PATH/pins.json`` (see :mod:`ckpt_core.storage.pins`); ``ckpt unpin PATH STEP ...``
removes them; ``ckpt pin PATH`` lists the pins. A running job's purge reads the file
before every delete, so a pin takes effect at once.
"""

from __future__ import annotations

import argparse

HELP = "pin steps of a checkpoint folder so retention keeps them (unpin: undo; no STEP: list)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``PATH [STEP ...] [--note TEXT]``."""
    parser.add_argument("path", metavar="PATH", help="checkpoint folder (holds step-<N>/)")
    parser.add_argument("steps", metavar="STEP", type=int, nargs="*", help="steps to (un)pin")
    parser.add_argument("--note", help="why the step is pinned (shown by ckpt pin PATH)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Pin, unpin or list; exit 2 for a step that is not committed."""
    from ckpt_core.storage import pins

    if not args.steps:
        if args.command == "unpin":
            from ckpt_core.errors import ConfigError

            raise ConfigError("ckpt unpin PATH STEP [STEP ...]: name at least one step.")
        pinned = pins.read_pins(args.path)
        if not pinned:
            print(f"no pinned steps in {args.path}")
        for step, info in sorted(pinned.items()):
            note = f"  {info['note']}" if info.get("note") else ""
            print(f"step-{step}{note}")
        return 0
    for step in args.steps:
        pins.set_pin(args.path, step, args.command == "pin", note=args.note)
        print(f"{args.command}ned step-{step} in {args.path}")
    return 0
