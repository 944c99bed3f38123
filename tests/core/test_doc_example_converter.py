"""docs/writing-converters.md builds a working plugin from its own text.

The files the page spells out (``<!-- file: PATH -->`` blocks) are the shipped
example, byte for byte; written to an empty folder, installed with pip and
tested with the page's own test file, they pass (the contract kit included).
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.core._doc_snippets import files_of

PAGE = REPO_ROOT / "docs" / "writing-converters.md"
EXAMPLE = REPO_ROOT / "docs" / "examples" / "ckpt-example-ema"


def test_the_page_spells_out_the_shipped_example_file_by_file():
    files = files_of(PAGE)
    assert set(files) == {"pyproject.toml", "ckpt_example_ema/__init__.py", "tests/test_ema.py"}
    for path, text in files.items():
        assert (EXAMPLE / path).read_text() == text, f"{path} differs from the page"


def test_the_plugin_built_from_the_page_installs_and_passes_its_tests(tmp_path):
    source, site = tmp_path / "ckpt-example-ema", tmp_path / "site"
    for path, text in files_of(PAGE).items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text(text)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), str(source)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("CKPT_DISABLE_PLUGIN_AUTOLOAD", None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ema.py"],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout
