"""Composing two quantizing converters' compressed-tensors ``quantization_config``."""

from __future__ import annotations

import pytest

from ckpt_core.content.quantization_config import (
    add_quantization_config,
    complete_quantization_config,
)
from ckpt_core.errors import PluginError

LINEARS = ["m.0.q_proj", "m.0.k_proj", "m.0.down_proj", "m.1.q_proj", "m.1.k_proj"]


def qc(fmt: str, kind: str, quantized: list[str]) -> dict:
    ignore = ["lm_head"] + [n for n in LINEARS if n not in quantized]
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"type": kind}, "format": fmt}
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def test_the_first_config_is_stored_completed_and_the_input_is_left_alone():
    config = {"model_type": "llama"}
    first = qc("pack-quantized", "int", ["m.0.q_proj"])
    out = add_quantization_config(config, first, ["m.0.q_proj"], owner="qat")
    assert out["quantization_config"] == complete_quantization_config(first)
    stored = out["quantization_config"]
    assert {k: stored[k] for k in first if k != "config_groups"} == {
        k: v for k, v in first.items() if k != "config_groups"
    }
    assert "quantization_config" not in config
    out["quantization_config"]["ignore"].append("x")
    assert "x" not in first["ignore"]


def test_two_configs_merge_into_explicit_groups_with_a_mixed_precision_format():
    ints = ["m.0.q_proj", "m.1.q_proj"]
    floats = ["m.0.k_proj", "m.1.k_proj"]
    config = add_quantization_config({}, qc("pack-quantized", "int", ints), ints, owner="qat")
    out = add_quantization_config(
        config, qc("float-quantized", "float", floats), floats, owner="float8"
    )
    merged = out["quantization_config"]
    groups = merged["config_groups"]
    assert list(groups) == ["group_0", "group_1"]
    assert sorted(groups["group_0"]["targets"]) == sorted(ints)
    assert groups["group_0"]["weights"]["type"] == "int"
    assert groups["group_1"]["targets"] == floats
    assert groups["group_1"]["format"] == "float-quantized"
    assert merged["format"] == "mixed-precision"
    # Neither quantized lm_head and down_proj: they alone stay ignored.
    assert merged["ignore"] == ["lm_head", "m.0.down_proj"]
    assert config["quantization_config"]["config_groups"]["group_0"]["targets"] == ["Linear"]


def test_groups_of_one_format_keep_that_format():
    a, b = ["m.0.q_proj"], ["m.1.q_proj"]
    config = add_quantization_config({}, qc("float-quantized", "float", a), a, owner="x")
    out = add_quantization_config(config, qc("float-quantized", "float", b), b, owner="y")
    assert out["quantization_config"]["format"] == "float-quantized"


def test_a_linear_both_converters_quantize_is_an_error_naming_it():
    a, b = ["m.0.q_proj", "m.0.k_proj"], ["m.0.k_proj"]
    config = add_quantization_config({}, qc("pack-quantized", "int", a), a, owner="qat")
    with pytest.raises(PluginError, match=r"'float8'.*m\.0\.k_proj.*one quantization scheme"):
        add_quantization_config(config, qc("float-quantized", "float", b), b, owner="float8")


def test_a_config_of_another_quant_method_is_refused():
    b = ["m.1.q_proj"]
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    with pytest.raises(PluginError, match="quant_method is 'fp8'"):
        add_quantization_config(config, qc("float-quantized", "float", b), b, owner="float8")
    assert config["quantization_config"] == {"quant_method": "fp8", "weight_block_size": [128, 128]}


def test_a_group_without_its_own_format_takes_its_configs_format_when_merged():
    # llm-compressor writes the format once, at the top, and none in the groups.
    ints, floats = ["m.0.q_proj"], ["m.0.k_proj"]
    first = qc("pack-quantized", "int", ints)
    del first["config_groups"]["group_0"]["format"]
    second = qc("float-quantized", "float", floats)
    del second["config_groups"]["group_0"]["format"]
    config = add_quantization_config({}, first, ints, owner="qat")
    merged = add_quantization_config(config, second, floats, owner="float8")["quantization_config"]
    groups = merged["config_groups"]
    assert groups["group_0"]["format"] == "pack-quantized"
    assert groups["group_1"]["format"] == "float-quantized"
    assert merged["format"] == "mixed-precision"
