"""The reference Llama computes what transformers' LlamaForCausalLM computes."""

from __future__ import annotations

import pytest
import torch

from ckpt_core.reference import (
    LlamaStateDictAdapter,
    ModelArgs,
    build_model,
    from_hf_config,
    from_pretrained,
)
from ckpt_core.reference.flavors import FLAVORS
from tests.core.hf_helpers import hf_llama, hf_logits, save_hf_llama


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("llama3", [False, True], ids=["plain_rope", "llama3_rope"])
def test_logits_equal_transformers_on_the_same_weights(tmp_path, tied, llama3):
    hf = save_hf_llama(tmp_path, tied=tied, llama3=llama3)
    ours = from_pretrained(str(tmp_path)).eval()
    assert (ours.output is None) == tied
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(tokens)
    want = hf_logits(hf, tokens)
    assert got.shape == (2, 40, 96)
    assert (got - want).abs().max().item() < 1e-4


def test_logits_equal_transformers_with_multi_query_attention_and_a_wide_head_dim(tmp_path):
    hf = save_hf_llama(tmp_path, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6)
    ours = from_pretrained(str(tmp_path)).eval()
    assert (ours.args.n_kv_heads, ours.args.head_dim, ours.args.norm_eps) == (1, 32, 1e-6)
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - hf_logits(hf, tokens)).abs().max().item() < 1e-4


def test_llama3_scaling_changes_the_logits(tmp_path):
    save_hf_llama(tmp_path / "a", llama3=False)
    save_hf_llama(tmp_path / "b", llama3=True)
    tokens = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = from_pretrained(str(tmp_path / "a"))(tokens)
        b = from_pretrained(str(tmp_path / "b"))(tokens)
    assert (a - b).abs().max().item() > 1e-3


def test_adapter_renames_module_paths_and_keeps_leaf_suffixes():
    adapter = LlamaStateDictAdapter(ModelArgs())
    assert adapter.hf_key("layers.0.attention.wq.weight_packed") == (
        "model.layers.0.self_attn.q_proj.weight_packed"
    )
    assert adapter.hf_key("layers.3.attention.wq.lora_a.weight") == (
        "model.layers.3.self_attn.q_proj.lora_a.weight"
    )
    for native, hf in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        key = f"layers.1.feed_forward.{native}.weight"
        assert adapter.hf_key(key) == f"model.layers.1.mlp.{hf}.weight"
    assert adapter.hf_key("output.weight") == "lm_head.weight"
    model = build_model("tiny")
    sd = model.state_dict()
    assert adapter.from_hf(adapter.to_hf(sd)).keys() == sd.keys()


def test_tied_flavor_has_no_output_key_and_adapter_drops_lm_head():
    args = ModelArgs(tie_word_embeddings=True)
    model = build_model(args)
    assert "output.weight" not in model.state_dict()
    adapter = LlamaStateDictAdapter(args)
    assert "lm_head.weight" not in adapter.to_hf(model.state_dict())
    assert "output.weight" not in adapter.from_hf({"lm_head.weight": torch.zeros(1)})


def test_hf_config_round_trips_through_model_args():
    for name, args in FLAVORS.items():
        config = LlamaStateDictAdapter(args).update_hf_config({"dtype": "bfloat16"})
        assert config["dtype"] == "bfloat16", name
        back = from_hf_config(config)
        assert back.to_dict() == {**args.to_dict(), "extra_hf_config": back.extra_hf_config}


def test_transformers_reads_our_config_as_the_same_architecture():
    import transformers

    args = FLAVORS["debug"]
    config = transformers.LlamaConfig(**LlamaStateDictAdapter(args).hf_config())
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.num_key_value_heads == args.n_kv_heads
    assert config.head_dim == args.head_dim


def test_debug_flavor_dims_are_multiples_of_128():
    model = build_model("debug")
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 20_000_000
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert p.shape[0] % 128 == 0 and p.shape[1] % 128 == 0, name


def test_unknown_flavor_error_lists_known_flavors():
    from ckpt_core.errors import ConfigError

    with pytest.raises(ConfigError, match="tiny"):
        build_model("nonexistent")


def test_tiny_model_runs_forward_and_backward():
    model = build_model("tiny")
    tokens = torch.randint(0, 256, (2, 16))
    model(tokens).sum().backward()
    assert model.layers["0"].attention.wq.weight.grad is not None
    assert hf_llama is not None
