"""QAT and Float8 on different linears: one mixed-precision export transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.errors import PluginError
from ckpt_core.policy.exporter import write_export
from ckpt_core.reference import build_model
from ckpt_core.reference.adapter import LlamaStateDictAdapter

pytest.importorskip("torchao.float8")
pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from tests.plugins.test_qat_export_hf import load_logits  # noqa: E402

QAT_TARGETS = ["wq", "w2"]  # q_proj and down_proj quantized by QAT, the rest by float8


def converters(order: list[str], scheme: str) -> ConverterSet:
    options = {
        "qat": {"targets": QAT_TARGETS, "group_size": 32, "scheme": scheme},
        "float8": {"emulate": True, "export": "fp8", "filter_fqns": ["output", *QAT_TARGETS]},
    }
    return ConverterSet.from_config(order, options)


def trained(order: list[str], scheme: str):
    torch.manual_seed(0)
    model = build_model("tiny")
    convs = converters(order, scheme)
    convs.convert(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        convs.post_optimizer_step([model])
    return model, convs, tokens


def export(model, convs, path: Path) -> Path:
    write_export(
        ModelWrapper(model, convs),
        str(path),
        fmt="hf",
        dtype="float32",
        sd_adapter=LlamaStateDictAdapter(model.args),
        converters=convs,
        step=3,
    )
    return path


@pytest.mark.parametrize("scheme", ["int4_weight_only", "int8_dynamic_act_int4_weight"])
@pytest.mark.parametrize("order", [["qat", "float8"], ["float8", "qat"]])
def test_qat_and_fp8_linears_load_in_transformers_with_the_training_logits(
    order, scheme, tmp_path
):
    model, convs, tokens = trained(order, scheme)
    out = export(model, convs, tmp_path / "step-3")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    by_format = {g["format"]: g["targets"] for g in qc["config_groups"].values()}
    qat_format = "pack-quantized" if scheme == "int4_weight_only" else "int-quantized"
    assert set(by_format) == {qat_format, "float-quantized"}
    assert len(by_format[qat_format]) == 4  # q_proj, down_proj of 2 layers
    assert "model.layers.1.mlp.down_proj" in by_format[qat_format]
    assert len(by_format["float-quantized"]) == 10
    assert "model.layers.0.self_attn.k_proj" in by_format["float-quantized"]
    assert qc["ignore"] == ["lm_head"]

    x = tokens[:, :-1]
    got = load_logits(out, torch.float32, x)  # missing / unexpected keys fail here
    with torch.no_grad():
        want = model(x)
        plain = build_model("tiny")
        ModelWrapper(plain).load_state_dict(ModelWrapper(model, convs).state_dict("base"))
        unquantized = plain(x)
    assert (got - want).abs().max().item() < 1e-4
    # Both quantizations are really in the loaded model, not just loadable.
    assert (unquantized - want).abs().max().item() > 1e-3


def test_linears_claimed_by_both_configs_are_refused(tmp_path):
    # Simulates a third-party quantizer that leaves a QAT linear out of its ignore list.
    model, convs, _ = trained(["qat", "float8"], "int4_weight_only")
    convs["float8"].converted["layers.0.attention.wq"] = (64, 64)
    with pytest.raises(PluginError, match="q_proj"):
        convs["float8"].state_dict_adapter(LlamaStateDictAdapter(model.args)).update_hf_config(
            convs["qat"].state_dict_adapter(LlamaStateDictAdapter(model.args)).update_hf_config(
                {}
            )
        )
