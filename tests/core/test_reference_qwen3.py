"""The reference Qwen3 computes what transformers' Qwen3ForCausalLM computes, both ways."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_core.content.families import family_for_hf_config, family_for_model, model_family
from ckpt_core.errors import ConfigError, DamagedCheckpointError
from ckpt_core.reference.qwen3 import QWEN3_FLAVORS
from ckpt_core.reference.qwen3_adapter import Qwen3StateDictAdapter
from ckpt_core.reference.qwen3_config import qwen3_from_hf_config, qwen3_to_hf_config
from tests.core._qwen3_hf import export_fp32, hf_model, native_from_hf_folder, tokens
from tests.core.hf_helpers import hf_logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_equal_transformers_after_loading_its_folder(tmp_path, tied):
    hf = hf_model("qwen3", tie_word_embeddings=tied)
    hf.save_pretrained(str(tmp_path))
    ours, _ = native_from_hf_folder(str(tmp_path), "qwen3")
    assert ours.args.head_dim == 32 and (ours.output is None) == tied
    t = tokens(96)
    with torch.no_grad():
        got = ours(t)
    assert (got - hf_logits(hf, t)).abs().max().item() < 1e-4


def test_export_loads_in_transformers_with_the_native_logits(tmp_path):
    import transformers

    family = model_family("qwen3")
    config = family.config_for("tiny")
    torch.manual_seed(0)
    ours = family.build_model(config).eval()
    with torch.no_grad():  # q/k norms away from 1, so a lost norm changes the logits
        for layer in ours.layers.values():
            layer.attention.q_norm.weight.uniform_(0.5, 1.5)
            layer.attention.k_norm.weight.uniform_(0.5, 1.5)
    export_fp32(ours, family.adapter(config), str(tmp_path / "hf"))
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == "qwen3" and written["architectures"] == ["Qwen3ForCausalLM"]
    assert written["head_dim"] == 64 and written["hidden_size"] == 128
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    t = tokens(256)
    with torch.no_grad():
        assert (ours(t) - hf_logits(hf, t)).abs().max().item() < 1e-4


def test_adapter_maps_the_qk_norms_and_round_trips_every_key():
    adapter = Qwen3StateDictAdapter(QWEN3_FLAVORS["tiny"])
    assert adapter.hf_key("layers.1.attention.q_norm.weight") == (
        "model.layers.1.self_attn.q_norm.weight"
    )
    assert adapter.hf_key("layers.0.attention.k_norm.weight") == (
        "model.layers.0.self_attn.k_norm.weight"
    )
    model = model_family("qwen3").build_model(adapter.hf_config(), device="meta")
    sd = model.state_dict()
    assert adapter.from_hf(adapter.to_hf(sd)).keys() == sd.keys()
    assert adapter.describe()["adapter"] == "qwen3"


def test_flavors_and_folders_resolve_to_the_qwen3_family(tmp_path):
    family, config = family_for_model("qwen3:tiny")
    assert family.name == "qwen3" and config["model_type"] == "qwen3"
    assert family_for_hf_config(config) is family or family_for_hf_config(config).name == "qwen3"
    assert family_for_model("qwen3:debug")[1]["tie_word_embeddings"] is True
    for name, args in QWEN3_FLAVORS.items():
        assert qwen3_from_hf_config(qwen3_to_hf_config(args)).to_dict() == {
            **args.to_dict(),
            "extra_hf_config": {"hidden_act": "silu", "attention_bias": False},
        }, name
    with pytest.raises(ConfigError, match="qwen3 has no flavor 'huge'"):
        family.config_for("huge")


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"use_sliding_window": True}, ConfigError, "use_sliding_window=true"),
        ({"attention_bias": True}, ConfigError, "attention_bias=true"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, ConfigError, "layer_types"),
        ({"model_type": "llama"}, ConfigError, "reads 'qwen3' only"),
        ({"use_sliding_window": "no"}, DamagedCheckpointError, "must be true or false"),
        ({"hidden_act": "gelu"}, ConfigError, "uses 'silu'"),
    ],
    ids=["sliding-window", "attention-bias", "layer-types", "model-type", "flag-type", "act"],
)
def test_configs_the_native_model_cannot_compute_are_refused(change, error, words):
    config = {**qwen3_to_hf_config(QWEN3_FLAVORS["tiny"]), **change}
    with pytest.raises(error, match=words):
        model_family("qwen3").check_config(config, source="x/config.json")
