"""LoRA, QAT and Float8 on the reference MoE: what each does with stacked experts and routers.

Each case converts the ``moe:tiny`` model, trains it a few steps, exports it
through ``write_export`` and loads the export with transformers (PEFT for the
LoRA adapter), whose logits must equal the native forward in fp32.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.content.families import model_family
from ckpt_core.errors import ConfigError
from ckpt_core.policy.exporter import write_export
from tests.core._qwen3_hf import native_from_hf_folder
from tests.plugins.lora_support import randomize_adapters

transformers = pytest.importorskip("transformers")


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def _moe(seed: int = 0):
    family = model_family("moe")
    config = family.config_for("tiny")
    torch.manual_seed(seed)
    return family.build_model(config), family.adapter(config)


def _train(model, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        x = _tokens(100 + step)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _export(model, adapter, converters, path) -> str:
    write_export(
        ModelWrapper(model, converters),
        str(path),
        fmt="hf",
        dtype="float32",
        sd_adapter=adapter,
        converters=converters,
        step=1,
    )
    return str(path)


def _hf_logits(path: str, x: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=x, use_cache=False).logits


def _converters(name: str, **options) -> ConverterSet:
    return ConverterSet.from_config([name], {name: options} if options else {})


def test_qat_fake_quantizes_the_experts_and_the_compressed_export_loads_in_transformers(
    tmp_path, caplog
):
    model, adapter = _moe()
    converters = _converters("qat")
    with caplog.at_level(logging.INFO):
        converters.convert(model)
    assert "8 linears and 6 stacked expert weights" in caplog.text
    experts = model.layers["0"].moe.experts
    quantized = experts.expert_weight_transforms["w1"](experts.w1.detach())
    assert not torch.equal(quantized, experts.w1) and len(torch.unique(quantized[0, 0])) <= 16
    _train(model)
    path = _export(model, adapter, converters, tmp_path / "qat")
    config = json.loads((tmp_path / "qat" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.gate" in config["ignore"]  # the router stays high precision
    x = _tokens()
    with torch.no_grad():
        native = model.eval()(x)
    assert (_hf_logits(path, x) - native).abs().max().item() < 1e-4


def test_qat_refuses_a_router_target_and_skips_experts_with_activation_quantization(caplog):
    model, _ = _moe()
    with pytest.raises(ConfigError, match="names the MoE router 'layers.0.moe.router.gate'"):
        _converters("qat", targets=["wq", "gate"]).convert(model)
    model, _ = _moe()
    converters = _converters("qat", scheme="int8_dynamic_act_int4_weight")
    with caplog.at_level(logging.INFO):
        converters.convert(model)
    assert "quantizes linear inputs too" in caplog.text
    assert model.layers["0"].moe.experts.expert_weight_transforms == {}
    export = converters.state_dict_transform(dict(model.state_dict()))
    assert torch.equal(export["layers.0.moe.experts.w1"], model.layers["0"].moe.experts.w1)
    with pytest.raises(ConfigError, match="name only stacked MoE expert weights"):
        _converters("qat", scheme="int8_dynamic_act_int4_weight", targets=["w1"]).convert(_moe()[0])


def test_lora_adapts_the_attention_only_and_its_merged_and_peft_exports_load(tmp_path, caplog):
    peft = pytest.importorskip("peft")
    model, adapter = _moe()
    base = _export(model, adapter, None, tmp_path / "base")
    converters = _converters("lora")
    with caplog.at_level(logging.INFO):
        converters.convert(model)
    assert "name stacked MoE expert weights (not nn.Linear) here" in caplog.text
    lora = converters["lora"]
    assert {m.rsplit(".", 1)[-1] for m in lora.modules} == {"wq", "wk", "wv", "wo"}
    assert not model.layers["0"].moe.experts.w1.requires_grad
    randomize_adapters(model)
    path = _export(model, adapter, converters, tmp_path / "lora")
    x = _tokens()
    with torch.no_grad():
        native = model.eval()(x)
    assert (_hf_logits(path, x) - native).abs().max().item() < 1e-4
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(hf_base, f"{path}/adapter").eval()
    with torch.no_grad():
        got = with_adapter(input_ids=x).logits
    assert (got - native).abs().max().item() < 1e-4
    with pytest.raises(ConfigError, match="name only stacked MoE expert weights"):
        _converters("lora", target_modules=["w1", "w3"]).convert(_moe()[0])


def test_float8_leaves_the_routers_and_experts_in_high_precision(tmp_path):
    pytest.importorskip("torchao")
    model, adapter = _moe()
    converters = _converters("float8", emulate=True)
    converters.convert(model)
    float8 = converters["float8"]
    assert float8.skipped["layers.1.moe.router.gate"].startswith("MoE router")
    assert "layers.0.attention.wq" in float8.converted
    assert type(model.layers["0"].moe.router.gate) is torch.nn.Linear
    _train(model, steps=2)
    path = _export(model, adapter, converters, tmp_path / "float8")
    # The export holds the high-precision master weights (float8 lives only in the matmuls):
    # the same model without float8, loaded from it, computes what transformers computes.
    plain, _ = native_from_hf_folder(path, "moe")
    got = {k: v for k, v in plain.state_dict().items()}
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    x = _tokens()
    with torch.no_grad():
        assert (_hf_logits(path, x) - plain(x)).abs().max().item() < 1e-4
