"""FSDP2 on 2 gloo ranks: async and sync saves, then loads on 1 and on 2 ranks (resharding).

Two spawns in all: the first trains and saves on 2 ranks, the second loads on
2 ranks; the 1-rank load runs in the test process. Tensors are compared
bit for bit (model and optimizer, gathered to full tensors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.core._dist import run_on_ranks
from tests.core._manager_models import TinyNet

DIM = 32
SAVED_STEPS = (2, 4, 6)


def _full_state(model, optim) -> dict[str, np.ndarray]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, optim, options=opts)
    out = {f"model.{k}": v for k, v in model_sd.items()}
    out.update({f"optimizer.{k}": v for k, v in optim_sd.items()})
    return {
        k: (v.detach().cpu().clone().numpy() if isinstance(v, torch.Tensor) else np.array(v))
        for k, v in out.items()
    }


def _sharded(seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = TinyNet(DIM)
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optim


def _train_and_save(rank: int, world_size: int, folder: str) -> dict:
    from ckpt_core import CheckpointConfig
    from ckpt_core.policy.manager import CheckpointManager

    model, optim = _sharded(seed=0)
    config = CheckpointConfig(folder=folder, interval=2, keep_latest_k=2, async_mode="async")
    manager = CheckpointManager(config, model, optimizers=optim)
    expected, rng = {}, None
    for step in range(1, 7):
        torch.manual_seed(100 * step + rank)
        model(torch.randn(4, DIM)).square().mean().backward()
        manager.maybe_wait_for_staging()
        optim.step()
        optim.zero_grad()
        if step == 6:
            rng = torch.get_rng_state().numpy().copy()
        if manager.save(step, last_step=step == 6):
            expected[step] = _full_state(model, optim)  # training goes on while step 4 writes
    manager.close()
    return {"expected": expected, "purges_started": manager._purger.started, "rng": rng}


def _load_on_two(rank: int, world_size: int, folder: str, step: int) -> dict:
    from ckpt_core import CheckpointConfig
    from ckpt_core.policy.manager import CheckpointManager

    model, optim = _sharded(seed=1)
    manager = CheckpointManager(CheckpointConfig(folder=folder), model, optimizers=optim)
    assert manager.load(step)
    local_shape = tuple(model.inp.weight.to_local().shape)
    return {
        "state": _full_state(model, optim),
        "local_shape": local_shape,
        "rng": torch.get_rng_state().numpy().copy(),
        "step": manager.train_state.step,
    }


def _assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert np.array_equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def saved_on_two_ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fsdp2"))
    results = run_on_ranks(_train_and_save, 2, folder)
    return folder, results


def test_fsdp2_saves_on_two_ranks_and_only_rank_zero_purges(saved_on_two_ranks):
    from ckpt_core.storage import layout, manifest

    folder, results = saved_on_two_ranks
    assert layout.committed_steps(folder) == [4, 6]  # keep_latest_k = 2
    assert results[0]["purges_started"] > 0
    assert results[1]["purges_started"] == 0
    man = manifest.read(layout.step_dir(folder, 6))
    assert man["world_size"] == 2 and man["mesh"]["shape"] == [2]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(man["files"])
    assert manifest.verify(layout.step_dir(folder, 6)) == []


def test_resume_on_one_rank_after_saving_on_two_is_bit_identical(saved_on_two_ranks):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from ckpt_core import CheckpointConfig
    from ckpt_core.policy.manager import CheckpointManager

    folder, results = saved_on_two_ranks
    for step in (4, 6):  # 4 was written asynchronously while training went on
        torch.manual_seed(7)
        model = TinyNet(DIM)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
        manager = CheckpointManager(CheckpointConfig(folder=folder), model, optimizers=optim)
        assert manager.load(step)
        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        model_sd, optim_sd = get_state_dict(model, optim, options=opts)
        got = {f"model.{k}": v.numpy() for k, v in model_sd.items()}
        got.update(
            {
                f"optimizer.{k}": v.numpy() if isinstance(v, torch.Tensor) else np.array(v)
                for k, v in optim_sd.items()
            }
        )
        _assert_identical(got, results[0]["expected"][step])
        assert manager.train_state.step == step


def test_resume_on_two_ranks_after_saving_on_two_is_bit_identical(saved_on_two_ranks):
    folder, results = saved_on_two_ranks
    loaded = run_on_ranks(_load_on_two, 2, folder, 6)
    for rank in (0, 1):
        _assert_identical(loaded[rank]["state"], results[0]["expected"][6])
        assert loaded[rank]["local_shape"] == (DIM // 2, DIM)  # really sharded
        assert loaded[rank]["step"] == 6
        # Rank 0's RNG state was saved and is restored on every rank.
        assert np.array_equal(loaded[rank]["rng"], results[0]["rng"])
