"""Preempt ``ckpt train`` with real SIGTERMs on one and two ranks.

One SIGTERM (sync and async saves): every rank finishes its step, saves it, and the
run exits 75; the same command resumes at the next step and logs bitwise the losses of
an uninterrupted run (no step lost, none trained twice). A second SIGTERM during that
save: the run exits 143 at once, the last committed step verifies, and the same command
still resumes exactly. The step at which the signal is sent is random; the seed is printed.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import _train as t

PREEMPTED, ABORTED = 75, 128 + signal.SIGTERM


def _rng() -> random.Random:
    return t.seeded_rng("preemption test")


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the signal")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to signal the run")
        time.sleep(0.002)


def _logged_step(folder: Path, step: int):
    return lambda: max(t.losses(folder), default=0) >= step


def _preempt(cmd: list[str], folder: Path, at_step: int, env: dict | None = None) -> int:
    """Start ``cmd``, SIGTERM it once step ``at_step`` is logged; the exit status."""
    proc = _start(cmd, folder, env)
    _wait_for(proc, _logged_step(folder, at_step))
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120)


def _start(cmd: list[str], folder: Path, env: dict | None = None) -> subprocess.Popen:
    err = open(folder / "stderr.txt", "w")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        cmd, cwd=folder, env={**t.env(), **(env or {})}, stdout=subprocess.DEVNULL, stderr=err
    )


def _stderr(folder: Path) -> str:
    return (folder / "stderr.txt").read_text()


def _assert_preempted_at_a_saved_step(folder: Path, code: int, at_least: int) -> int:
    assert code == PREEMPTED, f"exit {code}\n{_stderr(folder)[-3000:]}"
    last = max(t.losses(folder))
    assert last >= at_least
    assert t.committed_steps(folder)[-1] == last  # the step it stopped after is saved
    assert t.damaged_steps(folder) == {}
    assert _stderr(folder).count(f"preempted (SIGTERM): step {last} saved") == 1
    return last


def _assert_resumes_exactly(cmd, folder: Path, ref: dict[int, float], after: int, steps: int):
    before = len(t.records(folder))
    t.run_ok(cmd, folder)
    resumed = t.records(folder)[before:]
    assert [r["step"] for r in resumed] == list(range(after + 1, steps + 1))
    mismatched = {
        r["step"]: (r["loss"], ref[r["step"]])
        for r in t.records(folder)
        if r["loss"] != ref[r["step"]]
    }
    assert mismatched == {}
    assert t.committed_steps(folder)[-1] == steps


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_sigterm_saves_the_step_exits_75_and_the_run_resumes_bitwise(mode, reference, tmp_path):
    at = _rng().randint(4, 11)
    ref = reference("none")
    cmd = t.command(tmp_path, "--checkpoint.async_mode", mode)
    last = _assert_preempted_at_a_saved_step(tmp_path, _preempt(cmd, tmp_path, at), at)
    _assert_resumes_exactly(cmd, tmp_path, ref, last, t.STEPS)


def test_sigterm_to_the_nproc_launcher_saves_on_both_ranks_and_resumes_bitwise(tmp_path):
    at, steps = _rng().randint(3, 6), 12
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "preempted"
    ref_dir.mkdir()
    run_dir.mkdir()
    reference = _start(t.command(ref_dir, steps=steps, nproc=2), ref_dir)
    cmd = t.command(run_dir, steps=steps, nproc=2)
    code = _preempt(cmd, run_dir, at)
    assert reference.wait(timeout=300) == 0, _stderr(ref_dir)[-3000:]
    ref = t.losses(ref_dir)
    last = _assert_preempted_at_a_saved_step(run_dir, code, at)
    assert last < steps
    _assert_resumes_exactly(cmd, run_dir, ref, last, steps)


def test_a_second_sigterm_during_the_save_exits_at_once_and_keeps_the_last_step(
    reference, tmp_path
):
    rng = _rng()
    ref = reference("none")
    # No interval saves: the only saves before the end are the preemption saves.
    cmd = t.command(tmp_path, "--checkpoint.interval", "1000")
    first = _assert_preempted_at_a_saved_step(
        tmp_path, _preempt(cmd, tmp_path, rng.randint(3, 6)), 3
    )

    # Again, with every save held 5 s between its data and its commit.
    proc = _start(cmd, tmp_path, {"CKPT_TEST_SAVE_DELAY_S": "5"})
    _wait_for(proc, _logged_step(tmp_path, first + rng.randint(2, 5)))
    proc.send_signal(signal.SIGTERM)
    ckpt = tmp_path / "checkpoints"
    _wait_for(proc, lambda: any(p.name.startswith(".tmp-step-") for p in ckpt.iterdir()))
    time.sleep(0.4)  # past the window in which a repeat is the same notice
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == ABORTED, f"exit {code}\n{_stderr(tmp_path)[-3000:]}"
    assert time.monotonic() - sent < 3  # did not finish the 5 s save
    assert "second SIGTERM: exiting now with 143" in _stderr(tmp_path)
    assert t.committed_steps(tmp_path) == [first]
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(".tmp-step-")]
    verify = subprocess.run(
        [sys.executable, "-m", "ckpt_core.cli.main", "verify", str(ckpt)],
        env=t.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"step-{first}" in verify.stdout

    _assert_resumes_exactly(cmd, tmp_path, ref, first, t.STEPS)
