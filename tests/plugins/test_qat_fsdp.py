"""QAT under FSDP2: the export of a model sharded on two gloo ranks equals the unsharded one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.reference import LlamaStateDictAdapter, build_model
from ckpt_plugins_qat import QATConverter
from tests.core._dist import run_on_ranks

write_export = pytest.importorskip("ckpt_core.policy.exporter").write_export


def build(scheme: str):
    """``scheme``, or ``scheme+lora`` for QAT then LoRA (with non-zero B to merge)."""
    name, _, lora = scheme.partition("+")
    torch.manual_seed(0)
    model = build_model("tiny")
    items = [QATConverter(QATConverter.Config(scheme=name, group_size=32))]
    if lora:
        from ckpt_plugins_lora import LoRAConverter

        items.append(LoRAConverter(LoRAConverter.Config(rank=4, export="merged")))
    converters = ConverterSet(items)
    converters.convert(model)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("lora_b.weight"):
                param.normal_(std=0.02)
    return model, converters


def export(model, converters, path: str) -> None:
    write_export(
        ModelWrapper(model, converters),
        path,
        fmt="hf",
        dtype="float32",
        sd_adapter=LlamaStateDictAdapter(model.args),
        converters=converters,
    )


TOKENS = torch.arange(32).reshape(2, 16) * 7 % 256


def sharded_export(rank: int, world_size: int, scheme: str, path: str):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, converters = build(scheme)
    for layer in model.layers.values():
        fully_shard(layer)
    fully_shard(model)
    full = ModelWrapper(model, converters).state_dict("full")
    assert isinstance(full["layers.0.attention.wq.weight"], DTensor)
    logits = model(TOKENS)  # fake-quantized forward and backward on sharded weights
    logits.float().pow(2).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    view = ModelWrapper(model, converters).state_dict("export")
    # each rank quantizes its own rows: the compressed entries stay sharded like the weight
    assert isinstance(view["layers.0.attention.wq.weight_scale"], DTensor)
    assert view["layers.0.attention.wq.weight_scale"].to_local().shape[0] == 128 // world_size
    export(model, converters, path)
    return sorted(full), logits.detach().tolist()  # plain data crosses the queue


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize(
    "scheme", ["int4_weight_only", "int8_dynamic_act_int4_weight", "int4_weight_only+lora"]
)
def test_export_from_two_fsdp2_ranks_equals_the_single_process_export(scheme, tmp_path):
    (keys, logits), _ = run_on_ranks(sharded_export, 2, scheme, str(tmp_path / "sharded"))
    model, converters = build(scheme)
    assert keys == sorted(model.state_dict())  # same fp32 master keys when sharded
    with torch.no_grad():
        assert torch.allclose(torch.tensor(logits), model(TOKENS), atol=1e-6)
    export(model, converters, str(tmp_path / "single"))
    sharded, single = tensors(tmp_path / "sharded"), tensors(tmp_path / "single")
    assert sharded.keys() == single.keys()
    assert any(k.endswith("weight_scale") for k in single)
    for key in single:
        assert sharded[key].dtype == single[key].dtype, key
        assert torch.equal(sharded[key], single[key]), key
