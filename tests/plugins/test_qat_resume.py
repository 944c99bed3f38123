"""QAT through CheckpointManager: bit-exact resume, and the manager's HF export loads."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_core import CheckpointConfig, CheckpointManager, ConverterSet
from ckpt_core.reference import LlamaStateDictAdapter, build_model
from ckpt_plugins_qat import QATConverter

transformers = pytest.importorskip("transformers")


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (2, 17), generator=gen) for _ in range(n)]


def qat(**options) -> ConverterSet:
    return ConverterSet([QATConverter(QATConverter.Config(group_size=32, **options))])


def step(model, opt, batch) -> float:
    logits = model(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def run(folder, steps: range, data, *, seed=0, save=True, export=False, scheme="int4_weight_only"):
    """Build, resume through the manager, train ``steps`` and save the last one."""
    torch.manual_seed(seed)
    model = build_model("tiny")
    converters = qat(scheme=scheme)
    converters.convert(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = CheckpointConfig(
        folder=str(folder / "ckpt"),
        interval=1000,
        export={"enable": export, "folder": str(folder / "export"), "dtype": "float32"},
    )
    manager = CheckpointManager(
        config,
        model,
        optimizers=opt,
        converters=converters,
        sd_adapter=LlamaStateDictAdapter(model.args),
    )
    resumed = manager.load()
    losses = []
    for n in steps:
        losses.append(step(model, opt, data[n - 1]))
        if save:
            manager.save(n, last_step=n == steps[-1])
    manager.close()
    return model, losses, resumed


@pytest.mark.parametrize("scheme", ["int4_weight_only", "int8_dynamic_act_int4_weight"])
def test_resume_with_qat_continues_bit_exactly(scheme, tmp_path):
    data = batches(6)
    _, expected, _ = run(tmp_path / "straight", range(1, 7), data, save=False, scheme=scheme)
    run(tmp_path / "split", range(1, 4), data, scheme=scheme)
    _, losses, resumed = run(
        tmp_path / "split", range(4, 7), data, seed=5, save=False, scheme=scheme
    )
    assert resumed
    assert losses == expected[3:]


def test_manager_export_of_a_qat_run_loads_in_transformers(tmp_path):
    data = batches(3)
    model, _, _ = run(tmp_path, range(1, 4), data, export=True)
    path = tmp_path / "export" / "step-3"
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["converters"][0]["name"] == "qat"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    x = data[0]
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-5


def test_offline_convert_of_a_qat_checkpoint_writes_the_same_quantized_export(tmp_path):
    from ckpt_core.cli.convert_cmd import convert

    data = batches(3)
    model, _, _ = run(tmp_path, range(1, 4), data, export=True)
    dst = tmp_path / "converted"
    convert(str(tmp_path / "ckpt"), str(dst), to="hf", dtype="float32")  # converters from manifest
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32)
    x = data[1]
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-5
