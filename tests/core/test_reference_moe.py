"""The reference MoE: stacked experts natively, per-expert HF keys, transformers' routing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from ckpt_core import ModelWrapper
from ckpt_core.content.experts import router_linears, stacked_leaf_names
from ckpt_core.content.families import family_for_model, model_family
from ckpt_core.errors import CheckpointError, DamagedCheckpointError
from ckpt_core.policy.exporter import load_hf
from ckpt_core.reference.moe import MOE_FLAVORS
from ckpt_core.reference.qwen3_adapter import MoEStateDictAdapter
from ckpt_core.reference.qwen3_config import moe_to_hf_config
from tests.core._dist import run_on_ranks
from tests.core._qwen3_hf import export_fp32, hf_model, native_from_hf_folder, tokens
from tests.core.hf_helpers import hf_logits

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)


def _tiny(seed: int = 0):
    family = model_family("moe")
    config = family.config_for("tiny")
    torch.manual_seed(seed)
    return family.build_model(config).eval(), family.adapter(config)


def _hf_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize(
    ("extra", "dense"),
    [
        (dict(norm_topk_prob=True), []),
        (dict(norm_topk_prob=False, mlp_only_layers=[0]), [0]),
        (dict(norm_topk_prob=True, tie_word_embeddings=True, decoder_sparse_step=2), [0]),
    ],
    ids=["renormalized", "raw-top-k-and-a-dense-layer", "tied-every-second-layer"],
)
def test_logits_equal_transformers_after_loading_its_per_expert_folder(tmp_path, extra, dense):
    hf = hf_model("qwen3_moe", **MOE, **extra)
    hf.save_pretrained(str(tmp_path))  # the Hub layout: mlp.experts.<e>.gate_proj.weight
    ours, _ = native_from_hf_folder(str(tmp_path), "moe")
    assert [i for i in range(2) if ours.layers[str(i)].moe is None] == dense
    assert ours.layers["1"].moe.experts.w1.shape == (4, 48, 64)
    t = tokens(96)
    with torch.no_grad():
        assert (ours(t) - hf_logits(hf, t)).abs().max().item() < 1e-4


def test_export_writes_per_expert_keys_that_transformers_loads_with_the_native_logits(tmp_path):
    import transformers

    ours, adapter = _tiny()
    export_fp32(ours, adapter, str(tmp_path / "hf"))
    tensors = _hf_tensors(tmp_path / "hf")
    experts = sorted(k for k in tensors if ".mlp.experts." in k)
    assert len(experts) == 2 * 4 * 3  # layers × experts × (gate, up, down)
    w2 = ours.layers["1"].moe.experts.w2
    assert torch.equal(tensors["model.layers.1.mlp.experts.3.down_proj.weight"], w2[3].detach())
    assert tensors["model.layers.0.mlp.gate.weight"].shape == (4, 128)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in tensors)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"]) == (
        "qwen3_moe",
        4,
        2,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    t = tokens(256)
    with torch.no_grad():
        assert (ours(t) - hf_logits(hf, t)).abs().max().item() < 1e-4


def test_from_hf_stacks_experts_and_refuses_a_layer_missing_one():
    ours, adapter = _tiny()
    sd = ours.state_dict()
    hf = adapter.to_hf(sd)
    back = adapter.from_hf(hf)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    del hf["model.layers.0.mlp.experts.2.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layers.0.moe.experts.w3: .* lack experts \[2\]"):
        adapter.from_hf(hf)
    with pytest.raises(CheckpointError, match="holds 4 experts"):
        adapter.hf_key("layers.0.moe.experts.w1")


def test_config_reads_transformers_5_names_and_refuses_impossible_expert_fields():
    family, config = family_for_model("moe:tiny")
    assert family.name == "moe" and config["model_type"] == "qwen3_moe"
    as_saved = {k: v for k, v in config.items() if k != "num_experts"}
    as_saved["num_local_experts"] = 4  # what transformers 5 writes
    assert MoEStateDictAdapter.from_hf_config(as_saved).args.num_experts == 4
    for name, args in MOE_FLAVORS.items():
        assert MoEStateDictAdapter.from_hf_config(moe_to_hf_config(args)).args.to_dict() == {
            **args.to_dict(),
            "extra_hf_config": {"hidden_act": "silu", "attention_bias": False},
        }, name
    for change, words in [
        ({"num_experts_per_tok": 5}, "exceeds num_experts"),
        ({"num_experts": 0}, "num_experts is 0"),
        ({"mlp_only_layers": [7]}, "mlp_only_layers"),
        ({"num_local_experts": 8}, "differ"),
        ({"norm_topk_prob": "yes"}, "must be true or false"),
    ]:
        with pytest.raises(DamagedCheckpointError, match=words):
            family.check_config({**config, **change}, source="x/config.json")


def test_converters_see_stacked_experts_and_routers():
    ours, _ = _tiny()
    assert stacked_leaf_names(ours) == {"w1", "w2", "w3"}
    assert router_linears(ours) == {"layers.0.moe.router.gate", "layers.1.moe.router.gate"}


# -- two FSDP2 ranks -------------------------------------------------------------


def _sharded_export_and_load(rank, world_size, folder, placement):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    ours, adapter = _tiny()
    want = {k: v.clone() for k, v in ours.state_dict().items()}
    mesh = init_device_mesh("cpu", (world_size,))
    place = (lambda p: Shard(1) if p.dim() == 3 else None) if placement == "dim1" else None
    for block in ours.layers.values():
        fully_shard(block, mesh=mesh, shard_placement_fn=place)
    fully_shard(ours, mesh=mesh)
    w1 = ours.layers["0"].moe.experts.w1
    assert w1.placements == ((Shard(1),) if placement == "dim1" else (Shard(0),))
    export_fp32(ours, adapter, f"{folder}/{placement}")
    # An HF load into a freshly initialized sharded model brings back every tensor.
    with torch.no_grad():
        for p in ours.parameters():
            p.zero_()
    load_hf(ModelWrapper(ours), f"{folder}/{placement}", sd_adapter=adapter)
    got = {k: v.full_tensor() for k, v in ours.state_dict().items()}
    return sorted(k for k in want if not torch.equal(got[k], want[k]))


@pytest.mark.parametrize("placement", ["dim0", "dim1"], ids=["fsdp-default", "trainer-placement"])
def test_two_fsdp_ranks_export_the_one_rank_files_and_load_them_back(tmp_path, placement):
    ours, adapter = _tiny()
    export_fp32(ours, adapter, str(tmp_path / "one"))
    results = run_on_ranks(_sharded_export_and_load, 2, str(tmp_path), placement)
    assert results == [[], []]
    one, two = _hf_tensors(tmp_path / "one"), _hf_tensors(tmp_path / placement)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
