"""One writer per folder and pre-flight, with real ``ckpt train`` processes.

A second run on a folder in use exits 2 before step 1 naming the first (its
pid); a run killed with SIGKILL does not block its restart; two runs started
together leave one run's complete checkpoints; an unwritable export folder is
found before step 1, not at the final export; a disk filling up mid-run stops
the run with exit 1 and one line, the last committed step intact.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.e2e import _train as t
from tests.e2e.test_train_bad_input import assert_one_clear_error

#: Long enough to be still training while a second run starts (killed before the end).
LONG = 2000


def test_a_second_run_exits_2_before_step_1_and_a_killed_holder_does_not_block_a_restart(
    tmp_path,
):
    job = tmp_path / "job"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = t.start(t.command(job, "--checkpoint.async_mode", "async", steps=LONG), tmp_path / "a")
    try:
        deadline = time.monotonic() + 240
        while not (t.committed_steps(job) and t.losses(job)):
            assert first.poll() is None, (tmp_path / "a" / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run did not commit a step"
            time.sleep(0.05)
        logged = len(t.records(job))

        second = t.run(t.command(job, steps=LONG), tmp_path / "b")
        assert second.returncode == 2, second.stderr[-3000:]
        message = assert_one_clear_error(second, f"pid {first.pid} on ", "is in use by another run")
        assert "checkpoint.folder" in message or "metrics.path" in message
        # Refused before it loaded anything (the loader and the trainer log nothing) ...
        assert "ckpt_core.policy.load_policy" not in second.stderr
        assert "parameters" not in second.stderr
        # ... so the metrics hold the first run's lines only, each step once.
        # The same on two ranks: both refuse together and the launcher exits 2.
        both = t.run(t.command(job, steps=LONG, nproc=2), tmp_path / "b")
        assert both.returncode == 2, both.stderr[-3000:]
        assert_one_clear_error(both, f"pid {first.pid} on ")
        assert first.poll() is None
        steps = [r["step"] for r in t.records(job)]
        assert len(steps) >= logged and steps == list(range(1, len(steps) + 1))
    finally:
        t.kill_when(first, lambda: True)

    resumed_from = max(t.committed_steps(job))
    third = t.run_ok(t.command(job, steps=resumed_from + 3), tmp_path / "b")
    assert "is in use" not in third.stderr
    assert max(t.committed_steps(job)) == resumed_from + 3
    assert t.damaged_steps(job) == {}


def test_two_runs_started_together_one_trains_and_the_other_exits_2(tmp_path):
    job = tmp_path / "job"
    procs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cmd = t.command(job, "--checkpoint.async_mode", "async", steps=LONG)
        procs[name] = t.start(cmd, tmp_path / name)
    deadline = time.monotonic() + 240
    try:
        while all(p.poll() is None for p in procs.values()):
            assert time.monotonic() < deadline, "neither run stopped"
            time.sleep(0.05)
        loser = next(name for name, p in procs.items() if p.poll() is not None)
        winner = procs["b" if loser == "a" else "a"]
        stderr = (tmp_path / loser / "stderr.txt").read_text()
        assert procs[loser].returncode == 2, stderr[-3000:]
        assert f"pid {winner.pid} on " in stderr and "Traceback" not in stderr
        t.kill_when(winner, lambda: len(t.committed_steps(job)) >= 1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert t.damaged_steps(job) == {}
    steps = [r["step"] for r in t.records(job)]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, none twice


def test_an_unwritable_export_folder_exits_2_before_step_1(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "not-a-folder").write_text("a file where the export folder would go")
    cmd = t.command(
        job, "--checkpoint.export.enable", "true", "--checkpoint.export.folder", "not-a-folder/x"
    )
    proc = t.run(cmd, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_clear_error(proc, "checkpoint.export.folder", "Not a directory")
    assert t.records(job) == []  # no step trained
    assert t.committed_steps(job) == []


def test_a_disk_filling_up_mid_run_exits_1_with_one_line_and_the_last_step_intact(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # One tiny-flavor checkpoint (weights + AdamW) is ~4.3 MB: the second one does not fit.
    mount = ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(ckpt)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        job = tmp_path / "job"
        proc = t.run(t.command(job, "--checkpoint.folder", str(ckpt)), tmp_path)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert_one_clear_error(proc, "saving step 6", "No space left on device (ENOSPC)")
        assert "(step 3) is intact" in proc.stderr
        assert t.losses(job) and max(t.losses(job)) == 6  # stopped at the failed save
        assert sorted(p.name for p in ckpt.iterdir()) == ["step-3"]  # temp removed, lock freed
    finally:
        subprocess.run(["umount", "-l", str(ckpt)], capture_output=True)
