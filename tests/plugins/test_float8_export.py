"""Float8 ``export = "fp8"``: torchao's exact cast, compressed-tensors format, transformers load."""

from __future__ import annotations

import json

import pytest
import torch
from ckpt_plugins_float8.fp8_export import (
    dequantize_weight,
    quantization_config,
    quantize_weight,
)
from safetensors import safe_open

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.policy.exporter import write_export
from ckpt_core.reference import adapter_for, build_model
from ckpt_plugins_float8 import Float8Converter

pytest.importorskip("torchao.float8")
from torchao.float8.config import ScalingGranularity  # noqa: E402
from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic  # noqa: E402
from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig  # noqa: E402
from torchao.float8.float8_utils import tensor_to_scale  # noqa: E402


def trained(recipe: str, export: str = "fp8", steps: int = 3):
    torch.manual_seed(0)
    model = build_model("tiny")
    convs = ConverterSet(
        [Float8Converter(Float8Converter.Config(recipe=recipe, export=export, emulate=True))]
    )
    convs.convert(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 17), generator=gen)
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, convs, tokens


# -- the cast ------------------------------------------------------------------


def torchao_weight_cast(weight: torch.Tensor, recipe: str):
    """What torchao's training forward casts a weight to (it casts ``weight.t()``)."""
    rowwise = recipe == "rowwise"
    fp8 = hp_tensor_to_float8_dynamic(
        weight.t(),
        torch.float8_e4m3fn,
        LinearMMConfig(),
        gemm_input_role=GemmInputRole.WEIGHT,
        scaling_granularity=(
            ScalingGranularity.AXISWISE if rowwise else ScalingGranularity.TENSORWISE
        ),
        axiswise_dim=0 if rowwise else None,
        round_scales_to_power_of_2=rowwise,
    )
    return fp8._data.t(), fp8._scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_weights_are_the_bits_of_torchaos_training_cast(recipe, dtype):
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(96, 64, generator=gen) * torch.logspace(-3, 1, 64)).to(dtype)
    weight[5, 7] = 1e-9  # tiny values, and one row of zeros (amax clamped to eps)
    weight[11] = 0
    bits, weight_scale = quantize_weight(weight, recipe)
    want_bits, want_scale = torchao_weight_cast(weight, recipe)
    assert bits.dtype == torch.float8_e4m3fn and weight_scale.dtype == torch.float32
    assert torch.equal(bits.view(torch.uint8), want_bits.view(torch.uint8))
    if recipe == "tensorwise":
        assert weight_scale.shape == (1,)
        assert torch.equal(weight_scale, torch.reciprocal(want_scale).reshape(1))
    else:
        assert weight_scale.shape == (96, 1)
        assert torch.equal(weight_scale, torch.reciprocal(want_scale).t())
        assert torch.equal(torch.exp2(torch.log2(weight_scale).round()), weight_scale)


def test_fp8_cast_saturates_like_torchao():
    weight = torch.tensor([[1.0, -3.0] + [0.5] * 14] * 16)
    bits, scale = quantize_weight(weight, "tensorwise")
    assert bits.float().abs().max().item() == 448.0
    scale_torchao = tensor_to_scale(weight, torch.float8_e4m3fn)
    assert torch.equal(scale, torch.reciprocal(scale_torchao).reshape(1))


# -- the views -----------------------------------------------------------------


def test_high_precision_export_view_is_the_full_view():
    model, convs, _ = trained("tensorwise", export="high_precision")
    wrapper = ModelWrapper(model, convs)
    full, export = wrapper.state_dict("full"), wrapper.state_dict("export")
    assert list(full) == list(export)
    for key, value in full.items():
        assert export[key].dtype == value.dtype and torch.equal(export[key], value), key
    assert convs.state_dict_adapters() == {}


