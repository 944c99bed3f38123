"""LoRA ``state_dict_adapter``: PEFT key names, shapes and ``adapter_config.json``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.errors import CheckpointError
from ckpt_plugins_lora import LoRAConfig, LoRAConverter, PeftLoraAdapter
from tests.plugins.lora_support import DIM, KV, TinyLlama, ToyLlamaAdapter, randomize_adapters


def converted(**options) -> tuple[TinyLlama, LoRAConverter, ConverterSet]:
    torch.manual_seed(0)
    model = TinyLlama()
    conv = LoRAConverter(LoRAConfig(**options))
    convs = ConverterSet([conv])
    convs.convert(model)
    randomize_adapters(model)
    return model, conv, convs


def owned(model, convs) -> dict[str, torch.Tensor]:
    full = ModelWrapper(model, convs).state_dict("full")
    return {k: v for k, v in full.items() if convs.owner(k) == "lora"}


def test_to_hf_writes_peft_key_names_with_a_r_by_in_and_b_out_by_r():
    model, conv, convs = converted(rank=4, target_modules=["wk", "w2"])
    adapter = convs.state_dict_adapters(ToyLlamaAdapter())["lora"]
    hf = adapter.to_hf(owned(model, convs))
    prefix = "base_model.model.model.layers.0."
    assert hf[prefix + "self_attn.k_proj.lora_A.weight"].shape == (4, DIM)
    assert hf[prefix + "self_attn.k_proj.lora_B.weight"].shape == (KV, 4)
    assert hf[prefix + "mlp.down_proj.lora_A.weight"].shape == (4, 48)
    assert len(hf) == 8
    wk = model.layers["0"].attention.wk
    assert torch.equal(hf[prefix + "self_attn.k_proj.lora_B.weight"], wk.lora_b.weight)
    assert adapter.subfolder == "adapter"
    assert adapter.file_name() == "adapter_model.safetensors"


def test_from_hf_inverts_to_hf_and_accepts_the_default_adapter_name():
    model, _, convs = converted(rank=2)
    adapter = convs.state_dict_adapters(ToyLlamaAdapter())["lora"]
    native = owned(model, convs)
    hf = adapter.to_hf(native)
    assert adapter.from_hf(hf) == native
    in_memory = {k.replace(".weight", ".default.weight"): v for k, v in hf.items()}
    assert adapter.from_hf(in_memory) == native


def test_adapter_config_names_hf_leaves_and_loads_as_a_peft_lora_config(tmp_path):
    peft = pytest.importorskip("peft")
    _, conv, convs = converted(rank=4, alpha=8, dropout=0.1, target_modules=["wq", "wv", "w3"])
    conv.base_model_name_or_path = "/models/tiny"
    adapter = convs.state_dict_adapters(ToyLlamaAdapter())["lora"]
    files = adapter.extra_files()
    config = json.loads(files["adapter_config.json"])
    assert config["target_modules"] == ["q_proj", "up_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "/models/tiny"
    (tmp_path / "adapter_config.json").write_text(files["adapter_config.json"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, peft.LoraConfig)
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout) == (4, 8, 0.1)
    assert set(loaded.target_modules) == {"q_proj", "v_proj", "up_proj"}
    assert loaded.task_type == "CAUSAL_LM" and loaded.bias == "none"
    assert not loaded.use_dora and not loaded.use_rslora and not loaded.fan_in_fan_out


def test_only_merged_exports_leave_out_the_adapter_folder():
    for export, subfolder in (("merged", None), ("adapter", "adapter"), ("both", "adapter")):
        _, _, convs = converted(export=export)
        adapter = convs.state_dict_adapters(ToyLlamaAdapter())["lora"]
        assert adapter.subfolder == subfolder, export


def test_from_hf_rejects_untargeted_modules_and_non_lora_keys():
    _, _, convs = converted(target_modules=["wq"])
    adapter = convs.state_dict_adapters(ToyLlamaAdapter())["lora"]
    x = torch.zeros(1)
    with pytest.raises(CheckpointError, match="v_proj.*target_modules"):
        adapter.from_hf({"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": x})
    with pytest.raises(CheckpointError, match="DoRA"):
        adapter.from_hf(
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": x}
        )
    with pytest.raises(CheckpointError, match="base_model.model."):
        adapter.from_hf({"model.layers.0.self_attn.q_proj.lora_A.weight": x})


def test_without_a_model_adapter_native_names_are_kept():
    adapter = PeftLoraAdapter(
        ["layers.0.attention.wq"], rank=2, alpha=4, dropout=0.0, model_adapter=None
    )
    hf = adapter.to_hf({"layers.0.attention.wq.lora_b.weight": 1})
    assert hf == {"base_model.model.layers.0.attention.wq.lora_B.weight": 1}
    assert adapter.hf_target_modules == ["wq"]
