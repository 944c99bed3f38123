"""``ckpt selftest PATH``: run the save / kill / resume fault matrix on your storage.

PATH is where the job's checkpoints will live: a local folder, an NFS mount or
an fsspec URI (``file://``, ``s3://...``; ``memory://`` runs in one process).
Everything goes under ``PATH/ckpt-selftest-<random>/`` and is removed at the
end unless ``--keep``. Prints a table of the cases (PASS / FAIL / SKIP, seconds,
what happened) and exits 0 only when none failed. The kill moments come from
``--seed`` (a random one is printed, to replay a failure). See
:mod:`ckpt_core.selftest` for the cases.
"""

from __future__ import annotations

import argparse
import secrets
import time

HELP = "check that save, kill -9 and resume hold on your storage (local, NFS, fsspec URI)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ckpt selftest``."""
    parser.add_argument("path", help="a folder or URI on the storage to test")
    parser.add_argument("--quick", action="store_true", help="fewer steps and one kill (~30 s)")
    parser.add_argument("--seed", type=int, default=None, help="replay the kill moments of a run")
    parser.add_argument("--keep", action="store_true", help="keep what the selftest wrote")
    parser.add_argument(
        "--inject",
        choices=("corrupt",),
        default=None,
        help="corrupt: flip a byte of a committed step before resuming (must FAIL)",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from ckpt_core import selftest
    from ckpt_core.errors import ConfigError
    from ckpt_core.storage import layout

    if not layout.is_uri(args.path) and not layout.exists(args.path):
        raise ConfigError(
            f"selftest path {args.path!r} does not exist; pass an existing folder (or mount "
            "point) on the storage to test."
        )
    seed = args.seed if args.seed is not None else secrets.randbelow(1 << 31)
    console = Console()
    root = selftest.new_root(args.path)
    console.print(f"ckpt selftest in {root} (seed {seed}; replay with --seed {seed})")
    plan = selftest.Plan(root, seed, quick=args.quick, inject=args.inject)
    start = time.perf_counter()
    try:
        with console.status("starting") as status:
            cases = selftest.run_matrix(plan, progress=status.update)
    finally:
        if args.keep:
            console.print(f"kept {root}")
        else:
            layout.remove_tree(root)
    table = Table(title=f"ckpt selftest: {args.path}")
    table.add_column("case")
    table.add_column("result")
    table.add_column("s", justify="right")
    table.add_column("what happened", overflow="fold")
    colors = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    for case in cases:
        status_text = f"[{colors[case.status]}]{case.status}[/]"
        table.add_row(case.name, status_text, f"{case.seconds:.1f}", case.detail)
    console.print(table)
    failed = [c for c in cases if c.status == "FAIL"]
    total = time.perf_counter() - start
    if failed:
        console.print(f"{len(failed)} of {len(cases)} cases FAILED in {total:.0f} s (seed {seed})")
        return 1
    console.print(f"all cases held in {total:.0f} s")
    return 0
