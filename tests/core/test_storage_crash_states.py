"""Storage: crash leftovers, damaged steps, purge safety, tampered metadata, fsspec URIs."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

from ckpt_core import CheckpointError
from ckpt_core.storage import layout, manifest, purge
from ckpt_core.storage.safe_metadata import UnsafeMetadataError, loads_metadata, read_metadata
from tests.core._manager_models import Trainable, assert_same, snapshot


def _fabricate_crash_states(folder) -> dict[int, dict]:
    """Steps 1, 2 good; step-3 without manifest; .tmp-step-4; step-5 truncated."""
    run = Trainable(folder=str(folder), interval=1)
    weights = {}
    for step in (1, 2):
        run.step()
        run.manager.save(step)
        weights[step] = snapshot(run.model)
    shutil.copytree(folder / "step-2", folder / "step-3")
    os.remove(folder / "step-3" / "manifest.json")
    shutil.copytree(folder / "step-2", folder / ".tmp-step-4")
    os.remove(folder / ".tmp-step-4" / ".metadata")
    shutil.copytree(folder / "step-2", folder / "step-5")
    man = json.loads((folder / "step-5" / "manifest.json").read_text())
    man["step"] = 5
    (folder / "step-5" / "manifest.json").write_text(json.dumps(man))
    data = folder / "step-5" / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    return weights


def _save_one_step_then_die_saving_the_next(folder: str, where: str) -> None:
    """Child process: commit step 1, then get killed (``os._exit``) while saving step 2."""
    import torch

    from ckpt_core.storage import dcp_io

    torch.set_num_threads(1)
    run = Trainable(folder=folder, interval=1)
    run.step()
    run.manager.save(1)
    run.step()
    if where == "while writing data":
        real_write = dcp_io._ChecksumStream.write

        def write_half_then_die(self, data):
            view = memoryview(data).cast("B")
            real_write(self, view[: view.nbytes // 2])
            os._exit(17)

        dcp_io._ChecksumStream.write = write_half_then_die
    else:  # everything written, manifest included; killed just before the rename
        layout.commit = lambda *args, **kwargs: os._exit(17)
    run.manager.save(2)
    os._exit(0)


@pytest.mark.parametrize("where", ["while writing data", "before the commit rename"])
def test_a_save_killed_midway_never_becomes_a_step_discovery_loads(tmp_path, where):
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(
        target=_save_one_step_then_die_saving_the_next, args=(str(tmp_path), where)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 17
    assert layout.committed_steps(str(tmp_path)) == [1]
    assert (tmp_path / ".tmp-step-2").is_dir()

    reference = Trainable(folder=str(tmp_path / "unused"))
    reference.step()  # the same seed and batch as the child's step 1
    resumed = Trainable(seed=3, folder=str(tmp_path), interval=1)
    assert resumed.manager.load() is True
    assert resumed.manager.train_state.step == 1
    assert_same(snapshot(resumed.model), snapshot(reference.model))
    # Saving step 2 again replaces the leftover; everything committed verifies.
    resumed.step()
    assert resumed.manager.save(2) is True
    resumed.manager.close()
    assert sorted(os.listdir(tmp_path)) == ["step-1", "step-2"]
    assert manifest.verify(str(tmp_path / "step-2")) == []


def test_a_damaged_newest_step_is_refused_naming_the_file_and_the_newest_intact_step(tmp_path):
    weights = _fabricate_crash_states(tmp_path)
    run = Trainable(seed=3, folder=str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        run.manager.load()
    message = str(info.value)
    assert "__0_0.distcp: truncated" in message
    assert "load_step = 2" in message  # step-3 has no manifest, so it is not "intact"
    assert f"ckpt verify {tmp_path / 'step-2'}" in message
    assert "\n" not in message  # one line
    fixed = Trainable(seed=3, folder=str(tmp_path), load_step=2)
    fixed.manager.load()
    assert_same(snapshot(fixed.model), weights[2])


def test_discovery_skips_uncommitted_and_manifestless_steps(tmp_path):
    _fabricate_crash_states(tmp_path)
    shutil.rmtree(tmp_path / "step-5")
    assert layout.committed_steps(str(tmp_path)) == [1, 2, 3]
    run = Trainable(seed=3, folder=str(tmp_path))
    run.manager.load()
    assert run.manager.train_state.step == 2  # not step-3 (no manifest), not .tmp-step-4


def test_purge_never_deletes_the_last_good_step_over_crash_leftovers(tmp_path):
    _fabricate_crash_states(tmp_path)
    deleted = purge.purge(str(tmp_path), keep_latest_k=2)
    assert deleted == [str(tmp_path / ".tmp-step-4")]
    assert layout.committed_steps(str(tmp_path)) == [1, 2, 3, 5]
    run = Trainable(folder=str(tmp_path), interval=1, keep_latest_k=2, load_step=2)
    run.manager.load()
    run.manager.save(6)
    run.manager.close()
    # Intact steps are 1, 2, 6: keep 2 and 6; the damaged newer ones are left for a human.
    assert layout.committed_steps(str(tmp_path)) == [2, 3, 5, 6]


def test_purge_survives_a_failed_delete_and_retries_later(tmp_path, monkeypatch):
    run = Trainable(folder=str(tmp_path), interval=1)
    for step in (1, 2, 3):
        run.manager.save(step)
    real_remove = layout.remove_tree

    def flaky_remove(path):
        if path.endswith("step-1"):
            raise PermissionError("read-only (simulated)")
        real_remove(path)

    monkeypatch.setattr(layout, "remove_tree", flaky_remove)
    run2 = Trainable(folder=str(tmp_path), interval=1, keep_latest_k=2)
    run2.manager.save(4)
    run2.manager.close()  # no error
    # The step was renamed away before its files went: no half-deleted step-1 remains.
    assert layout.committed_steps(str(tmp_path)) == [3, 4]
    assert (tmp_path / ".deleting-step-1").is_dir()
    monkeypatch.setattr(layout, "remove_tree", real_remove)
    assert purge.purge(str(tmp_path), keep_latest_k=2) == [str(tmp_path / ".deleting-step-1")]
    assert sorted(p.name for p in tmp_path.iterdir() if "step" in p.name) == ["step-3", "step-4"]


def test_stale_temporary_folders_go_but_one_in_flight_stays(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1)
    run.manager.save(5)
    run.manager.close()  # gives back the folder's lock file
    for step in (3, 4, 9):
        os.makedirs(tmp_path / f".tmp-step-{step}")
    purge.purge(str(tmp_path), keep_latest_k=0, in_flight=[4])
    assert sorted(os.listdir(tmp_path)) == [".tmp-step-4", ".tmp-step-9", "step-5"]


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_metadata_file_with_a_code_payload_is_refused_without_running_it(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1)
    run.manager.save(1)
    marker = tmp_path / "payload-ran"
    meta_path = tmp_path / "step-1" / ".metadata"
    meta_path.write_bytes(pickle.dumps(_Payload(str(marker))))
    # Keep the manifest consistent, so only the unpickler stands in the way.
    man = json.loads((tmp_path / "step-1" / "manifest.json").read_text())
    man["files"][".metadata"]["size"] = meta_path.stat().st_size
    (tmp_path / "step-1" / "manifest.json").write_text(json.dumps(man))

    with pytest.raises(UnsafeMetadataError, match="posix.system|os.system"):
        read_metadata(str(tmp_path / "step-1"))
    with pytest.raises(CheckpointError, match="not a DCP metadata type"):
        Trainable(folder=str(tmp_path)).manager.load()
    assert not marker.exists()
    # The genuine metadata of a fresh save still loads through the same reader.
    run.manager.save(2)
    assert "model.inp.weight" in read_metadata(str(tmp_path / "step-2")).state_dict_metadata


def _global_call(module: str, name: str) -> bytes:
    """A protocol-4 pickle that looks up ``module.name`` and calls it with ``("1",)``."""

    def short(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    return b"\x80\x04" + short(module) + short(name) + b"\x93" + short("1") + b"\x85R."


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("torch", "load"),
        ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
        ("os", "system"),
    ],
)
def test_the_restricted_unpickler_refuses_globals_outside_dcp_metadata(module, name):
    with pytest.raises(UnsafeMetadataError, match=f"references {module}.{name}"):
        loads_metadata(_global_call(module, name))


def test_checkpoints_round_trip_through_an_fsspec_memory_filesystem():
    folder = "memory://ckpt-tests/run"
    try:
        run = Trainable(folder=folder, interval=1, keep_latest_k=2)
        for step in (1, 2, 3):
            run.step()
            run.manager.save(step)
        run.manager.close()
        assert layout.committed_steps(folder) == [2, 3]
        assert manifest.verify(layout.step_dir(folder, 3)) == []
        loaded = Trainable(seed=5, folder=folder)
        assert loaded.manager.load()
        assert loaded.manager.train_state.step == 3
        assert_same(snapshot(loaded.model), snapshot(run.model))
    finally:
        layout.remove_tree("memory://ckpt-tests")


def test_an_fsspec_commit_cut_off_midway_is_passed_over_by_discovery(monkeypatch):
    """Object stores have no rename: data goes straight into step-<N>/, the manifest last.

    A save cut off before its manifest leaves objects that are not a committed step.
    """
    folder = "memory://ckpt-tests/cut"
    try:
        run = Trainable(folder=folder, interval=1)
        run.step()
        run.manager.save(1)
        weights = snapshot(run.model)

        def crash(folder, data):
            raise ConnectionError("connection lost (simulated)")

        monkeypatch.setattr(manifest, "write_bytes", crash)
        run.step()
        with pytest.raises(OSError, match="connection lost"):  # a SaveError, one line
            run.manager.save(2)
        monkeypatch.undo()
        assert layout.committed_steps(folder) == [1]  # step-2/ objects without a manifest
        resumed = Trainable(seed=3, folder=folder)
        assert resumed.manager.load()  # ... so step 1 is the resume point
        assert resumed.manager.train_state.step == 1
        assert_same(snapshot(resumed.model), weights)
    finally:
        layout.remove_tree("memory://ckpt-tests")


def test_checksums_computed_while_writing_match_a_fresh_read(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1, dim=256)
    run.manager.save(1)
    found = manifest.read(str(tmp_path / "step-1"))
    for name, entry in found["files"].items():
        assert manifest.file_checksum(str(tmp_path / "step-1" / name)) == entry["checksum"]


def test_a_step_without_manifest_loads_only_when_asked_for_by_number(tmp_path):
    weights = _fabricate_crash_states(tmp_path)
    shutil.rmtree(tmp_path / "step-5")
    explicit = Trainable(seed=3, folder=str(tmp_path), load_step=3)
    explicit.manager.load()  # step-3 is a manifest-less copy of step-2
    assert_same(snapshot(explicit.model), weights[2])
