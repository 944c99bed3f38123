"""QAT exports through ``write_export``, loaded by transformers (compressed-tensors, on CPU).

Prepare → train a few steps → export: transformers decompresses the
compressed-tensors weights and its logits equal, in fp32, the fake-quantized
forward of the trained master weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from ckpt_plugins_qat.schemes import SCHEMES
from safetensors import safe_open

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.reference import LlamaStateDictAdapter, build_model
from ckpt_plugins_qat import QATConverter

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")
write_export = pytest.importorskip("ckpt_core.policy.exporter").write_export

GROUP = 32
WQ_HF = "model.layers.0.self_attn.q_proj"


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def train(model: torch.nn.Module, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        x = tokens(100 + step)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def prepared(converter_list: list, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("tiny")
    converters = ConverterSet(converter_list)
    converters.convert(model)
    return model, converters


def export(model, converters, path: Path, dtype: str) -> Path:
    write_export(
        ModelWrapper(model, converters),
        str(path),
        fmt="hf",
        dtype=dtype,
        sd_adapter=LlamaStateDictAdapter(model.args),
        converters=converters,
        step=3,
    )
    return path


def load_logits(path: Path, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    # transformers only warns about missing / unexpected keys: make them failures
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    finally:
        tf_logger.removeHandler(handler)
    bad = [r.getMessage() for r in records if "missing" in r.getMessage().lower()]
    bad += [r.getMessage() for r in records if "unexpected" in r.getMessage().lower()]
    assert not bad, bad
    with torch.no_grad():
        return hf(x).logits.float()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_transformers_loads_the_fp32_export_with_the_fake_quantized_logits(scheme, tmp_path):
    model, converters = prepared(
        [QATConverter(QATConverter.Config(scheme=scheme, group_size=GROUP))]
    )
    train(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x)  # fake-quantized forward of the trained master weights
    path = export(model, converters, tmp_path / "step-3", "float32")

    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    assert q["format"] == SCHEMES[scheme].ct_format
    assert q["quantization_status"] == "compressed"
    assert q["ignore"] == ["lm_head"]
    stored = tensors(path)
    if SCHEMES[scheme].packed:
        assert stored[f"{WQ_HF}.weight_packed"].dtype == torch.int32
        assert stored[f"{WQ_HF}.weight_shape"].tolist() == [128, 128]
        assert f"{WQ_HF}.weight" not in stored
    else:
        assert stored[f"{WQ_HF}.weight"].dtype == torch.int8
    assert stored[f"{WQ_HF}.weight_scale"].dtype == torch.float32
    assert stored["lm_head.weight"].dtype == torch.float32

    got = load_logits(path, torch.float32, x)
    diff = (got - expected).abs().max().item()
    if SCHEMES[scheme].int8_activations:
        # compressed-tensors quantizes activations by division, torchao by reciprocal:
        # a rare tie may round apart; the weights themselves are exact.
        assert diff < 1e-3, diff
    else:
        assert diff < 1e-5, diff


def test_bf16_export_stores_the_same_integers_and_stays_within_quantization_noise(tmp_path):
    model, converters = prepared([QATConverter(QATConverter.Config(group_size=GROUP))])
    train(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    fp32 = export(model, converters, tmp_path / "fp32", "float32")
    bf16 = export(model, converters, tmp_path / "bf16", "bfloat16")
    a, b = tensors(fp32), tensors(bf16)
    assert a.keys() == b.keys()
    assert torch.equal(a[f"{WQ_HF}.weight_packed"], b[f"{WQ_HF}.weight_packed"])
    assert b[f"{WQ_HF}.weight_scale"].dtype == torch.bfloat16
    assert b[f"{WQ_HF}.weight_shape"].dtype == torch.int64

    got = load_logits(bf16, torch.bfloat16, x)
    noise = (got - expected).abs().max().item()
    # scales rounded to bf16 (2^-9 relative) and bf16 matmuls; int4 steps are ~2^-3 relative
    assert noise < 2e-2 * expected.abs().max().item() + 1e-3, noise


def test_qat_then_lora_export_merges_first_then_quantizes(tmp_path):
    lora = pytest.importorskip("ckpt_plugins_lora")
    qat = QATConverter(QATConverter.Config(group_size=GROUP))
    adapter = lora.LoRAConverter(lora.LoRAConverter.Config(rank=4, alpha=8, export="merged"))
    model, converters = prepared([qat, adapter])
    train(model, steps=4)
    b = model.layers["0"].attention.wq.lora_b.weight
    assert b.abs().sum() > 0  # the adapters learned something to merge

    # Reference: the merged weights, fake-quantized (what QAT on the merged model computes).
    merged = ConverterSet([adapter]).state_dict_transform(ModelWrapper(model).state_dict("full"))
    torch.manual_seed(0)
    reference = build_model("tiny")
    ConverterSet([QATConverter(QATConverter.Config(group_size=GROUP))]).convert(reference)
    reference.load_state_dict(merged)
    x = tokens()
    with torch.no_grad():
        expected = reference(x)

    path = export(model, converters, tmp_path / "step-3", "float32")
    stored = tensors(path)
    assert not any("lora" in k for k in stored)
    got = load_logits(path, torch.float32, x)
    assert (got - expected).abs().max().item() < 1e-5


def test_dcp_export_holds_the_same_compressed_entries_as_the_hf_export(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model, converters = prepared([QATConverter(QATConverter.Config(group_size=GROUP))])
    hf = tensors(export(model, converters, tmp_path / "hf", "float32"))
    write_export(
        ModelWrapper(model, converters),
        str(tmp_path / "dcp"),
        fmt="dcp",
        dtype="float32",
        sd_adapter=LlamaStateDictAdapter(model.args),
        converters=converters,
    )
    dcp_to_torch_save(str(tmp_path / "dcp"), str(tmp_path / "dcp.pt"))
    native = torch.load(tmp_path / "dcp.pt", weights_only=True)["model"]
    packed = native["layers.0.attention.wq.weight_packed"]
    assert packed.dtype == torch.int32
    assert torch.equal(packed, hf[f"{WQ_HF}.weight_packed"])
    assert "layers.0.attention.wq.weight" not in native


def test_qat_fine_tune_starts_from_a_plain_hf_checkpoint(tmp_path):
    from ckpt_core.policy.exporter import load_hf

    torch.manual_seed(3)
    source = build_model("tiny")
    export(source, ConverterSet([]), tmp_path / "base", "float32")
    model, converters = prepared([QATConverter(QATConverter.Config(group_size=GROUP))], seed=4)
    load_hf(
        ModelWrapper(model, converters),
        str(tmp_path / "base"),
        fmt="hf",
        sd_adapter=LlamaStateDictAdapter(model.args),
        converters=converters,
    )
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
