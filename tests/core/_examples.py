"""Installing a documented example plugin as a user would: pip, into a folder of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "docs" / "examples"


def pip_install_example(name: str, tmp_path_factory) -> Path:
    """``pip install --target`` of ``docs/examples/<name>``; returns the target folder."""
    target = tmp_path_factory.mktemp("site")
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in docs/examples.
    source = tmp_path_factory.mktemp("src") / name
    shutil.copytree(EXAMPLES / name, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    return target


def example_env(target: Path) -> dict[str, str]:
    """The environment of a fresh interpreter that sees the example and this checkout."""
    env = dict(os.environ, PYTHONPATH=f"{target}{os.pathsep}{REPO_ROOT}")
    env.pop("CKPT_DISABLE_PLUGIN_AUTOLOAD", None)
    return env
