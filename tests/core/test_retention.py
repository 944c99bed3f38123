"""Retention: keep the last k, every N-th step, configured and pinned steps, never a step
that is read; delete a superseded step only after the new one is committed."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from ckpt_core import CheckpointError
from ckpt_core.cli.main import main
from ckpt_core.storage import layout, pins, purge
from tests.core._manager_models import Trainable

# committed, intact, k, every_n, kept by name -> deleted
CASES = {
    "k=0 keeps everything": ([1, 2, 3, 4], [1, 2, 3, 4], 0, 0, [], []),
    "k=2 keeps the newest two": ([1, 2, 3, 4], [1, 2, 3, 4], 2, 0, [], [1, 2]),
    "k larger than the steps": ([1, 2], [1, 2], 5, 0, [], []),
    "nothing committed": ([], [], 2, 0, [], []),
    "every 4th kept forever": ([2, 4, 6, 8, 10, 12], [2, 4, 6, 8, 10, 12], 2, 4, [], [2, 6]),
    "every N with no multiple": ([1, 3, 5, 7], [1, 3, 5, 7], 2, 10, [], [1, 3]),
    "named steps kept": ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 2, 0, [2], [1, 3]),
    "named step not committed is harmless": ([1, 2, 3], [1, 2, 3], 2, 0, [9], [1]),
    "pins, every N and k together": (
        list(range(1, 11)),
        list(range(1, 11)),
        2,
        3,
        [1, 5],
        [2, 4, 7, 8],
    ),
    # Damaged steps never count toward k, and the newest two *intact* ones are kept.
    "damaged newest does not count toward k": ([1, 2, 3, 4], [1, 2, 3], 2, 0, [], [1]),
    "damaged newer than the cutoff is left for a human": (
        [1, 2, 3, 4, 5],
        [1, 2, 5],
        2,
        0,
        [],
        [1],
    ),
    "fewer intact steps than k deletes nothing": ([1, 2, 3], [3], 2, 0, [], []),
    "the newest committed step is kept even when damaged": ([4, 8], [4], 1, 0, [], []),
    "unsorted input": ([4, 1, 3, 2], [3, 1, 4, 2], 2, 0, [], [1, 2]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_select_deletions(case):
    committed, intact, k, every, keep, want = CASES[case]
    got = purge.select_deletions(committed, intact, k, keep_every_n_steps=every, keep=keep)
    assert got == want


def _saves(folder: str, steps, **config) -> Trainable:
    """A real manager saving ``steps``; each purge finishes before the next save."""
    run = Trainable(folder=folder, interval=1, **config)
    for step in steps:
        run.step()
        run.manager.save(step)
        run.manager._purger.join()
    return run


def test_a_manager_keeps_the_last_k_every_nth_configured_and_pinned_steps(tmp_path):
    folder = str(tmp_path)
    run = _saves(folder, range(1, 6), keep_latest_k=2, keep_every_n_steps=4, keep_steps=[1])
    assert layout.committed_steps(folder) == [1, 4, 5]
    pins.set_pin(folder, 5, True, note="before the lr change")
    for step in range(6, 12):
        run.step()
        run.manager.save(step)
        run.manager._purger.join()
    run.manager.close()
    # 10, 11: the newest two; 4, 8: every 4th; 1: keep_steps; 5: pinned.
    assert layout.committed_steps(folder) == [1, 4, 5, 8, 10, 11]
    assert pins.read_pins(folder)[5]["note"] == "before the lr change"
    leftovers = [n for n in os.listdir(folder) if n.startswith((".tmp", ".deleting"))]
    assert leftovers == []

    pins.set_pin(folder, 5, False)
    purge.purge(folder, 2, keep_every_n_steps=4, keep_steps=[1])
    assert layout.committed_steps(folder) == [1, 4, 8, 10, 11]


def test_a_step_being_read_is_kept_and_deleted_by_the_next_purge_after_the_read(tmp_path):
    folder = str(tmp_path)
    _saves(folder, range(1, 4)).manager.close()
    with pins.reading_step(folder, 1):
        assert purge.purge(folder, 2) == []
        assert layout.committed_steps(folder) == [1, 2, 3]
    assert purge.purge(folder, 2) == [layout.step_dir(folder, 1)]
    assert layout.committed_steps(folder) == [2, 3]


def test_a_resume_holds_its_step_against_purge_while_it_reads(tmp_path, monkeypatch):
    folder = str(tmp_path)
    _saves(folder, range(1, 4)).manager.close()
    reader = Trainable(folder=folder, load_step=1)
    from ckpt_core.policy import load_policy as loading

    real_resume = loading._resume
    results = []

    def resume_and_purge_meanwhile(manager, step, explicit=False):
        real_resume(manager, step, explicit)
        # Still inside the resume's reader lock: a purge (as another job would run) skips it.
        results.append(purge.purge(folder, 2))

    monkeypatch.setattr(loading, "_resume", resume_and_purge_meanwhile)
    reader.manager.load()
    assert results == [[]] and layout.committed_steps(folder) == [1, 2, 3]
    assert purge.purge(folder, 2) == [layout.step_dir(folder, 1)]


def test_old_steps_are_deleted_only_after_the_new_step_is_committed(tmp_path, monkeypatch):
    folder = str(tmp_path)
    run = _saves(folder, range(1, 4), keep_latest_k=2)
    assert layout.committed_steps(folder) == [2, 3]
    monkeypatch.setenv("CKPT_TEST_SAVE_DELAY_S", "1.0")  # held between its data and commit
    run.step()
    saver = threading.Thread(target=run.manager.save, args=(4,))
    saver.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(layout.tmp_step_dir(folder, 4)) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.3)
    assert layout.committed_steps(folder) == [2, 3]  # step 4 written, not committed: 2 stays
    saver.join()
    run.manager._purger.join()
    run.manager.close()
    assert layout.committed_steps(folder) == [3, 4]


def test_a_malformed_pins_file_stops_purge_instead_of_guessing(tmp_path, caplog):
    folder = str(tmp_path)
    _saves(folder, range(1, 4)).manager.close()
    (tmp_path / "pins.json").write_text('{"pinned": [1, 2]')
    assert purge.purge(folder, 2) == []
    assert layout.committed_steps(folder) == [1, 2, 3]
    assert "pins.json is not a pins file" in caplog.text


def test_a_half_deleted_step_never_looks_committed(tmp_path):
    folder = str(tmp_path)
    _saves(folder, range(1, 4)).manager.close()
    # What a kill during an rmtree of step-1 leaves: the renamed folder, partly emptied.
    os.rename(tmp_path / "step-1", tmp_path / ".deleting-step-1")
    os.remove(next((tmp_path / ".deleting-step-1").glob("*.distcp")))
    assert layout.committed_steps(folder) == [2, 3]
    assert purge.purge(folder, 0) == [str(tmp_path / ".deleting-step-1")]


def test_pin_unpin_and_list_on_the_command_line(tmp_path, capsys):
    folder = str(tmp_path)
    _saves(folder, range(1, 4)).manager.close()
    assert main(["pin", folder, "2", "--note", "best eval"]) == 0
    assert main(["pin", folder]) == 0
    assert "step-2  best eval" in capsys.readouterr().out
    assert json.loads((tmp_path / "pins.json").read_text())["pinned"]["2"]["note"] == "best eval"
    assert main(["inspect", folder, "--json"]) == 0
    rows = {r["step"]: r["status"] for r in json.loads(capsys.readouterr().out)["steps"]}
    assert rows[2] == "ok, pinned" and rows[3] == "ok"
    assert purge.purge(folder, 2) == [layout.step_dir(folder, 1)]  # 2 pinned, 3 newest
    assert main(["unpin", folder, "2"]) == 0
    assert pins.read_pins(folder) == {}
    assert main(["pin", folder, "7"]) == 2  # not committed: one line, exit 2
    assert "no committed step 7" in capsys.readouterr().err


def test_pinning_a_missing_folder_creates_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        pins.set_pin(str(tmp_path / "nope"), 1, True)
    assert not (tmp_path / "nope").exists()


def test_a_malformed_manifest_is_never_counted_intact_and_purge_does_not_raise(tmp_path):
    from ckpt_core.storage import purge as purge_mod

    folder = tmp_path / "ckpt"
    for step in (1, 2, 3):
        (folder / f"step-{step}").mkdir(parents=True)
        (folder / f"step-{step}" / "manifest.json").write_text(
            json.dumps({"format": "ckpt", "kind": "checkpoint", "step": step, "files": {}})
        )
    (folder / "step-2" / "manifest.json").write_text('{"files": "not a table"}')
    intact = purge_mod.intact_steps(str(folder))
    assert 2 not in intact
    purge_mod.purge(str(folder), keep_latest_k=2)
    assert (folder / "step-2").exists()  # damaged steps are left for a human
