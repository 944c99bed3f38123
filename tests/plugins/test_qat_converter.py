"""The qat converter on the reference Llama: convert, keys, config errors, export view."""

from __future__ import annotations

import pytest
import torch
from ckpt_plugins_qat.adapter import quantization_config
from ckpt_plugins_qat.config import DEFAULT_TARGETS
from ckpt_plugins_qat.schemes import SCHEMES
from torch import nn

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.errors import ConfigError
from ckpt_core.reference import LlamaStateDictAdapter, build_model
from ckpt_plugins_qat import QATConverter

FakeQuantizedLinear = pytest.importorskip("torchao.quantization.qat").FakeQuantizedLinear


def qat(**options) -> QATConverter:
    return QATConverter(QATConverter.Config(**options))


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny")


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_convert_fake_quantizes_the_block_linears_only():
    model = tiny()
    qat(group_size=64).convert(model)
    kinds = {name: type(m) for name, m in model.named_modules()}
    for i in range(2):
        for leaf in ("attention.wq", "attention.wk", "attention.wv", "attention.wo"):
            assert kinds[f"layers.{i}.{leaf}"] is FakeQuantizedLinear
        for leaf in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            assert kinds[f"layers.{i}.{leaf}"] is FakeQuantizedLinear
    assert kinds["output"] is nn.Linear
    assert kinds["tok_embeddings"] is nn.Embedding


def test_checkpoint_keeps_fp32_master_weights_under_the_plain_keys():
    plain = tiny()
    model = tiny()
    converters = ConverterSet([qat(group_size=32)])
    converters.convert(model)
    full = ModelWrapper(model, converters).state_dict("full")
    assert list(full) == list(plain.state_dict())
    assert all(v.dtype == torch.float32 for v in full.values())
    assert ModelWrapper(model, converters).state_dict("base").keys() == full.keys()
    assert not any(converters.key_filter(k) for k in full)


def test_fake_quantized_forward_differs_from_plain_and_trains_through_the_rounding():
    plain, model = tiny(), tiny()
    qat(group_size=32).convert(model)
    x = tokens()
    assert not torch.allclose(plain(x), model(x))
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    grad = model.layers["0"].attention.wq.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # straight-through estimator


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_each_scheme_converts_and_runs(scheme):
    model = tiny()
    qat(scheme=scheme, group_size=32).convert(model)
    wq = model.layers["0"].attention.wq
    assert isinstance(wq, FakeQuantizedLinear)
    assert (wq.activation_fake_quantizer is not None) == SCHEMES[scheme].int8_activations
    assert torch.isfinite(model(tokens())).all()


def test_group_size_that_does_not_divide_in_features_names_the_layer():
    with pytest.raises(ConfigError) as err:
        qat(group_size=96).convert(tiny())
    message = str(err.value)
    assert "layers.0.attention.wq" in message and "128" in message and "group_size" in message


def test_per_channel_scheme_ignores_the_group_size():
    model = tiny()
    qat(scheme="int8_weight_only", group_size=96).convert(model)
    assert isinstance(model.layers["1"].feed_forward.w2, FakeQuantizedLinear)


def test_unknown_target_lists_the_model_linears():
    with pytest.raises(ConfigError) as err:
        qat(targets=["wq", "q_proj"]).convert(tiny())
    assert "'q_proj'" in str(err.value) and "'wo'" in str(err.value)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"targets": ["wq", "output"]}, "output"),
        ({"scheme": "int3"}, "scheme"),
        ({"group_size": 1}, "group_size"),
        ({"targets": []}, "targets"),
        ({"rank": 8}, "unknown option"),
    ],
)
def test_invalid_options_are_config_errors_naming_the_option(options, fragment):
    from pydantic import ValidationError

    from ckpt_core.protocol.plugin_host import format_validation_error

    with pytest.raises(ValidationError) as err:
        QATConverter.Config(**options)
    assert fragment in format_validation_error("qat", err.value)


