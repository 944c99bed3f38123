"""LoRA ``state_dict_transform``: merging ``W + (alpha/r)·B·A`` for exports."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.errors import CheckpointError
from ckpt_plugins_lora import LoRAConfig, LoRAConverter, merge_adapters, merged_weight
from tests.plugins.lora_support import TinyLlama, randomize_adapters, tokens


def adapted(seed: int = 0, **options) -> tuple[TinyLlama, LoRAConverter, ConverterSet]:
    torch.manual_seed(seed)
    model = TinyLlama()
    conv = LoRAConverter(LoRAConfig(**options))
    convs = ConverterSet([conv])
    convs.convert(model)
    randomize_adapters(model, seed=seed + 1)
    return model, conv, convs


def test_merged_export_loads_into_a_plain_model_with_the_same_outputs():
    model, _, convs = adapted(rank=4, alpha=8)
    export = ModelWrapper(model, convs).state_dict("export")
    plain = TinyLlama()
    plain.load_state_dict(export)  # strict: exactly a plain model's keys
    x = tokens()
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    untouched = TinyLlama()
    untouched.load_state_dict(ModelWrapper(model, convs).state_dict("base"))
    assert (untouched(x) - model(x)).abs().max() > 1e-3


def test_export_view_builds_new_tensors_and_leaves_the_model_alone():
    model, _, convs = adapted(rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export = ModelWrapper(model, convs).state_dict("export")
    wq = model.layers["0"].attention.wq.weight
    assert export["layers.0.attention.wq.weight"].data_ptr() != wq.data_ptr()
    export["layers.0.attention.wq.weight"].add_(1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_merge_of_bf16_weights_is_computed_in_fp32():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=gen).bfloat16()
    a = torch.randn(8, 48, generator=gen).bfloat16()
    b = (torch.randn(64, 8, generator=gen) * 1e-2).bfloat16()
    merged = merged_weight(w, a, b, 0.5)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (w.float() + 0.5 * (b.float() @ a.float())).bfloat16())
    assert not torch.equal(merged, w + 0.5 * (b @ a))  # bf16 arithmetic would round differently


def test_export_adapter_keeps_the_base_weights_unmerged():
    model, _, convs = adapted(rank=4, export="adapter")
    wrapper = ModelWrapper(model, convs)
    export, base = wrapper.state_dict("export"), wrapper.state_dict("base")
    assert list(export) == list(base)
    assert all(torch.equal(export[k], base[k]) for k in base)


def test_merge_needs_both_factors_and_the_base_weight():
    model, conv, _ = adapted(rank=2, target_modules=["wq"])
    full = dict(model.state_dict())
    without_b = {k: v for k, v in full.items() if k != "layers.0.attention.wq.lora_b.weight"}
    with pytest.raises(CheckpointError, match="lora_b.weight"):
        merge_adapters(without_b, conv.modules, conv.scaling)
    without_w = {k: v for k, v in full.items() if k != "layers.1.attention.wq.weight"}
    with pytest.raises(CheckpointError, match="layers.1.attention.wq.weight"):
        merge_adapters(without_w, conv.modules, conv.scaling)
    # A pipeline stage without these modules at all is fine.
    stage = {k: v for k, v in full.items() if not k.startswith("layers.1.")}
    assert "layers.0.attention.wq.weight" in merge_adapters(stage, conv.modules, conv.scaling)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _, convs = adapted(rank=3, alpha=6)
        reference = {
            k: v.clone() for k, v in ModelWrapper(model, convs).state_dict("export").items()
        }
        x = tokens()
        eager = model(x)
        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
        torch.testing.assert_close(model(x), eager)
        export = ModelWrapper(model, convs).state_dict("export")
        assert set(export) == set(reference)
        sharded = export["layers.0.feed_forward.w1.weight"]
        assert isinstance(sharded, DTensor) and sharded.to_local().shape[0] == 16
        full = {k: v.full_tensor() for k, v in export.items()}
        if rank == 0:
            torch.save({"fsdp": full, "single": reference}, out)
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def test_merge_on_uneven_fsdp2_shards_equals_the_single_process_merge(tmp_path):
    out = str(tmp_path / "merged.pt")
    # Three ranks: 48 rows shard evenly, 16 (wk, wv) and 64 (output) do not.
    mp.spawn(_fsdp_worker, args=(3, _free_port(), out), nprocs=3)
    result = torch.load(out)
    fsdp, single = result["fsdp"], result["single"]
    assert set(fsdp) == set(single)
    for key in single:
        torch.testing.assert_close(fsdp[key], single[key], atol=1e-6, rtol=1e-6, msg=key)
    # The merge changed the targeted weights (so the comparison above means something).
    torch.manual_seed(0)
    plain = TinyLlama()
    assert not torch.allclose(
        single["layers.0.attention.wq.weight"], plain.layers["0"].attention.wq.weight
    )
