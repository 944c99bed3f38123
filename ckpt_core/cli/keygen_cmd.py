"""``ckpt keygen KEYFILE``: a new ed25519 key pair for signing checkpoints.

Writes the private key to KEYFILE (PEM, mode 0600) and the public key to
KEYFILE.pub; refuses to overwrite either. Give the private key to the job that
saves (``checkpoint.sign_key``, ``ckpt sign --key``) and the public key to
whoever loads (``checkpoint.verify_key``, ``ckpt verify --key``).
"""

from __future__ import annotations

import argparse

HELP = "create an ed25519 key pair (KEYFILE, KEYFILE.pub) for ckpt sign / verify --key"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ckpt keygen``."""
    parser.add_argument("keyfile", help="where the private key goes; the public key is KEYFILE.pub")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ckpt_core.storage import signing

    private, public, kid = signing.generate_key(args.keyfile)
    print(f"private key {private} (keep it secret; mode 0600)")
    print(f"public key  {public}")
    print(f"key id      {kid}")
    return 0
