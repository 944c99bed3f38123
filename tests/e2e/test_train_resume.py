"""Kill ``ckpt train`` with SIGKILL, start it again, and get bit-identical losses.

For every converter set and async mode: an uninterrupted reference run (shared
per converter set), then a run killed after a checkpoint was committed while it
keeps training, restarted with the same command. Every step either run logged
must carry exactly the reference's loss, and the restart must continue from the
newest committed step.
"""

from __future__ import annotations

import shutil

import pytest

from tests.e2e import _train as t

CASES = [
    (name, mode, kill_at)
    for i, name in enumerate(t.CONVERTER_SETS)
    for mode, kill_at in [("disabled", 5 + 2 * i), ("async", 6 + 2 * i)]
]


@pytest.mark.slow
@pytest.mark.parametrize(("converters", "async_mode", "kill_at"), CASES)
def test_a_run_killed_mid_training_resumes_with_bit_identical_losses(
    converters, async_mode, kill_at, reference, tmp_path
):
    ref = reference(converters)
    cmd = t.command(
        tmp_path,
        *t.converter_args(t.CONVERTER_SETS[converters]),
        "--checkpoint.async_mode",
        async_mode,
    )
    proc = t.start(cmd, tmp_path)
    t.kill_when(
        proc,
        lambda: t.committed_steps(tmp_path) and max(t.losses(tmp_path), default=0) >= kill_at,
    )
    before = len(t.records(tmp_path))
    committed = t.committed_steps(tmp_path)
    assert committed and max(committed) < t.STEPS
    assert t.damaged_steps(tmp_path) == {}

    t.run_ok(cmd, tmp_path)

    logged = t.records(tmp_path)
    assert [r["step"] for r in logged[before:]] == list(range(max(committed) + 1, t.STEPS + 1))
    mismatched = {
        r["step"]: (r["loss"], ref[r["step"]]) for r in logged if r["loss"] != ref[r["step"]]
    }
    assert mismatched == {}
    assert t.committed_steps(tmp_path)[-1] == t.STEPS


def test_a_run_killed_while_saving_leaves_only_complete_steps_and_resumes_exactly(
    reference, tmp_path
):
    ref = reference("none")
    cmd = t.command(tmp_path)
    proc = t.start(cmd, tmp_path)
    ckpt = tmp_path / "checkpoints"

    def saving_after_first_commit() -> bool:
        if not t.committed_steps(tmp_path):
            return False
        return any(p.name.startswith(".tmp-step-") for p in ckpt.iterdir())

    t.kill_when(proc, saving_after_first_commit)
    # Discovery sees only committed steps, and each of them is complete.
    assert t.damaged_steps(tmp_path) == {}
    t.run_ok(cmd, tmp_path)
    assert all(r["loss"] == ref[r["step"]] for r in t.records(tmp_path))
    assert t.committed_steps(tmp_path)[-1] == t.STEPS


def test_a_run_that_died_between_its_last_checkpoint_and_its_export_exports_on_restart(tmp_path):
    cmd = t.command(tmp_path, "--checkpoint.export.enable", "true", steps=3)
    t.run_ok(cmd, tmp_path)
    export = tmp_path / "export" / "step-3"
    assert (export / "model.safetensors").exists()
    # The state a kill after the final commit and before the export leaves behind.
    shutil.rmtree(export)
    before = t.records(tmp_path)
    proc = t.run_ok(cmd, tmp_path)
    assert "export is missing" in proc.stderr
    assert (export / "model.safetensors").exists() and (export / "config.json").exists()
    assert t.records(tmp_path) == before  # no step was trained again
