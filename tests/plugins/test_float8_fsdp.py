"""Float8 with FSDP2 float8 all-gather on two real gloo ranks (CPU, emulated matmuls).

The weights are ``DTensor(WeightWithDynamicFloat8CastTensor)``; the state-dict
views must hand out plain local tensors that DCP and safetensors accept, and
the checkpoint must load into a plain (non-float8) model on one process.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from ckpt_plugins_float8.fp8_export import quantize_weight
from safetensors.torch import load_file, save_file
from torch import nn

from ckpt_core import CheckpointConfig, CheckpointManager, ConverterSet, ModelWrapper
from ckpt_core.content.model_wrapper import unwrap_tensor
from ckpt_core.policy.exporter import write_export
from ckpt_core.reference import adapter_for, build_model
from ckpt_plugins_float8 import Float8Converter

pytest.importorskip("torchao.float8")
from torchao.float8.float8_training_tensor import LinearMMConfig  # noqa: E402
from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor  # noqa: E402

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = build_model("tiny")
    config = Float8Converter.Config(emulate=True, enable_fsdp_float8_all_gather=True, export="fp8")
    convs = ConverterSet([Float8Converter(config)])
    convs.convert(model)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, convs, torch.optim.AdamW(model.parameters(), lr=3e-3)


def _train(model, opt, convs, steps, manager=None) -> list[float]:
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in steps:
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        convs.post_optimizer_step([model])
        losses.append(loss.item())
        if manager is not None:
            manager.save(step, last_step=step == steps[-1])
    return losses


def _manager(out, model, opt, convs) -> CheckpointManager:
    config = CheckpointConfig(
        folder=os.path.join(out, "checkpoints"), interval=2, export={"enable": False}
    )
    return CheckpointManager(config, model, optimizers=opt, converters=convs)


def _worker(rank: int, port: int, out: str, resume: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, convs, opt = _setup(seed=7 if resume else 0)
        manager = _manager(out, model, opt, convs)
        if resume:  # a fresh run restarts from step 2 and trains steps 3 and 4 again
            assert manager.load(step=2)
            losses = _train(model, opt, convs, [3, 4])
            manager.close()
            if rank == 0:
                torch.save({"losses": losses}, os.path.join(out, "r0_resumed.pt"))
            return
        weight = model.layers["0"].attention.wq.weight
        assert isinstance(weight, DTensor)
        assert isinstance(weight._local_tensor, WeightWithDynamicFloat8CastTensor)
        losses = _train(model, opt, convs, [1, 2, 3, 4], manager)
        manager.close()
        # post_optimizer_step precomputed the all-gather scale of every float8 weight.
        for name in convs["float8"].converted:
            local = model.get_submodule(name).weight._local_tensor
            assert local._precomputed_scale is not None, name

        wrapper = ModelWrapper(model, convs)
        full = wrapper.state_dict("full")
        kinds = {type(v._local_tensor) for v in full.values() if isinstance(v, DTensor)}
        assert kinds == {torch.Tensor}, kinds
        # The views share storage with the parameters (no stale copies).
        param_local = weight._local_tensor._tensor
        view_local = full["layers.0.attention.wq.weight"]._local_tensor
        assert view_local.untyped_storage().data_ptr() == param_local.untyped_storage().data_ptr()
        dcp.save({"model": full}, checkpoint_id=os.path.join(out, "ckpt"))
        write_export(
            wrapper,
            os.path.join(out, "export", "step-4"),
            fmt="hf",
            dtype="float32",
            sd_adapter=adapter_for(model),
            converters=convs,
            step=4,
        )

        export = wrapper.state_dict("export")
        gathered = {k: gather(v) for k, v in export.items()}
        plain = {k: v.full_tensor() for k, v in full.items()}
        if rank == 0:
            save_file(plain, os.path.join(out, "full.safetensors"))
            torch.save(
                {"losses": losses, "export": gathered, "full": plain}, os.path.join(out, "r0.pt")
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def gather(value):
    """Full tensor of a Shard(0) DTensor; gloo cannot all-gather float8, so go through uint8."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(value, DTensor):
        return value
    if all(isinstance(p, Replicate) for p in value.placements):
        return value.to_local()
    if value.dtype != torch.float8_e4m3fn:
        return value.full_tensor()
    import torch.distributed as dist

    local = value.to_local().view(torch.uint8).contiguous()
    parts = [torch.empty_like(local) for _ in range(WORLD)]
    dist.all_gather(parts, local)
    return torch.cat(parts).view(torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("float8_fsdp")
    mp.spawn(_worker, args=(free_port(), str(out), False), nprocs=WORLD, join=True)
    return out


def test_fsdp_float8_all_gather_trains_on_two_ranks(fsdp_run):
    losses = torch.load(fsdp_run / "r0.pt")["losses"]
    assert losses[-1] < losses[0], losses


def test_fsdp_float8_all_gather_run_resumes_bit_exactly_on_two_ranks(fsdp_run):
    mp.spawn(_worker, args=(free_port(), str(fsdp_run), True), nprocs=WORLD, join=True)
    expected = torch.load(fsdp_run / "r0.pt")["losses"][2:]
    assert torch.load(fsdp_run / "r0_resumed.pt")["losses"] == expected


def test_fsdp_float8_checkpoint_loads_into_a_plain_model_on_one_process(fsdp_run):
    reference = load_file(fsdp_run / "full.safetensors")
    torch.manual_seed(5)
    model = build_model("tiny")
    wrapper = ModelWrapper(model)
    state = wrapper.state_dict("full")
    dcp.load({"model": state}, checkpoint_id=str(fsdp_run / "ckpt"))
    wrapper.load_state_dict(state)
    loaded = wrapper.state_dict("full")
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key


def test_fp8_export_of_sharded_weights_equals_the_export_of_the_gathered_ones(fsdp_run):
    saved = torch.load(fsdp_run / "r0.pt")
    export, full = saved["export"], saved["full"]
    key = "layers.1.feed_forward.w2.weight"
    bits, scale = quantize_weight(full[key], "tensorwise")
    assert export[key].dtype == torch.float8_e4m3fn
    assert torch.equal(export[key].view(torch.uint8), bits.view(torch.uint8))
    assert torch.equal(export[key + "_scale"], scale)
    assert torch.equal(export["output.weight"], full["output.weight"])


def test_unwrap_returns_the_plain_tensor_inside_the_all_gather_weight():
    inner = torch.randn(32, 16)
    wrapped = WeightWithDynamicFloat8CastTensor(inner, LinearMMConfig(), torch.float8_e4m3fn)
    inner.requires_grad_(True)  # as the live parameter's data is
    out = unwrap_tensor(wrapped)
    assert type(out) is torch.Tensor and not out.requires_grad
    assert out.untyped_storage().data_ptr() == inner.untyped_storage().data_ptr()
    # What module.state_dict() hands the views: detach() keeps only the plain tensor.
    wrapped._precomputed_scale = torch.tensor(2.0)
    detached = unwrap_tensor(wrapped.detach())
    assert type(detached) is torch.Tensor
    assert detached.untyped_storage().data_ptr() == inner.untyped_storage().data_ptr()


def test_fp8_export_written_from_two_ranks_loads_in_transformers(fsdp_run):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    # The float8 training forward of the saved weights, rebuilt on one process.
    torch.manual_seed(5)
    model = build_model("tiny")
    ModelWrapper(model).load_state_dict(load_file(fsdp_run / "full.safetensors"))
    ConverterSet([Float8Converter(Float8Converter.Config(emulate=True))]).convert(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(fsdp_run / "export" / "step-4")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf.eval()(tokens).logits - model(tokens)).abs().max().item()
    assert diff < 1e-4, diff
