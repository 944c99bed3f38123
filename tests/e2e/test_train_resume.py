"""Kill ``ckpt train`` with SIGKILL, start it again, and get bit-identical losses.

For every converter set: an uninterrupted reference run (shared per converter set)
and, at the same time, one run per async mode killed at a random moment after its
first commit (a random step, then a random delay: mid-step, mid-save or mid-commit),
each restarted with the same command. The kill points' seed is printed with a failure;
``CKPT_TEST_SEED=<seed>`` replays them. Every step any run logged must carry exactly
the reference's loss, and each restart must continue from the newest committed step.
"""

from __future__ import annotations

import shutil

import pytest

from tests.e2e import _train as t

MODES = ["disabled", "async"]


def killable(folder, kill_at: int):
    """Ready once a step is committed and step ``kill_at`` was logged."""
    return lambda: t.committed_steps(folder) and max(t.losses(folder), default=0) >= kill_at


@pytest.mark.slow
@pytest.mark.parametrize("converters", list(t.CONVERTER_SETS))
def test_runs_killed_at_random_moments_resume_with_bit_identical_losses(
    converters, reference, tmp_path
):
    names = t.CONVERTER_SETS[converters]
    reason = t.plugin_missing(names)
    if reason:
        pytest.skip(reason)
    rng = t.seeded_rng(f"kill points ({converters})")
    runs, joins = {}, []
    for mode in MODES:
        folder = tmp_path / mode
        folder.mkdir()
        cmd = t.command(folder, *t.converter_args(names), "--checkpoint.async_mode", mode)
        kill_at, delay = rng.randint(4, 11), rng.uniform(0.0, 0.03)
        joins.append(t.kill_in_background(t.start(cmd, folder), killable(folder, kill_at), delay))
        runs[mode] = (
            folder,
            cmd,
            f"{converters}/{mode}: killed after step {kill_at} + {delay:.3f}s",
        )
    ref = reference(converters)  # the uninterrupted run, while the two others run and die
    for join in joins:
        join()

    before, committed = {}, {}
    for mode, (folder, _, what) in runs.items():
        before[mode] = len(t.records(folder))
        committed[mode] = t.committed_steps(folder)
        assert committed[mode] and max(committed[mode]) < t.STEPS, what
        assert t.damaged_steps(folder) == {}, what

    restarts = {mode: t.start(cmd, folder) for mode, (folder, cmd, _) in runs.items()}
    for mode, proc in restarts.items():
        folder, _, what = runs[mode]
        code = proc.wait(timeout=300)
        assert code == 0, (
            f"{what}: restart exit {code}\n{(folder / 'stderr.txt').read_text()[-4000:]}"
        )

    for mode, (folder, _, what) in runs.items():
        logged = t.records(folder)
        resumed = [r["step"] for r in logged[before[mode] :]]
        assert resumed == list(range(max(committed[mode]) + 1, t.STEPS + 1)), what
        mismatched = {
            r["step"]: (r["loss"], ref[r["step"]]) for r in logged if r["loss"] != ref[r["step"]]
        }
        assert mismatched == {}, what
        assert t.committed_steps(folder)[-1] == t.STEPS, what


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
