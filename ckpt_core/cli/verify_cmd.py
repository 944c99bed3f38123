"""``ckpt verify PATH``: check committed steps against their manifests.

PATH is a step folder (``.../step-100``) or a folder of steps (every committed
step is checked, or only ``--step N``). Each file is checked for presence,
size and CRC-32; files on disk that the manifest does not list are reported
too. ``--key PUBLIC`` checks ``signature.json`` and every file's SHA-256
instead (:mod:`ckpt_core.storage.signing`). Exit status 0 when everything
matches, 1 naming each bad file otherwise.
Large checkpoints get a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import sys

from ckpt_core.cli import storage_args

HELP = "check checkpoint files against their manifest (missing, truncated, checksum)"

#: Show a progress bar when a step holds more bytes than this.
PROGRESS_MIN_BYTES = 256 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a step folder, or a folder of step-<N> folders (or URI)")
    parser.add_argument("--step", type=int, default=None, help="only this step of a folder")
    parser.add_argument(
        "--key", default=None, help="public key PEM: also require a valid signature by it"
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar: auto shows it for steps over 256 MiB",
    )
    storage_args.add_argument(parser)


def step_folders(path: str, step: int | None) -> list[str]:
    """The step folders PATH stands for (itself, or its committed steps)."""
    from ckpt_core.errors import CheckpointError
    from ckpt_core.storage import layout, manifest

    if not layout.exists(path):
        raise CheckpointError(f"{path} does not exist; pass a step folder or a checkpoint folder.")
    if layout.exists(layout.join(path, manifest.MANIFEST_NAME)) or layout.exists(
        layout.join(path, ".metadata")
    ):
        return [path]
    steps = layout.committed_steps(path)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{path} has no committed step {step}; it has {steps or 'none'}.")
        steps = [step]
    if not steps:
        raise CheckpointError(
            f"{path} is neither a step folder (no manifest.json or .metadata) nor a folder "
            "of committed step-<N> folders."
        )
    return [layout.step_dir(path, s) for s in steps]


def verify_folder(folder: str, progress_mode: str = "auto") -> list:
    """Problems of one step folder (see :func:`ckpt_core.storage.manifest.verify`)."""
    from ckpt_core.errors import CheckpointError
    from ckpt_core.storage import manifest

    try:
        found = manifest.read(folder)
    except CheckpointError as exc:  # not JSON, wrong field types, unsafe names: reads nothing
        return [manifest.Problem(manifest.MANIFEST_NAME, "damaged", str(exc))]
    if found is None:
        return manifest.check_sizes(folder, None)
    total = manifest.total_bytes(found)
    show = progress_mode == "always" or (
        progress_mode == "auto" and total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
    )
    if not show:
        return manifest.verify(folder, found)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(f"verifying {folder}", total=total)
        return manifest.verify(folder, found, progress=lambda _f, n: bar.advance(task, n))


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ckpt_core.storage import signing

    storage_args.apply(args, args.path)
    key = signing.load_public_key(args.key) if args.key else None
    bad = 0
    for folder in step_folders(args.path, args.step):
        if key is not None:  # the signature, then every file's SHA-256 (covers the CRCs)
            problems = signing.check_folder(folder, key)
        else:
            problems = verify_folder(folder, args.progress)
        if problems:
            bad += 1
            print(f"FAILED {folder}: {len(problems)} bad file(s)")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"OK     {folder}" + (" (signature checked)" if key is not None else ""))
        if key is None and signing.has_signature(folder):
            print("       signed; signature not checked (pass --key PUBLIC to check it)")
    return 1 if bad else 0
