"""CheckpointManager policy in one process: gating, resume, initial load, purge, exclusions."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from ckpt_core import CheckpointConfig, CheckpointError, ConfigError
from ckpt_core.policy.manager import CheckpointManager
from ckpt_core.storage import layout
from tests.core._manager_models import TinyNet, Trainable, assert_same, snapshot


def _steps(folder) -> list[int]:
    return layout.committed_steps(str(folder))


def test_save_then_load_restores_model_optimizer_scheduler_and_counters_exactly(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=3)
    for step in range(1, 4):
        run.step()
        run.manager.train_state.tokens_seen += 100
        run.manager.save(step)
    run.manager.close()
    saved_model, saved_optim = snapshot(run.model), run.optim.state_dict()

    other = Trainable(seed=1, folder=str(tmp_path), interval=3)
    assert other.manager.load() is True
    assert_same(snapshot(other.model), saved_model)
    loaded = other.optim.state_dict()
    for pid, st in saved_optim["state"].items():
        for name, value in st.items():
            assert torch.equal(loaded["state"][pid][name], value), (pid, name)
    assert loaded["param_groups"][0]["lr"] == saved_optim["param_groups"][0]["lr"]
    assert other.sched.state_dict() == run.sched.state_dict()
    assert (other.manager.train_state.step, other.manager.train_state.tokens_seen) == (3, 300)
    # Training on from both gives identical weights (nothing was left out).
    torch.manual_seed(5)
    run.step()
    torch.manual_seed(5)
    other.step()
    assert_same(snapshot(other.model), snapshot(run.model))


def test_rng_states_are_restored_on_resume(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1)
    torch.manual_seed(123)
    random.seed(7)
    run.manager.save(1)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(999)
    random.seed(999)
    Trainable(folder=str(tmp_path)).manager.load()
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]


def test_non_persistent_buffers_are_never_saved(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1)
    run.model.scale.fill_(2.0)
    run.model.cache.fill_(3.0)
    run.manager.save(1)
    from ckpt_core.storage.safe_metadata import read_metadata

    keys = set(read_metadata(layout.step_dir(str(tmp_path), 1)).state_dict_metadata)
    assert "model.scale" in keys
    assert not any("cache" in k for k in keys)
    other = Trainable(seed=1, folder=str(tmp_path))
    other.model.cache.fill_(5.0)
    assert other.manager.load() is True  # loads fine without the buffer
    assert torch.all(other.model.scale == 2.0)  # the persistent buffer was loaded
    assert torch.all(other.model.cache == 5.0)  # the non-persistent one kept its own value


def test_fresh_start_returns_false_and_changes_nothing(tmp_path):
    run = Trainable(folder=str(tmp_path / "empty"))
    before = snapshot(run.model)
    assert run.manager.load() is False
    assert_same(snapshot(run.model), before)
    assert run.manager.train_state.step == 0


def test_an_explicit_missing_step_raises_naming_the_available_steps(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=2)
    run.manager.save(2)
    with pytest.raises(CheckpointError, match=r"step 5 .*\[2\]"):
        Trainable(folder=str(tmp_path)).manager.load(step=5)
    with pytest.raises(CheckpointError, match="step 7"):
        Trainable(folder=str(tmp_path), load_step=7).manager.load()


def test_the_latest_step_is_found_and_an_explicit_older_step_is_honoured(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1)
    weights = {}
    for step in (1, 2, 3):
        run.step()
        run.manager.save(step)
        weights[step] = snapshot(run.model)
    latest = Trainable(seed=3, folder=str(tmp_path))
    latest.manager.load()
    assert latest.manager.train_state.step == 3
    assert_same(snapshot(latest.model), weights[3])
    older = Trainable(seed=3, folder=str(tmp_path), load_step=2)
    older.manager.load()
    assert older.manager.train_state.step == 2
    assert_same(snapshot(older.model), weights[2])
    explicit = Trainable(seed=3, folder=str(tmp_path))
    explicit.manager.load(step=1)
    assert_same(snapshot(explicit.model), weights[1])


def test_resuming_an_older_step_warns_about_the_newer_ones_it_will_not_overwrite(tmp_path, caplog):
    run = Trainable(folder=str(tmp_path), interval=1)
    for step in (1, 2, 3):
        run.manager.save(step)
    with caplog.at_level("WARNING", logger="ckpt_core.policy.load_policy"):
        Trainable(folder=str(tmp_path), load_step=1).manager.load()
    assert "newer steps [2, 3]" in caplog.text and "load_step = -1 would pick step 3" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ckpt_core.policy.load_policy"):
        Trainable(folder=str(tmp_path)).manager.load()
    assert "newer steps" not in caplog.text


def test_initial_load_is_used_only_while_the_folder_has_no_committed_step(tmp_path):
    source = Trainable(seed=1, folder=str(tmp_path / "source"), interval=1)
    source.step()
    source.manager.save(1)
    src_weights = snapshot(source.model)
    initial = {"path": str(tmp_path / "source"), "format": "dcp", "model_only": True}

    # The run folder exists but is empty: the initial load must happen (not be skipped).
    os.makedirs(tmp_path / "run")
    run = Trainable(seed=2, folder=str(tmp_path / "run"), interval=1, initial_load=initial)
    assert run.manager.load() is True
    assert_same(snapshot(run.model), src_weights)
    assert run.manager.train_state.step == 0  # model only
    assert not run.optim.state  # optimizer untouched
    run.step()
    run.manager.save(1)
    resumed_weights = snapshot(run.model)

    # Now the folder has a committed step: resume wins over the initial load.
    again = Trainable(seed=3, folder=str(tmp_path / "run"), initial_load=initial)
    again.manager.load()
    assert_same(snapshot(again.model), resumed_weights)
    assert again.manager.train_state.step == 1


def test_save_gating_follows_interval_first_step_and_last_step(tmp_path):
    run = Trainable(folder=str(tmp_path / "a"), interval=3)
    assert [run.manager.save(s) for s in range(1, 8)] == [False, False, True] + [False] * 2 + [
        True,
        False,
    ]
    assert run.manager.save(8, last_step=True) is True
    assert _steps(tmp_path / "a") == [3, 6, 8]

    first = Trainable(folder=str(tmp_path / "b"), interval=5, enable_first_step_checkpoint=True)
    assert [first.manager.save(s) for s in (1, 2, 5)] == [True, False, True]
    assert _steps(tmp_path / "b") == [1, 5]


def test_load_only_and_disabled_managers_never_write(tmp_path):
    source = Trainable(folder=str(tmp_path / "src"), interval=1)
    source.manager.save(1)
    load_only = Trainable(seed=4, folder=str(tmp_path / "src"), interval=1, load_only=True)
    assert load_only.manager.load() is True
    assert load_only.manager.save(2, last_step=True) is False
    assert _steps(tmp_path / "src") == [1]

    disabled = Trainable(folder=str(tmp_path / "off"), interval=1, enable=False)
    assert disabled.manager.load() is False
    assert disabled.manager.save(1, last_step=True) is False
    disabled.manager.close()
    assert not os.path.exists(tmp_path / "off")


def test_keep_latest_k_purges_older_steps_only_after_the_new_one_is_committed(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1, keep_latest_k=2)
    for step in range(1, 6):
        run.manager.save(step)
        run.manager._purger.join()
        # Never fewer than min(step, k) committed steps, and the newest is always there.
        assert _steps(tmp_path)[-1] == step
        assert len(_steps(tmp_path)) == min(step, 2)
    run.manager.close()
    assert _steps(tmp_path) == [4, 5]


def test_the_step_being_loaded_is_never_purged(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1)
    for step in (1, 2, 3):
        run.manager.save(step)
    resumed = Trainable(folder=str(tmp_path), interval=1, keep_latest_k=2, load_step=1)
    resumed.manager.load()
    resumed.manager.save(4)
    resumed.manager.close()
    assert _steps(tmp_path) == [1, 3, 4]


def test_exclude_from_loading_leaves_those_states_alone(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1)
    run.step()
    run.manager.save(1)
    other = Trainable(
        seed=9, folder=str(tmp_path), exclude_from_loading=["optimizer", "lr_scheduler"]
    )
    other.manager.load()
    assert_same(snapshot(other.model), snapshot(run.model))
    assert not other.optim.state
    assert other.sched.last_epoch == 0


def test_an_unknown_state_in_exclude_from_loading_names_it_and_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        Trainable(folder=str(tmp_path), exclude_from_loading=["dataloder"])
    msg = str(err.value)
    assert "checkpoint.exclude_from_loading: unknown state 'dataloder'" in msg
    assert "'dataloader'" in msg and "'train_state'" in msg


def test_a_different_architecture_is_refused_naming_keys_and_shapes(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1, dim=16)
    run.manager.save(1)
    wider = Trainable(folder=str(tmp_path), dim=8)
    with pytest.raises(CheckpointError) as info:
        wider.manager.load()
    assert "'inp.weight'" in str(info.value) and "[8, 8]" in str(info.value)
    assert "[16, 16]" in str(info.value)

    class Extra(TinyNet):
        def __init__(self) -> None:
            super().__init__(16)
            self.head = torch.nn.Linear(16, 2)

    model = Extra()
    manager = CheckpointManager(CheckpointConfig(folder=str(tmp_path)), model)
    with pytest.raises(CheckpointError, match=r"missing .*head\.weight"):
        manager.load()


def test_a_resume_into_another_dtype_is_refused_but_an_initial_load_casts(tmp_path):
    run = Trainable(folder=str(tmp_path / "run"), interval=1)
    run.step()
    run.manager.save(1)
    saved = snapshot(run.model)

    other = Trainable(seed=1, folder=str(tmp_path / "run"))
    other.model.to(torch.bfloat16)
    with pytest.raises(CheckpointError) as info:
        other.manager.load()
    message = str(info.value)
    assert "Dtype mismatch for 'inp.weight': model torch.bfloat16, checkpoint torch.float32" in (
        message
    )
    assert other.manager.train_state.step == 0  # refused before anything was read

    # Starting a new run from it (model only) casts instead.
    initial = {"path": str(tmp_path / "run"), "format": "dcp"}
    fresh = Trainable(seed=2, folder=str(tmp_path / "new"), initial_load=initial)
    fresh.model.to(torch.bfloat16)
    assert fresh.manager.load() is True
    assert torch.equal(fresh.model.inp.weight, saved["inp.weight"].to(torch.bfloat16))


def test_extra_states_are_saved_and_restored(tmp_path):
    class Counter:
        def __init__(self, n: int) -> None:
            self.n = n

        def state_dict(self):
            return {"n": self.n, "history": torch.arange(self.n)}

        def load_state_dict(self, sd):
            self.n = sd["n"]
            assert torch.equal(sd["history"], torch.arange(self.n))

    model = TinyNet()
    CheckpointManager(
        CheckpointConfig(folder=str(tmp_path), interval=1), model, states={"counter": Counter(5)}
    ).save(1)
    restored = Counter(5)
    CheckpointManager(
        CheckpointConfig(folder=str(tmp_path)), model, states={"counter": restored}
    ).load()
    assert restored.n == 5
    with pytest.raises(ConfigError, match="reserved"):
        CheckpointManager(CheckpointConfig(folder=str(tmp_path)), model, states={"model": model})


def test_hf_export_without_a_state_dict_adapter_is_a_config_error(tmp_path):
    config = CheckpointConfig(folder=str(tmp_path), export={"format": "hf"})
    with pytest.raises(ConfigError, match="sd_adapter"):
        CheckpointManager(config, TinyNet())


def test_manifest_records_step_world_size_converters_and_checksums(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1)
    run.manager.save(1)
    man = json.loads((tmp_path / "step-1" / "manifest.json").read_text())
    assert (man["format_version"], man["kind"], man["step"], man["world_size"]) == (
        1,
        "checkpoint",
        1,
        1,
    )
    assert man["converters"] == [] and man["model"] is None
    assert set(man["files"]) == {".metadata", "__0_0.distcp"}
    for name, entry in man["files"].items():
        data = (tmp_path / "step-1" / name).read_bytes()
        import zlib

        assert entry == {"size": len(data), "checksum": f"crc32:{zlib.crc32(data):08x}"}


def test_a_committed_step_is_never_overwritten(tmp_path):
    run = Trainable(folder=str(tmp_path), interval=1)
    run.manager.save(1)
    before = (tmp_path / "step-1" / "__0_0.distcp").read_bytes()
    run.step()
    assert run.manager.save(1) is False
    assert (tmp_path / "step-1" / "__0_0.distcp").read_bytes() == before


def test_dcp_exports_follow_their_interval_and_start_a_new_run(tmp_path):
    export = {"folder": str(tmp_path / "export"), "format": "dcp", "dtype": "float32"}
    run = Trainable(folder=str(tmp_path / "ckpt"), interval=4, export={**export, "interval": 2})
    weights = {}
    for step in range(1, 6):
        run.step()
        run.manager.save(step, last_step=step == 5)
        weights[step] = snapshot(run.model)
    run.manager.close()
    assert layout.committed_steps(str(tmp_path / "export")) == [2, 4, 5]
    assert layout.committed_steps(str(tmp_path / "ckpt")) == [4, 5]
    man = json.loads((tmp_path / "export" / "step-4" / "manifest.json").read_text())
    assert man["kind"] == "export"

    # An export starts a new run (model only); the export folder is never a resume point.
    initial = {"path": str(tmp_path / "export"), "format": "dcp"}
    fresh = Trainable(seed=4, folder=str(tmp_path / "new"), initial_load=initial)
    assert fresh.manager.load() is True
    assert_same(snapshot(fresh.model), weights[5])
    assert fresh.manager.train_state.step == 0

    # A bf16 export loads into an fp32 model (cast on load; dtype differences are allowed
    # for an initial load, not for a resume).
    bf16 = Trainable(
        folder=str(tmp_path / "c2"),
        interval=9,
        export={**export, "dtype": "bfloat16", "folder": str(tmp_path / "bf16")},
    )
    bf16.manager.save(1, last_step=True)
    into = Trainable(
        seed=5,
        folder=str(tmp_path / "new2"),
        initial_load={"path": str(tmp_path / "bf16" / "step-1"), "format": "dcp"},
    )
    into.manager.load()
    rounded = {k: v.to(torch.bfloat16).float() for k, v in snapshot(bf16.model).items()}
    assert_same(snapshot(into.model), rounded)


def test_the_default_export_goes_inside_the_checkpoint_folder_not_the_working_directory(
    tmp_path, monkeypatch
):
    from ckpt_core.testing.converter_contract import SameNamesAdapter

    monkeypatch.chdir(tmp_path)
    config = CheckpointConfig(folder="ckpt", interval=1)
    manager = CheckpointManager(config, TinyNet(), sd_adapter=SameNamesAdapter())
    manager.save(1, last_step=True)
    manager.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt" / "export" / "step-1" / "model.safetensors").is_file()
    assert layout.committed_steps("ckpt") == [1]  # the export folder is no step

    explicit = CheckpointConfig(folder="ckpt2", interval=1, export={"folder": "out"})
    manager = CheckpointManager(explicit, TinyNet(), sd_adapter=SameNamesAdapter())
    manager.save(1, last_step=True)
    manager.close()
    assert (tmp_path / "out" / "step-1" / "model.safetensors").is_file()
