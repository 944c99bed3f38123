"""``ckpt`` entry point: dispatches to one module per subcommand.

Each subcommand module defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args, extra) -> int``; heavy imports happen inside ``run``. A failure
is one line on stderr (:mod:`ckpt_core.cli.failures`); ``--debug`` or
``CKPT_DEBUG=1`` adds its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ckpt_core.cli import failures, storage_args

SUBCOMMANDS = {
    "plugins": "ckpt_core.cli.plugins_cmd",
    "inspect": "ckpt_core.cli.inspect_cmd",
    "verify": "ckpt_core.cli.verify_cmd",
    "convert": "ckpt_core.cli.convert_cmd",
    "train": "ckpt_core.cli.train_cmd",
    "pin": "ckpt_core.cli.pin_cmd",
    "unpin": "ckpt_core.cli.pin_cmd",
    "keygen": "ckpt_core.cli.keygen_cmd",
    "sign": "ckpt_core.cli.sign_cmd",
    "selftest": "ckpt_core.cli.selftest_cmd",
}

DEBUG_HELP = "show the traceback of a failure (also: environment variable CKPT_DEBUG=1)"

#: Object-store clients whose INFO lines (where credentials came from) only -v shows.
QUIET_LOGGERS = ("botocore", "aiobotocore", "s3fs", "fsspec")

# Subcommands whose unknown options are passed through (config overrides).
PASSTHROUGH = {"train"}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The top-level parser and the imported subcommand modules."""
    parser = argparse.ArgumentParser(
        prog="ckpt", description="Checkpoints for PyTorch distributed training."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # not built yet
            raise
        modules[name] = module
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        # Also after the subcommand (``ckpt convert A B --debug``); unset, the top level's holds.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ckpt`` command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        for name in QUIET_LOGGERS:  # "Found credentials in environment variables" etc.
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and args.command not in PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(modules[args.command].run(args, extra) or 0)
    except KeyboardInterrupt:
        print(f"ckpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # DCP wraps failures in a BaseException: one line each too
        uris = storage_args.named_uris(argv)  # named by a store's refusal (no option values)
        code = failures.report(
            args.command, exc, debug=failures.debug_enabled(args.debug), uris=uris
        )
    # The failed command's objects (a manager, a device mesh: their gloo process groups and
    # worker threads) sit in reference cycles through the traceback. Free them now, while
    # the interpreter is whole: torn down during its shutdown instead, a gloo worker can
    # abort the process ("terminate called without an active exception", exit -6) after
    # the error line was printed.
    import gc

    gc.collect()
    return code


if __name__ == "__main__":
    sys.exit(main())