def test_a_float8_linear_target_is_refused_naming_both_converters_and_the_fix():
    Float8Converter = pytest.importorskip("ckpt_plugins_float8").Float8Converter
    model = tiny()
    Float8Converter(Float8Converter.Config(emulate=True)).convert(model)
    with pytest.raises(ConfigError) as err:
        qat(group_size=32).convert(model)
    message = str(err.value)
    assert "'layers.0.attention.wq' is a Float8Linear" in message
    assert "converters.qat.targets" in message and "converters.float8.filter_fqns" in message


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_export_view_holds_compressed_entries_and_leaves_the_model_alone(scheme):
    model = tiny()
    converters = ConverterSet([qat(scheme=scheme, group_size=32)])
    converters.convert(model)
    wrapper = ModelWrapper(model, converters)
    before = {k: v.clone() for k, v in wrapper.state_dict("full").items()}
    export = wrapper.state_dict("export")
    s = SCHEMES[scheme]
    wq = "layers.0.attention.wq"
    if s.packed:
        assert f"{wq}.weight" not in export
        assert export[f"{wq}.weight_packed"].dtype == torch.int32
        assert export[f"{wq}.weight_packed"].shape == (128, 128 * s.weight_bits // 32)
        assert export[f"{wq}.weight_shape"].tolist() == [128, 128]
        assert export[f"{wq}.weight_shape"].dtype == torch.int64
    else:
        assert export[f"{wq}.weight"].dtype == torch.int8
    groups = 128 // 32 if s.granularity == "group" else 1
    assert export[f"{wq}.weight_scale"].shape == (128, groups)
    assert export[f"{wq}.weight_scale"].dtype == torch.float32
    assert torch.equal(export["output.weight"], before["output.weight"])
    assert torch.equal(export["tok_embeddings.weight"], before["tok_embeddings.weight"])
    after = wrapper.state_dict("full")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_adapter_names_the_compressed_entries_the_hf_way():
    model = tiny()
    converters = ConverterSet([qat(group_size=32)])
    converters.convert(model)
    export = ModelWrapper(model, converters).state_dict("export")
    hf = LlamaStateDictAdapter(model.args).to_hf(export)
    assert "model.layers.0.self_attn.q_proj.weight_packed" in hf
    assert "model.layers.1.mlp.down_proj.weight_scale" in hf
    assert "model.layers.1.mlp.gate_proj.weight_shape" in hf
    assert "lm_head.weight" in hf


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_quantization_config_is_valid_for_compressed_tensors(scheme):
    ct = pytest.importorskip("compressed_tensors.quantization")
    model = tiny()
    converter = qat(scheme=scheme, group_size=64, targets=["wq", "wv"])
    converter.convert(model)
    adapters = ConverterSet([converter]).state_dict_adapters(LlamaStateDictAdapter(model.args))
    adapter = adapters["qat"]
    assert adapter.subfolder is None
    config = adapter.update_hf_config({"model_type": "llama"})
    assert config["model_type"] == "llama"
    q = config["quantization_config"]
    parsed = ct.QuantizationConfig.model_validate(q)
    assert parsed.format == SCHEMES[scheme].ct_format
    assert parsed.quantization_status == "compressed"
    group = parsed.config_groups["group_0"]
    assert group.targets == ["Linear"] and group.weights.symmetric
    assert group.weights.num_bits == SCHEMES[scheme].weight_bits
    assert (group.input_activations is not None) == SCHEMES[scheme].int8_activations
    # untargeted linears stay dense under their HF names
    assert "lm_head" in q["ignore"]
    assert "model.layers.0.self_attn.k_proj" in q["ignore"]
    assert "model.layers.1.mlp.down_proj" in q["ignore"]
    assert "model.layers.0.self_attn.q_proj" not in q["ignore"]


def test_default_quantization_config_ignores_only_lm_head():
    q = quantization_config(SCHEMES["int4_weight_only"], 128, [])
    assert q["ignore"] == ["lm_head"]
    assert q["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert DEFAULT_TARGETS == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def test_learned_scales_are_claimed_and_exported_instead_of_recomputed():
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    model = tiny()
    weight_config = IntxFakeQuantizeConfig(
        torch.int4, group_size=32, is_dynamic=False, range_learning=True, scale_precision=None
    )
    quantize_(
        model,
        QATConfig(weight_config=weight_config, step="prepare"),
        filter_fn=lambda m, fqn: fqn.endswith("attention.wq"),
    )
    from torchao.quantization.qat import initialize_fake_quantizers

    initialize_fake_quantizers(model, (tokens(),))  # makes the scales parameters
    scale_key = "layers.0.attention.wq.weight_fake_quantizer.scale"
    with torch.no_grad():
        model.get_parameter(scale_key).mul_(1.5)  # "learned"
    converters = ConverterSet([qat(group_size=32, targets=["wq"])])
    wrapper = ModelWrapper(model, converters)
    assert scale_key in wrapper.state_dict("full")
    assert converters.key_filter(scale_key)
    assert scale_key not in wrapper.state_dict("base")
    export = wrapper.state_dict("export")
    assert scale_key not in export
    learned = model.get_parameter(scale_key).detach()
    assert torch.equal(export["layers.0.attention.wq.weight_scale"], learned)
