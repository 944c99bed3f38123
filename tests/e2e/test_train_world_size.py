"""Two ranks (FSDP2 over gloo, launched by ``--nproc 2``) then one rank, same stream."""

from __future__ import annotations

import json

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