def test_fp8_export_view_quantizes_converted_linears_only_and_leaves_the_model_alone():
    model, convs, _ = trained("tensorwise")
    wrapper = ModelWrapper(model, convs)
    before = {k: v.clone() for k, v in wrapper.state_dict("full").items()}
    export = wrapper.state_dict("export")
    converted = convs["float8"].converted
    for name in converted:
        assert export[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert export[f"{name}.weight_scale"].shape == (1,)
    assert export["output.weight"].dtype == torch.float32
    assert export["tok_embeddings.weight"].dtype == torch.float32
    assert "output.weight_scale" not in export
    assert set(export) == set(before) | {f"{n}.weight_scale" for n in converted}
    after = wrapper.state_dict("full")
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_fp8_export_without_convert_is_a_plugin_error_naming_the_fix():
    from ckpt_core.errors import PluginError

    convs = ConverterSet([Float8Converter(Float8Converter.Config(export="fp8", emulate=True))])
    with pytest.raises(PluginError, match="convert"):
        ModelWrapper(build_model("tiny"), convs).state_dict("export")


def test_fp8_export_of_weights_converted_under_other_names_is_a_plugin_error():
    from ckpt_core.errors import PluginError

    torch.manual_seed(0)
    model = build_model("tiny")
    convs = ConverterSet([Float8Converter(Float8Converter.Config(export="fp8", emulate=True))])
    for block in model.layers.values():  # names recorded relative to each block
        convs.convert(block)
    with pytest.raises(PluginError, match=r"7 of their weights.*'attention\.wq\.weight'"):
        ModelWrapper(model, convs).state_dict("export")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_quantization_config_is_valid_compressed_tensors(recipe):
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(quantization_config(recipe, ["lm_head"]))
    group = parsed.config_groups["group_0"]
    want = {"tensorwise": ("tensor", "tensor"), "rowwise": ("channel", "token")}[recipe]
    value = lambda x: getattr(x, "value", x)  # noqa: E731
    assert (value(group.weights.strategy), value(group.input_activations.strategy)) == want
    assert value(group.weights.type) == "float" and group.weights.num_bits == 8
    assert not group.weights.dynamic and group.input_activations.dynamic
    assert parsed.format == "float-quantized" and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"]


def test_adapter_ignores_lm_head_and_skipped_linears_under_hf_names():
    model = build_model("tiny")
    conv = Float8Converter(
        Float8Converter.Config(export="fp8", emulate=True, filter_fqns=["output", "w2"])
    )
    convs = ConverterSet([conv])
    convs.convert(model)
    (adapter,) = convs.state_dict_adapters(adapter_for(model)).values()
    assert adapter.subfolder is None
    ignore = adapter.update_hf_config({"model_type": "llama"})["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


# -- the files -----------------------------------------------------------------


def export_hf(model, convs, path, dtype: str) -> str:
    out = str(path / "step-3")
    write_export(
        ModelWrapper(model, convs),
        out,
        fmt="hf",
        dtype=dtype,
        sd_adapter=adapter_for(model),
        converters=convs,
        step=3,
    )
    return out


def load_transformers(path: str):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_fp8_export_loads_in_transformers_with_logits_of_the_float8_training_forward(tmp_path):
    model, convs, tokens = trained("tensorwise")
    out = export_hf(model, convs, tmp_path, "float32")
    config = json.loads((tmp_path / "step-3" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").shape == (1,)
    hf = load_transformers(out)
    with torch.no_grad():
        want = model(tokens)
        got = hf(tokens).logits
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, diff


def test_rowwise_fp8_export_loads_in_transformers_close_to_the_float8_forward(tmp_path):
    # torchao rounds rowwise activation scales down to powers of two, compressed-tensors'
    # dynamic per-token scales are amax / 448: activations round differently, weights are
    # bit-identical. Measured on this tiny model: max |logit diff| ~3e-2 for logits up to ~2.
    model, convs, tokens = trained("rowwise")
    out = export_hf(model, convs, tmp_path, "float32")
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight_scale").shape == (256, 1)
    hf = load_transformers(out)
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)).abs().max().item()
    assert diff < 0.1, diff


def test_bfloat16_fp8_export_keeps_float8_weights_and_casts_the_rest(tmp_path):
    model, convs, tokens = trained("tensorwise")
    out = export_hf(model, convs, tmp_path, "bfloat16")
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        fp8 = f.get_tensor("model.layers.1.self_attn.o_proj.weight")
    assert dtypes["model.layers.1.self_attn.o_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.1.self_attn.o_proj.weight_scale"] == "BF16"
    assert dtypes["lm_head.weight"] == "BF16" and dtypes["model.norm.weight"] == "BF16"
    bits, _ = quantize_weight(model.layers["1"].attention.wo.weight, "tensorwise")
    assert torch.equal(fp8.view(torch.uint8), bits.view(torch.uint8))
    hf = load_transformers(out)
    with torch.no_grad():
        diff = (hf(tokens).logits.float() - model(tokens)).abs().max().item()
    assert diff < 0.1, diff


def test_fp8_export_quantizes_the_lora_merged_weight_when_lora_wraps_float8():
    pytest.importorskip("ckpt_plugins_lora")
    torch.manual_seed(0)
    model = build_model("tiny")
    convs = ConverterSet.from_config(
        ["float8", "lora"], {"float8": {"export": "fp8", "emulate": True}, "lora": {"rank": 4}}
    )
    convs.convert(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(std=0.05)
    full = ModelWrapper(model, convs).state_dict("full")
    merged = ConverterSet([convs["lora"]]).state_dict_transform(dict(full))
    export = ModelWrapper(model, convs).state_dict("export")
    key = "layers.1.attention.wq.weight"
    assert not torch.equal(merged[key], full[key])  # the adapter changed the weight
    bits, scale = quantize_weight(merged[key], "tensorwise")
    assert torch.equal(export[key].view(torch.uint8), bits.view(torch.uint8))
    assert torch.equal(export[key + "_scale"], scale)
    assert not any("lora" in k for k in export)


def test_fp8_export_read_as_plain_hf_is_refused_instead_of_loading_raw_float8(tmp_path):
    from ckpt_core.errors import CheckpointError
    from ckpt_core.policy.exporter import load_hf

    model, convs, _ = trained("tensorwise", steps=1)
    out = export_hf(model, convs, tmp_path, "float32")
    fresh = build_model("tiny")
    with pytest.raises(CheckpointError, match="hf_quantized"):
        load_hf(ModelWrapper(fresh), out, fmt="hf", sd_adapter=adapter_for(fresh))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_export_starts_a_run_as_hf_quantized_with_dequantized_weights(recipe, tmp_path):
    from ckpt_core.policy.exporter import load_hf

    model, convs, _ = trained(recipe, steps=1)
    out = export_hf(model, convs, tmp_path, "float32")
    export = ModelWrapper(model, convs).state_dict("export")
    fresh = build_model("tiny")
    load_hf(ModelWrapper(fresh), out, fmt="hf_quantized", sd_adapter=adapter_for(fresh))
    loaded = ModelWrapper(fresh).state_dict("full")
    for key, value in loaded.items():
        if export[key].dtype == torch.float8_e4m3fn:
            want = dequantize_weight(export[key], export[key + "_scale"], torch.float32)
        else:
            want = export[key]
        assert torch.equal(value, want), key
    wq = "layers.0.attention.wq.weight"
    assert 0 < (loaded[wq] - model.get_parameter(wq)).abs().max() < 0.01
