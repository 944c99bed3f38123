"""Two ranks (FSDP2 over gloo, launched by ``--nproc 2``) then one rank, same stream."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from ckpt_core.storage import layout
from tests.e2e import _train as t


def test_a_run_saved_on_two_ranks_resumes_on_one_rank_at_the_next_step(reference, tmp_path):
    ref = reference("none")
    t.run_ok(t.command(tmp_path, steps=6, nproc=2), tmp_path)
    two = t.records(tmp_path)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    step6 = layout.step_dir(str(tmp_path / "checkpoints"), 6)
    assert json.load(open(f"{step6}/manifest.json"))["world_size"] == 2
    # Same global batches and global mean loss: two ranks track the one-rank run closely.
    for r in two:
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-4)

    proc = t.run_ok(t.command(tmp_path, steps=12), tmp_path)
    assert "step-6" in proc.stderr  # the resume names the step it continued from
    one = t.records(tmp_path)[len(two) :]
    assert [r["step"] for r in one] == [7, 8, 9, 10, 11, 12]
    assert one[0]["tokens"] == 7 * 4 * 32
    for r in one:
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-3)


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_nproc_launcher_kills_its_ranks_and_the_same_command_resumes(tmp_path):
    cmd = t.command(tmp_path, steps=15, nproc=2)
    proc = t.start(cmd, tmp_path)
    ranks: list[int] = []

    def ready() -> bool:
        if not (t.committed_steps(tmp_path) and max(t.losses(tmp_path), default=0) >= 4):
            return False
        ranks[:] = children(proc.pid)
        return True

    t.kill_when(proc, ready)
    assert len(ranks) == 2
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in ranks), "ranks outlived their killed launcher"
    before = t.records(tmp_path)
    committed = t.committed_steps(tmp_path)
    assert max(r["step"] for r in before) < 15 and max(committed) < 15  # they did not finish
    assert t.damaged_steps(tmp_path) == {}

    t.run_ok(cmd, tmp_path)
    resumed = t.records(tmp_path)[len(before) :]
    assert [r["step"] for r in resumed] == list(range(max(committed) + 1, 16))
    # Steps the killed run logged after its last commit are redone with the same loss, bitwise.
    first = {r["step"]: r["loss"] for r in before}
    assert [r["loss"] for r in resumed if r["step"] in first] == [
        first[r["step"]] for r in resumed if r["step"] in first
    ]
