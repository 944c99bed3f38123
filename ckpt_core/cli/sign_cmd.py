"""``ckpt sign PATH --key PRIVATE``: sign committed steps and exports.

PATH is a step folder or an HF export folder written by ckpt (it has a
``manifest.json``), or a folder of ``step-<N>`` folders (every committed step is
signed, or only ``--step N``). Each file is read once: it must match the
manifest (size and CRC-32) and its SHA-256 goes into ``signature.json``, signed
with the ed25519 key (see :mod:`ckpt_core.storage.signing`). ``ckpt verify PATH
--key PUBLIC`` checks it.
"""

from __future__ import annotations

import argparse

HELP = "sign checkpoint steps or exports (signature.json over SHA-256 of every file)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ckpt sign``."""
    parser.add_argument("path", help="a step or export folder, or a folder of step-<N> folders")
    parser.add_argument("--key", required=True, help="private key PEM (from `ckpt keygen`)")
    parser.add_argument("--step", type=int, default=None, help="only this step of a folder")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ckpt_core.cli.verify_cmd import step_folders
    from ckpt_core.storage import signing

    key = signing.load_private_key(args.key)
    folders = step_folders(args.path, args.step)
    for folder in folders:
        doc = signing.sign_folder(folder, key)
        print(f"SIGNED {folder} ({len(doc['files'])} files, key {doc['key_id']})")
    return 0
