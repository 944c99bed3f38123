"""LoRA end to end with the real consumers: transformers loads the merged export,
peft loads the adapter folder, and a PEFT adapter starts a native run.

A small random HF Llama is built and saved with transformers' own code; the
native run is the reference Llama loaded from that folder.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ckpt_core import CheckpointError, ConverterSet, ModelWrapper
from ckpt_core.policy.exporter import load_additional, write_export
from ckpt_core.reference import LlamaStateDictAdapter, from_pretrained
from ckpt_plugins_lora import LoRAConfig, LoRAConverter
from tests.plugins.lora_support import save_tiny_hf_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 96
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
HF_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> str:
    """A random HF Llama saved by transformers (fp32)."""
    return save_tiny_hf_llama(str(tmp_path_factory.mktemp("hf") / "base"), VOCAB, perturb=True)


class LoadReport:
    """Warnings and log records about missing/unexpected keys, to be treated as failures."""

    WORDS = ("missing", "unexpected", "not used", "newly initialized", "mismatch")

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.records: list[warnings.WarningMessage] = []

    def __enter__(self) -> LoadReport:
        self._ctx = warnings.catch_warnings(record=True)
        self.records = self._ctx.__enter__()
        warnings.simplefilter("always")
        self.caplog.clear()
        self.caplog.set_level(logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        texts = [str(w.message) for w in self.records]
        texts += [r.getMessage() for r in self.caplog.records]
        bad = [t for t in texts if any(word in t.lower() for word in self.WORDS)]
        assert not bad, f"loading reported key problems: {bad}"


def hf_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS, use_cache=False).logits


def lora_run(base: str, make_linear=None, first=None, **options):
    """Reference Llama from ``base`` with (optionally swapped) linears and LoRA.

    ``first``: a converter enabled before ``lora`` (e.g. the float8 plugin).
    """
    model = from_pretrained(base)
    if make_linear is not None:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear and name != "output":
                    setattr(module, name, make_linear(child))
    conv = LoRAConverter(LoRAConfig(**options))
    convs = ConverterSet([conv] if first is None else [first, conv])
    convs.convert(model)
    conv.base_model_name_or_path = base
    return model, convs, LlamaStateDictAdapter(model.args)


def train(model: nn.Module, steps: int = 6, lr: float = 2e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        logits = model(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), data[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def export(model, convs, adapter, folder: Path, dtype: str = "float32") -> Path:
    out = folder / "step-6"
    write_export(
        ModelWrapper(model, convs), str(out), fmt="hf", dtype=dtype, sd_adapter=adapter,
        converters=convs, step=6,
    )  # fmt: skip
    return out


def load_peft(base: str, adapter_folder: Path, caplog) -> nn.Module:
    base_model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    with LoadReport(caplog):
        model = peft.PeftModel.from_pretrained(base_model, str(adapter_folder))
    return model.eval()


def test_transformers_and_peft_load_the_export_and_agree_with_the_trained_model(
    hf_base, tmp_path, caplog
):
    model, convs, adapter = lora_run(hf_base, rank=4, alpha=8)
    losses = train(model)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        native = model(TOKENS)
    out = export(model, convs, adapter, tmp_path)

    with LoadReport(caplog):
        merged, info = transformers.LlamaForCausalLM.from_pretrained(
            str(out), output_loading_info=True
        )
    assert not any(info.values()), info
    merged_logits = hf_logits(merged.eval())
    peft_model = load_peft(hf_base, out / "adapter", caplog)
    peft_logits = hf_logits(peft_model)
    untrained = hf_logits(transformers.LlamaForCausalLM.from_pretrained(hf_base).eval())

    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged_logits, native, atol=1e-4, rtol=0)
    assert (merged_logits - untrained).abs().max() > 1e-2

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["target_modules"] == HF_TARGETS
    assert config["base_model_name_or_path"] == hf_base
    written = safetensors_torch.load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(written) == 2 * 7 * 2
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    assert torch.equal(written[key], model.layers["1"].attention.wk.lora_b.weight)
    model_files = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in model_files)


def test_export_adapter_keeps_the_base_weights_and_merged_writes_no_adapter(hf_base, tmp_path):
    for mode in ("adapter", "merged"):
        model, convs, adapter = lora_run(hf_base, rank=2, target_modules=["wq"], export=mode)
        train(model, steps=2)
        out = export(model, convs, adapter, tmp_path / mode)
        weights = safetensors_torch.load_file(str(out / "model.safetensors"))
        base = safetensors_torch.load_file(str(Path(hf_base) / "model.safetensors"))
        q = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(weights[q], base[q]) is (mode == "adapter"), mode
        assert (out / "adapter").exists() is (mode == "adapter"), mode
        assert not any("lora" in k for k in weights)


@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_adapter_and_merged_exports_load_with_the_trained_logits(hf_base, tmp_path, caplog, mode):
    model, convs, adapter = lora_run(
        hf_base, rank=2, alpha=4, target_modules=["wq", "w2"], export=mode
    )
    train(model, steps=3)
    with torch.no_grad():
        native = model.eval()(TOKENS)
    out = export(model, convs, adapter, tmp_path)
    with LoadReport(caplog):
        loaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    if mode == "adapter":  # the folder's own (unmerged) weights are the base for its adapter
        with LoadReport(caplog):
            loaded = peft.PeftModel.from_pretrained(loaded, str(out / "adapter")).eval()
    logits = hf_logits(loaded)
    torch.testing.assert_close(logits, native, atol=1e-4, rtol=0)
    untrained = hf_logits(transformers.LlamaForCausalLM.from_pretrained(hf_base).eval())
    assert (logits - untrained).abs().max() > 1e-2


def test_peft_adapter_round_trips_through_a_native_run(hf_base, tmp_path, caplog):
    torch.manual_seed(3)
    base_model = transformers.LlamaForCausalLM.from_pretrained(hf_base)
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False, task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = peft.get_peft_model(base_model, peft_config).eval()
    peft_dir = tmp_path / "peft"
    peft_model.save_pretrained(str(peft_dir))
    original = safetensors_torch.load_file(str(peft_dir / "adapter_model.safetensors"))
    expected = hf_logits(peft_model)

    model, convs, adapter = lora_run(hf_base, rank=4, alpha=16, target_modules=["wq", "wv", "w2"])
    wrapper = ModelWrapper(model, convs)
    missing = load_additional(
        wrapper, str(peft_dir), converter="lora", sd_adapter=adapter, converters=convs
    )
    assert missing == []
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(TOKENS), expected, atol=1e-4, rtol=0)

    out = export(model, convs, adapter, tmp_path / "export")
    again = safetensors_torch.load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(original)
    for key, value in original.items():
        assert torch.equal(again[key], value), key
    reloaded = hf_logits(load_peft(hf_base, out / "adapter", caplog))
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=0)


def test_peft_adapter_trained_with_another_alpha_is_refused_not_misscaled(hf_base, tmp_path):
    base_model = transformers.LlamaForCausalLM.from_pretrained(hf_base)
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_dir = tmp_path / "peft"
    peft.get_peft_model(base_model, peft_config).save_pretrained(str(peft_dir))

    model, convs, adapter = lora_run(hf_base, rank=4, alpha=16, target_modules=["wq"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="lora_alpha = 32.*'alpha' is 16"):
        load_additional(
            ModelWrapper(model, convs), str(peft_dir), converter="lora", sd_adapter=adapter,
            converters=convs,
        )  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _qat_linear(linear: nn.Linear) -> nn.Linear:
    from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig

    cfg = IntxFakeQuantizeConfig(dtype=torch.int4, group_size=32, is_symmetric=True)
    return FakeQuantizedLinear.from_linear(linear, weight_config=cfg)


def _float8_linear(linear: nn.Linear) -> nn.Linear:
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear.from_float(linear, Float8LinearConfig(emulate=True))


@pytest.mark.parametrize("make_linear", [_qat_linear, _float8_linear], ids=["qat", "float8"])
def test_lora_over_quantized_linears_trains_and_exports(hf_base, tmp_path, caplog, make_linear):
    model, convs, adapter = lora_run(hf_base, make_linear, rank=4, alpha=8)
    assert type(model.layers["0"].attention.wq) is not nn.Linear
    losses = train(model, steps=3)
    assert losses[-1] < losses[0]
    out = export(model, convs, adapter, tmp_path)
    with LoadReport(caplog):
        merged = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    peft_logits = hf_logits(load_peft(hf_base, out / "adapter", caplog))
    merged_logits = hf_logits(merged)
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-4, rtol=0)
    untrained = hf_logits(transformers.LlamaForCausalLM.from_pretrained(hf_base).eval())
    assert (merged_logits - untrained).abs().max() > 1e-2


def test_float8_plugin_then_lora_trains_and_exports_what_transformers_and_peft_load(
    hf_base, tmp_path, caplog
):
    Float8Converter = pytest.importorskip("ckpt_plugins_float8").Float8Converter
    float8 = Float8Converter(Float8Converter.Config(emulate=True))
    model, convs, adapter = lora_run(hf_base, first=float8, rank=4, alpha=8)
    assert convs.names == ["float8", "lora"]
    assert type(model.layers["0"].attention.wq).__name__ == "Float8Linear"
    losses = train(model, steps=3)
    assert losses[-1] < losses[0]
    out = export(model, convs, adapter, tmp_path)
    with LoadReport(caplog):
        merged = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    merged_logits = hf_logits(merged)
    peft_logits = hf_logits(load_peft(hf_base, out / "adapter", caplog))
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-4, rtol=0)
    # The export is the high-precision model: a plain reference Llama holding W + (alpha/r)·B·A
    # (float8 rounds activations in training, so the float8 forward itself is further away).
    plain = from_pretrained(hf_base)
    with torch.no_grad():
        for name, linear in model.named_modules():
            if hasattr(linear, "lora_b"):
                delta = linear.lora_scaling * linear.lora_b.weight @ linear.lora_a.weight
                plain.get_submodule(name).weight.add_(delta)
        reference = plain.eval()(TOKENS)
    torch.testing.assert_close(merged_logits, reference, atol=1e-4, rtol=0)
    untrained = hf_logits(transformers.LlamaForCausalLM.from_pretrained(hf_base).eval())
    assert (merged_logits - untrained).abs().max() > 1e-2
