"""LoRA, QAT and Float8 on transformers models with no adapter (1 rank).

* LoRA on each family (qwen2 and gemma3 tied, phi3 fused, qwen3_moe with
  stacked experts): the merged export loads in transformers with the trained
  model's logits (fp32, < 1e-5) and the PEFT adapter in
  ``peft.PeftModel.from_pretrained`` (< 1e-4); a resume is bit-identical.
* QAT (int4 groups) on qwen3: the compressed-tensors export loads in
  transformers with the fake-quantized logits; a resume is bit-identical.
* Float8 (emulated) on llama: a resume is bit-identical and the export holds
  the master weights under the model's own names.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors import safe_open

from ckpt_core import ConverterSet
from tests.hf_native import _families as f

pytest.importorskip("transformers")


def trained_and_resumed(family: str, make: Any, tmp_path) -> tuple[Any, Any, dict, dict]:
    """Train 4 steps, then resume a fresh converted model from step 2 to 4.

    ``make()`` returns a new ``ConverterSet``. Returns (model, its converters, the
    uninterrupted state, the resumed state).
    """
    cfg = f.config(str(tmp_path), export={"folder": f"{tmp_path}/export", "dtype": "float32"})
    convs = make()
    model = f.build(family, seed=0)
    convs.convert(model)
    _, opt = f.run(model, cfg, converters=convs)
    want = f.full_state(model, opt)
    again, again_convs = f.build(family, seed=1), make()
    again_convs.convert(again)
    manager, opt = f.run(again, cfg, converters=again_convs, load_step=2)
    assert manager._loaded_step == 2
    return model, convs, want, f.full_state(again, opt)


# -- LoRA ---------------------------------------------------------------------------


#: family -> the linears LoRA adapts. phi3 fuses q/k/v and gate/up into one linear each;
#: qwen3_moe's experts are stacked tensors (no nn.Linear), so only its attention is adapted.
LORA_TARGETS = {
    **{family: f.LINEARS for family in f.FAMILIES},
    "phi3": "qkv_proj,o_proj,gate_up_proj,down_proj",
    "qwen3_moe": "q_proj,k_proj,v_proj,o_proj",
}


def lora(family: str) -> Any:
    """A maker of fresh LoRA converters for ``family`` (rank 4, merged and PEFT export)."""
    from ckpt_plugins_lora import LoRAConverter

    options = {"rank": 4, "alpha": 8, "target_modules": LORA_TARGETS[family], "export": "both"}
    return lambda: ConverterSet([LoRAConverter(LoRAConverter.Config(**options))])


@pytest.mark.parametrize("family", list(f.FAMILIES))
def test_lora_merged_export_and_peft_adapter_give_the_trained_logits(family, tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("ckpt_plugins_lora")
    model, _, want, resumed = trained_and_resumed(family, lora(family), tmp_path)
    f.assert_identical(resumed, want)
    targets = sorted(LORA_TARGETS[family].split(","))
    attention = model.model.layers[0].self_attn
    adapted = attention.qkv_proj if family == "phi3" else attention.q_proj
    assert adapted.lora_b.weight.abs().sum() > 0
    expected = f.logits(model.eval())
    export = tmp_path / "export" / "step-4"

    with safe_open(str(export / "model.safetensors"), "pt") as handle:
        merged_keys = set(handle.keys())
    assert not any("lora" in k for k in merged_keys)
    assert ("lm_head.weight" in merged_keys) == (family not in f.TIED)
    merged = f.from_export(str(export))
    assert abs(f.logits(merged) - expected).max() < 1e-5

    adapter = export / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == targets
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        keys = sorted(handle.keys())
    assert len(keys) == 2 * len(targets) * 2  # A and B, each target, two layers
    first = "qkv_proj" if family == "phi3" else "q_proj"
    assert f"base_model.model.model.layers.0.self_attn.{first}.lora_A.weight" in keys
    base = f.build(family, seed=0)  # the frozen base is the model as built
    assert abs(f.logits(base.eval()) - expected).max() > 1e-3  # the adapter matters
    with_adapter = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    assert abs(f.logits(with_adapter) - expected).max() < 1e-4


# -- QAT ----------------------------------------------------------------------------


def qat() -> ConverterSet:
    from ckpt_plugins_qat import QATConverter

    options = {"scheme": "int4_weight_only", "group_size": 32, "targets": f.LINEARS.split(",")}
    return ConverterSet([QATConverter(QATConverter.Config(**options))])


def test_qat_compressed_tensors_export_loads_with_the_fake_quantized_logits(tmp_path):
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("ckpt_plugins_qat")
    model, _, want, resumed = trained_and_resumed("qwen3", qat, tmp_path)
    f.assert_identical(resumed, want)
    export = tmp_path / "export" / "step-4"
    config = json.loads((export / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["ignore"] == ["lm_head"]
    assert config["model_type"] == "qwen3"
    with safe_open(str(export / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.self_attn.q_proj.weight_packed" in keys
    assert "model.layers.0.self_attn.q_norm.weight" in keys
    loaded = f.from_export(str(export))
    assert abs(f.logits(loaded) - f.logits(model.eval())).max() < 1e-5


# -- Float8 -------------------------------------------------------------------------


def float8() -> ConverterSet:
    from ckpt_plugins_float8 import Float8Converter

    options = {"emulate": True, "filter_fqns": ["lm_head"]}
    return ConverterSet([Float8Converter(Float8Converter.Config(**options))])


def test_float8_resume_is_bit_identical_and_the_export_keeps_the_master_weights(tmp_path):
    pytest.importorskip("torchao.float8")
    pytest.importorskip("ckpt_plugins_float8")
    from torchao.float8.float8_linear import Float8Linear

    model, _, want, resumed = trained_and_resumed("llama", float8, tmp_path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Float8Linear)
    assert not isinstance(model.lm_head, Float8Linear)
    f.assert_identical(resumed, want)
    loaded = f.from_export(str(tmp_path / "export" / "step-4"))
    got, master = loaded.state_dict(), model.state_dict()
    assert sorted(got) == sorted(master)
    for key in master:
        assert torch.equal(got[key], master[key]), key
