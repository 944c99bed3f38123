"""Quantizing exports write a compressed-tensors quantization_config as complete as
llm-compressor's, and compressed-tensors' own pydantic models validate it."""

from __future__ import annotations

import json

import pytest
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.content.families import model_family
from ckpt_core.content.quantization_config import FORMAT_VERSION, STATIC_OBSERVER
from ckpt_core.policy.exporter import write_export

TOP_LEVEL = {
    "version",
    "quant_method",
    "format",
    "quantization_status",
    "config_groups",
    "ignore",
    "kv_cache_scheme",
    "global_compression_ratio",
    "sparsity_config",
    "transform_config",
    "moe_sparsity_config",
}
PER_ARGS = {
    "num_bits",
    "type",
    "symmetric",
    "group_size",
    "strategy",
    "block_structure",
    "dynamic",
    "actorder",
    "scale_dtype",
    "zp_dtype",
    "observer",
    "observer_kwargs",
}

CASES = {
    "qat-int4": (["qat"], {}),
    "qat-int8-activations": (["qat"], {"qat": {"scheme": "int8_dynamic_act_int4_weight"}}),
    "float8-fp8": (["float8"], {"float8": {"emulate": True, "export": "fp8"}}),
    "qat+float8": (
        ["qat", "float8"],
        {
            "qat": {"targets": ["wq", "wk", "wv", "wo"]},
            "float8": {"emulate": True, "export": "fp8", "filter_fqns": ["attention", "output"]},
        },
    ),
}


def exported_quantization_config(tmp_path, enabled, options) -> dict:
    family = model_family("llama")
    config = family.config_for("tiny")
    model = family.build_model(config)
    convs = ConverterSet.from_config(enabled, options)
    convs.convert(model)
    write_export(
        ModelWrapper(model, convs),
        str(tmp_path / "export"),
        fmt="hf",
        dtype="bfloat16",
        sd_adapter=family.adapter(config),
        converters=convs,
    )
    return json.loads((tmp_path / "export" / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_export_quantization_config_has_llm_compressors_fields_and_validates(case, tmp_path):
    qc = exported_quantization_config(tmp_path, *CASES[case])
    assert set(qc) == TOP_LEVEL
    assert qc["version"] == FORMAT_VERSION
    assert qc["sparsity_config"] == {} and qc["transform_config"] == {}
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.quantization_status == "compressed" and parsed.format == qc["format"]
    for name, scheme in qc["config_groups"].items():
        assert set(scheme) == {
            "targets",
            "weights",
            "input_activations",
            "output_activations",
            "format",
        }, name
        for role in ("weights", "input_activations"):
            args = scheme[role]
            if args is None:
                continue
            assert set(args) == PER_ARGS, (name, role)
            assert args["observer"] == (None if args["dynamic"] else STATIC_OBSERVER)
            QuantizationArgs.model_validate(args)
        assert parsed.config_groups[name].weights.num_bits == scheme["weights"]["num_bits"]
