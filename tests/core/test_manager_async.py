"""Async saves: staged weights, one save at a time, errors surface, pinned-memory fallback."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from ckpt_core.policy.manager import dcp as manager_dcp
from ckpt_core.storage import async_writer as async_save
from ckpt_core.storage import layout
from ckpt_core.storage.async_writer import BufferStager
from tests.core._manager_models import Trainable, assert_same, snapshot


@pytest.fixture
def held_writes(monkeypatch):
    """Background DCP writes wait until the test releases them (the bytes are real)."""
    gate = threading.Event()
    real_save = manager_dcp.save

    def gated_save(*args, **kwargs):
        assert gate.wait(30), "test never released the background write"
        return real_save(*args, **kwargs)

    monkeypatch.setattr(manager_dcp, "save", gated_save)
    return gate


def test_an_async_save_holds_exactly_the_weights_of_its_step_while_training_continues(
    tmp_path, held_writes
):
    run = Trainable(folder=str(tmp_path), interval=2, async_mode="async", dim=64)
    expected = {}
    for step in range(1, 6):
        run.step()
        if run.manager.save(step):
            expected[step] = snapshot(run.model)
            assert run.manager._async.in_flight  # the write has not started yet
        if step == 3:
            held_writes.set()  # step 2 is written while step 3's weights are live
    run.manager.close()
    assert layout.committed_steps(str(tmp_path)) == [2, 4]
    for step, weights in expected.items():
        loaded = Trainable(seed=7, folder=str(tmp_path), dim=64)
        loaded.manager.load(step)
        assert_same(snapshot(loaded.model), weights)  # step 4 is not step 2's staged copy


def test_each_async_save_waits_for_the_previous_one(tmp_path, held_writes):
    run = Trainable(folder=str(tmp_path), interval=1, async_mode="async")
    run.manager.save(1)
    assert layout.committed_steps(str(tmp_path)) == []
    threading.Timer(0.2, held_writes.set).start()
    run.manager.save(2)  # blocks until step 1 is committed
    assert layout.committed_steps(str(tmp_path)) == [1]
    run.manager.close()
    assert layout.committed_steps(str(tmp_path)) == [1, 2]


def test_the_last_step_is_saved_synchronously(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=10, async_mode="async")
    assert run.manager.save(3, last_step=True)
    assert layout.committed_steps(str(tmp_path)) == [3]
    assert not run.manager._async.in_flight
    run.manager.close()


def test_close_reraises_a_background_error(tmp_path, monkeypatch):
    run = Trainable(folder=str(tmp_path), interval=1, async_mode="async")

    def failing_commit(tmp, final, fsync=True):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(layout, "commit", failing_commit)
    run.manager.save(1)
    with pytest.raises(OSError, match="disk full"):
        run.manager.close()
    assert layout.committed_steps(str(tmp_path)) == []


def test_pinned_memory_mode_without_cuda_says_so_once_and_saves(tmp_path, caplog, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: pinned staging really runs")
    monkeypatch.setattr(async_save, "_warned_no_cuda", False)
    with caplog.at_level(logging.WARNING, logger="ckpt_core.storage.async_writer"):
        a = Trainable(folder=str(tmp_path / "a"), interval=1, async_mode="async_with_pinned_mem")
        b = Trainable(folder=str(tmp_path / "b"), interval=1, async_mode="async_with_pinned_mem")
    assert sum("needs CUDA" in r.getMessage() for r in caplog.records) == 1
    a.manager.save(1)
    a.manager.close()
    b.manager.close()
    assert layout.committed_steps(str(tmp_path / "a")) == [1]


def test_the_stager_reuses_its_buffers_and_copies_current_values():
    stager = BufferStager()
    weight = torch.zeros(4, 4)
    first = stager.stage({"model": {"w": weight}, "step": 1})
    weight.add_(1.0)
    second = stager.stage({"model": {"w": weight}, "step": 2})
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()
    assert torch.equal(second["model"]["w"], torch.ones(4, 4))
    assert second["model"]["w"].data_ptr() != weight.data_ptr()
    assert second["step"] == 2


def test_staging_walks_on_the_caller_and_copies_later():
    stager = BufferStager()
    weight = torch.zeros(8)
    stager.stage({"w": weight})
    weight.fill_(5.0)
    staged, copies = stager.prepare({"w": weight})
    assert torch.equal(staged["w"], torch.zeros(8))  # nothing copied yet
    stager.copy(copies)
    assert torch.equal(staged["w"], torch.full((8,), 5.0))


def test_buffers_a_forward_pass_updates_are_staged_before_save_returns(tmp_path, monkeypatch):
    run = Trainable(folder=str(tmp_path), interval=1, async_mode="async")
    stager = run.manager._async.stager
    gate = threading.Event()
    real_copy = stager.copy
    deferred = []

    def held_copy(copies):
        deferred.extend(copies)
        assert gate.wait(30)
        real_copy(copies)

    monkeypatch.setattr(stager, "copy", held_copy)
    expected = snapshot(run.model)
    run.manager.save(1)
    run.model.scale.add_(1.0)  # e.g. running statistics updated by the next forward
    gate.set()
    run.manager.maybe_wait_for_staging()
    run.manager.close()
    # Deferred: 3 parameters and their AdamW state (step, exp_avg, exp_avg_sq); not the buffer.
    assert len(deferred) == 3 + 3 * 3
    assert all(src.data_ptr() != run.model.scale.data_ptr() for _, src in deferred)
    loaded = Trainable(seed=3, folder=str(tmp_path))
    loaded.manager.load()
    assert_same(snapshot(loaded.model), expected)


def test_tensors_a_state_dict_hook_builds_fresh_are_never_saved_stale(tmp_path):
    """The torchtitan trap: staging keyed by storage kept a hook tensor's first value."""
    import torch.distributed.checkpoint as dcp

    from ckpt_core.storage.dcp_io import storage_reader

    run = Trainable(folder=str(tmp_path), interval=1, async_mode="async")

    def add_derived(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "derived"] = module.inp.weight.detach() * 2  # fresh every call

    run.model._register_state_dict_hook(add_derived)
    expected = {}
    for step in (1, 2, 3):
        run.step()
        expected[step] = run.model.inp.weight.detach() * 2
        run.manager.save(step)
    run.manager.close()
    for step, want in expected.items():
        got = {"model": {"derived": torch.empty_like(want)}}
        dcp.load(got, storage_reader=storage_reader(str(tmp_path / f"step-{step}")))
        assert torch.equal(got["model"]["derived"], want), step


def test_close_twice_is_harmless_and_a_save_after_close_is_a_clear_error(tmp_path):
    from ckpt_core import CheckpointError

    run = Trainable(folder=str(tmp_path), interval=1, async_mode="async")
    run.manager.save(1)
    run.manager.close()
    run.manager.close()
    with pytest.raises(CheckpointError, match="save of step 2 after close"):
        run.manager.save(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # no temporary left
