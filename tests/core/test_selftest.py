"""``ckpt selftest``: the fault matrix passes on a local folder and reports damage as FAIL."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT

CASES = (
    "sync save + resume",
    "async save + resume",
    "partial .tmp-step-N never loaded",
    "kill -9 inside a save",
    "second writer refused",
)


def _selftest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckpt_core.cli.main", "selftest", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=dict(os.environ, COLUMNS="250"),
        timeout=300,
    )


def _row(out: str, case: str) -> str:
    return next(line for line in out.splitlines() if case in line)


def test_selftest_on_a_local_folder_holds_every_case_and_leaves_nothing(tmp_path):
    done = _selftest(str(tmp_path), "--quick")
    assert done.returncode == 0, done.stdout + done.stderr
    for case in CASES:
        assert "PASS" in _row(done.stdout, case) or "SKIP" in _row(done.stdout, case), case
    assert "FAIL" not in done.stdout
    seed = re.search(r"replay with --seed (\d+)", done.stdout)
    assert seed and f"seed {seed.group(1)}" in _row(done.stdout, "kill -9")
    assert "bit-exact" in _row(done.stdout, "kill -9 inside a save")
    assert os.listdir(tmp_path) == []  # removed at the end (no --keep)


def test_a_byte_flipped_after_commit_is_reported_as_fail_with_exit_1():
    # memory:// runs every task in one process: the quickest store to show a FAIL on.
    done = _selftest("memory://selftest-inject", "--quick", "--inject", "corrupt")
    assert done.returncode == 1, done.stdout + done.stderr
    row = _row(done.stdout, "sync save + resume")
    assert "FAIL" in row and "differs from the state saved there" in row
    assert "flipped a byte of step-4/" in row
    assert "PASS" in _row(done.stdout, "async save + resume")
    assert "SKIP" in _row(done.stdout, "kill -9 inside a save")
    assert "1 of 5 cases FAILED" in done.stdout


def test_a_missing_local_path_is_one_line_and_exit_2(tmp_path):
    done = _selftest(str(tmp_path / "nope"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr and len(done.stderr.strip().splitlines()) == 1
