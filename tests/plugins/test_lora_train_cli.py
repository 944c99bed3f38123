"""``ckpt train`` with LoRA on a small random HF Llama: real processes, real files.

The HF folder is the model (initial load); the run exports a merged model that
transformers loads and a PEFT adapter that peft loads on the original base.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.plugins.lora_support import save_tiny_hf_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 96
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> str:
    return save_tiny_hf_llama(str(tmp_path_factory.mktemp("hf") / "base"), VOCAB)


def ckpt_train(base: str, job: Path, *args: str, steps: int = 6, nproc: int = 1) -> None:
    cmd = [
        sys.executable, "-m", "ckpt_core.cli.main", "train",
        "--model.name", base, "--job.folder", str(job),
        "--training.steps", str(steps), "--training.seq_len", "16",
        "--training.batch_size", "4", "--training.lr", "1e-2", "--training.warmup_steps", "2",
        "--checkpoint.interval", "3", "--checkpoint.export.dtype", "float32",
        "--converters.enabled", "lora", "--converters.lora.rank", "4",
        "--converters.lora.alpha", "8", *args,
    ]  # fmt: skip
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CKPT_DISABLE_PLUGIN_AUTOLOAD", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS, use_cache=False).logits


def load_quietly(caplog, fn, *args, **kwargs):
    """Call a loader; any warning or log about missing/unexpected keys fails the test."""
    caplog.clear()
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    bad = [t for t in texts if "missing" in t.lower() or "unexpected" in t.lower()]
    assert not bad, bad
    return result


def test_ckpt_train_on_two_ranks_exports_a_merged_model_and_a_peft_adapter_that_agree(
    hf_base, tmp_path, caplog
):
    job = tmp_path / "job"
    ckpt_train(hf_base, job, nproc=2)
    export = job / "export" / "step-6"
    merged, info = load_quietly(
        caplog,
        transformers.LlamaForCausalLM.from_pretrained,
        str(export),
        output_loading_info=True,
    )
    assert not any(info.values()), info
    base = transformers.LlamaForCausalLM.from_pretrained(hf_base)
    untrained = logits(base)
    adapted = load_quietly(caplog, peft.PeftModel.from_pretrained, base, str(export / "adapter"))
    torch.testing.assert_close(logits(adapted), logits(merged), atol=1e-4, rtol=0)
    assert (logits(merged) - untrained).abs().max() > 1e-2
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert config["base_model_name_or_path"] == hf_base


def test_ckpt_train_resumes_trainable_only_checkpoints_bit_exactly(hf_base, tmp_path):
    only = ["--converters.lora.trainable_only_checkpoints", "true"]
    ckpt_train(hf_base, tmp_path / "straight", *only)
    ckpt_train(hf_base, tmp_path / "split", *only, steps=3)  # stops right after step-3's save
    ckpt_train(hf_base, tmp_path / "split", *only)  # resumes: base from HF, adapters from DCP

    step3 = json.loads((tmp_path / "split/checkpoints/step-3/manifest.json").read_text())
    assert step3["base"]["path"] == hf_base
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        want = safetensors_torch.load_file(str(tmp_path / "straight/export/step-6" / name))
        got = safetensors_torch.load_file(str(tmp_path / "split/export/step-6" / name))
        assert sorted(got) == sorted(want), name
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)

    def losses(job: Path) -> dict[int, float]:
        lines = (job / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}

    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert [split[s] for s in range(4, 7)] == [straight[s] for s in range(4, 7)]


def test_ckpt_train_starts_from_a_peft_adapter_through_additional_load(hf_base, tmp_path):
    base = transformers.LlamaForCausalLM.from_pretrained(hf_base)
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"],
    )  # fmt: skip
    torch.manual_seed(11)
    peft.get_peft_model(base, peft_config).save_pretrained(str(tmp_path / "peft"))
    original = safetensors_torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    config = tmp_path / "run.toml"
    config.write_text(
        f'[[checkpoint.additional_load]]\npath = "{tmp_path / "peft"}"\nconverter = "lora"\n'
    )
    # One step at a tiny learning rate (warmup 1/1000): the export is the loaded adapter, moved
    # by about 1e-5; a fresh adapter (B = 0, A random) would be far off.
    ckpt_train(hf_base, tmp_path / "job", "--config", str(config), "--training.warmup_steps",
               "1000", steps=1)  # fmt: skip
    exported = safetensors_torch.load_file(
        str(tmp_path / "job/export/step-1/adapter/adapter_model.safetensors")
    )
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert (exported[key] - value).abs().max() < 1e-4, key
    assert all(v.abs().max() > 1e-3 for k, v in original.items() if "lora_B" in k)
