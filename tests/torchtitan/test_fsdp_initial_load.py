"""The torchtitan initial load into FSDP2-sharded parameters and moments (2 gloo ranks)."""

from __future__ import annotations

import torch

from tests.core._dist import run_on_ranks
from tests.torchtitan import _titan


def _load_sharded(rank: int, world_size: int, step: str, folder: str) -> dict:
    """Each rank loads its rows; rank 0 saves the full tensors to ``folder``.pt."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ckpt_core import CheckpointConfig, CheckpointManager
    from ckpt_core.content.families import model_family
    from ckpt_core.content.states import OptimizersContainer
    from ckpt_core.dtensor_utils import full_tensor
    from ckpt_core.torchtitan import architecture

    family, config = model_family("llama"), architecture.hf_config(_titan.ARGS)
    torch.manual_seed(11)
    model = family.build_model(config)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    cfg = CheckpointConfig(
        folder=folder,
        initial_load={"path": step, "format": "torchtitan", "model_only": False},
        export={"enable": False},
    )
    manager = CheckpointManager(cfg, model, optimizers=opt, sd_adapter=family.adapter(config))
    assert manager.load()
    weights = {k: full_tensor(v).clone() for k, v in model.state_dict().items()}
    optim = OptimizersContainer([model], opt).state_dict()
    moments = {k: full_tensor(v).clone() for k, v in optim.items() if k.endswith("exp_avg_sq")}
    manager.close()
    if rank == 0:  # through a file: shared-memory tensors die with the child
        torch.save({"weights": weights, "moments": moments}, f"{folder}.pt")


def test_a_torchtitan_step_loads_into_fsdp2_shards_on_two_ranks(titan, tmp_path, monkeypatch):
    from ckpt_core.torchtitan import Heads, architecture, from_torchtitan

    run, step = titan
    monkeypatch.setenv("CKPT_TEST_START_METHOD", "spawn")  # this process holds a gloo group
    run_on_ranks(_load_sharded, 2, step, str(tmp_path / "run"))
    got = torch.load(tmp_path / "run.pt", weights_only=True)
    heads = Heads.from_hf_config(architecture.hf_config(_titan.ARGS))
    flat = {f"optimizer.{k}": v for k, v in run.optimizers.state_dict().items()}
    flat.update(run.model.state_dict())
    want = from_torchtitan(flat, heads, source="live").entries
    for key, value in got["weights"].items():
        assert torch.equal(value, want[f"model.{key}"]), key
    assert got["moments"]
    for key, value in got["moments"].items():
        assert torch.equal(value, want[f"optimizer.{key}"]), key
