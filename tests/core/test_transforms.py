"""StateDictTransforms: the dtype cast rule and the routing of keys to adapters."""

from __future__ import annotations

import pytest
import torch

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.content.transforms import StateDictTransforms, cast_state_dict, parse_dtype
from ckpt_core.errors import ConfigError
from ckpt_core.reference import LlamaStateDictAdapter, build_model
from tests.core._export_converters import IntCodesConverter, SidecarConverter


def test_cast_touches_floating_tensors_only_and_every_one_that_differs():
    sd = {
        "f32": torch.randn(3),
        "f16": torch.randn(3).half(),
        "bf16": torch.randn(3).bfloat16(),
        "i8": torch.tensor([1, -2, 3], dtype=torch.int8),
        "i64": torch.tensor([7]),
        "fp8": torch.randn(3).to(torch.float8_e4m3fn),
        "flag": torch.tensor([True]),
    }
    out = cast_state_dict(sd, torch.bfloat16)
    assert {k: v.dtype for k, v in out.items()} == {
        "f32": torch.bfloat16,
        "f16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "i8": torch.int8,
        "i64": torch.int64,
        "fp8": torch.float8_e4m3fn,
        "flag": torch.bool,
    }
    assert out["i8"] is sd["i8"] and out["bf16"] is sd["bf16"]
    assert torch.equal(out["f32"], sd["f32"].bfloat16())


def test_a_float32_export_of_bfloat16_tensors_is_float32():
    out = cast_state_dict({"w": torch.randn(4).bfloat16()}, parse_dtype("float32"))
    assert out["w"].dtype == torch.float32


def test_no_export_dtype_keeps_every_dtype():
    sd = {"w": torch.randn(2).bfloat16(), "v": torch.randn(2)}
    assert {k: v.dtype for k, v in cast_state_dict(sd, None).items()} == {
        "w": torch.bfloat16,
        "v": torch.float32,
    }


def test_unknown_export_dtype_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="bfloat16"):
        parse_dtype("int4")


def test_to_hf_routes_keys_to_the_owning_converters_adapter():
    model = build_model("tiny")
    converters = ConverterSet([IntCodesConverter(), SidecarConverter()])
    converters.convert(model)
    wrapper = ModelWrapper(model, converters)
    transforms = StateDictTransforms(LlamaStateDictAdapter(model.args), converters)
    groups = transforms.export_groups(wrapper)
    main, side = groups
    assert main.subfolder is None and side.subfolder == "adapter"
    assert "model.layers.0.self_attn.q_proj.codes" in main.tensors
    assert main.tensors["model.layers.0.self_attn.q_proj.codes"].dtype == torch.int8
    assert not any("sidecar" in k for k in main.tensors)
    full = wrapper.state_dict("full")
    for layer in (0, 1):
        hf = f"base_model.model.model.layers.{layer}.self_attn.q_proj.sidecar.weight"
        native = full[f"layers.{layer}.attention.wq.sidecar.weight"]
        assert side.tensors[hf].data_ptr() == native.data_ptr()  # the live, unmerged tensor
    assert len(side.tensors) == 2
    config = transforms.hf_config(torch.bfloat16, groups)
    assert config["codes_config"] == {"bits": 8} and config["dtype"] == "bfloat16"


def test_hf_export_without_a_model_adapter_is_a_config_error():
    wrapper = ModelWrapper(build_model("tiny"))
    with pytest.raises(ConfigError, match="sd_adapter"):
        StateDictTransforms(None).export_groups(wrapper)
