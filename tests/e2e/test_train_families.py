"""``ckpt train --model.name moe:tiny`` / ``qwen3:tiny``: the native families through the CLI.

On 1 and 2 ranks a run stopped at step 5 and restarted to step 8 logs bitwise the
losses of an uninterrupted run, and its HF export (per-expert keys) loads in
transformers with the logits of the native model loaded from it. Each bundled
converter trains the MoE a few steps and its export loads too, and so does a Qwen3 run.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.core._qwen3_hf import native_from_hf_folder
from tests.e2e import _train as t

MOE = ["--model.name", "moe:tiny"]
EXPORT = ["--checkpoint.export.enable", "true", "--checkpoint.export.dtype", "float32"]


def _hf_logits(path: str, x: torch.Tensor, cls: str = "Qwen3MoeForCausalLM") -> torch.Tensor:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == cls
    with torch.no_grad():
        return hf(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("nproc", [1, 2], ids=["one-rank", "two-ranks"])
def test_moe_resumes_bit_exactly_and_exports_what_transformers_loads(tmp_path, nproc):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    t.run_ok(t.command(ref, *MOE, steps=8, nproc=nproc), tmp_path)
    t.run_ok(t.command(run, *MOE, steps=5, nproc=nproc), tmp_path)
    assert t.committed_steps(run) == [3, 5]
    t.run_ok(t.command(run, *MOE, *EXPORT, steps=8, nproc=nproc), tmp_path)
    assert [r["step"] for r in t.records(run)] == list(range(1, 9))
    assert t.losses(run) == t.losses(ref)
    manifest = json.loads((run / "checkpoints" / "step-8" / "manifest.json").read_text())
    assert manifest["model"]["adapter"] == "moe"
    export = str(run / "export" / "step-8")
    native, _ = native_from_hf_folder(export, "moe")
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (_hf_logits(export, x) - native(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("converter", "nproc"),
    [("lora", 1), ("qat", 2), ("float8", 1)],
    ids=["lora", "qat-two-ranks", "float8"],
)
def test_moe_trains_with_each_converter_and_its_export_loads(tmp_path, converter, nproc):
    reason = t.plugin_missing([converter])
    if reason:
        pytest.skip(reason)
    proc = t.run_ok(
        t.command(tmp_path, *MOE, *EXPORT, *t.converter_args([converter]), steps=3, nproc=nproc),
        tmp_path,
    )
    said = {
        "lora": "name stacked MoE expert weights (not nn.Linear) here",  # skipped, frozen
        "qat": "on 8 linears and 6 stacked expert weights",  # fake-quantized per expert
        "float8": "layers.0.moe.router.gate (MoE router",  # routers stay high precision
    }
    assert said[converter] in proc.stderr
    export = tmp_path / "export" / "step-3"
    config = json.loads((export / "config.json").read_text())
    if converter == "lora":  # merged weights, and a PEFT adapter on the attention only
        adapter = json.loads((export / "adapter" / "adapter_config.json").read_text())
        assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    if converter == "qat":
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(_hf_logits(str(export), x)).all()


def test_qwen3_trains_and_its_export_loads_with_the_native_logits(tmp_path):
    t.run_ok(t.command(tmp_path, "--model.name", "qwen3:tiny", *EXPORT, steps=3), tmp_path)
    export = str(tmp_path / "export" / "step-3")
    native, _ = native_from_hf_folder(export, "qwen3")
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = _hf_logits(export, x, "Qwen3ForCausalLM")
        assert (got - native(x)).abs().max().item() < 1e-4
