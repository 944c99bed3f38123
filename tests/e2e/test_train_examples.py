"""Each config in ``examples/`` runs (shortened to the tiny flavor and a few steps)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e import _train as t

EXAMPLES = REPO_ROOT / "examples"
SHORT = [
    "--training.steps",
    "4",
    "--training.seq_len",
    "32",
    "--training.batch_size",
    "4",
    "--checkpoint.interval",
    "2",
    "--checkpoint.async_mode",
    "disabled",
]


def example(name: str, folder, *args: str) -> list[str]:
    cmd = t.command(folder)[:4]  # python -m ckpt_core.cli.main train
    return [*cmd, "--config", str(EXAMPLES / name), *SHORT, "--job.folder", str(folder), *args]


@pytest.mark.parametrize(
    ("name", "converters"),
    [("plain.toml", []), ("qat.toml", ["qat"]), ("float8.toml", ["float8"])],
)
def test_an_example_config_trains_checkpoints_and_exports(name, converters, tmp_path):
    reason = t.plugin_missing(converters)
    if reason:
        pytest.skip(reason)
    t.run_ok(example(name, tmp_path, "--model.name", "tiny"), tmp_path)
    assert [r["step"] for r in t.records(tmp_path)] == [1, 2, 3, 4]
    assert t.committed_steps(tmp_path)[-1] == 4
    exported = json.loads((tmp_path / "export" / "step-4" / "manifest.json").read_text())
    assert [c["name"] for c in exported["converters"]] == converters


def test_the_lora_example_fine_tunes_an_hf_folder_and_exports_merged_and_peft(tmp_path):
    reason = t.plugin_missing(["lora"])
    if reason:
        pytest.skip(reason)
    base = tmp_path / "base"
    t.run_ok(t.command(base, "--checkpoint.export.enable", "true", steps=3), tmp_path)
    hf_folder = base / "export" / "step-3"
    assert (hf_folder / "config.json").exists()

    run = tmp_path / "lora"
    proc = t.run_ok(example("lora_from_hf.toml", run, "--model.name", str(hf_folder)), tmp_path)
    assert f"Initial load from {hf_folder} (format hf" in proc.stderr
    assert [r["step"] for r in t.records(run)] == [1, 2, 3, 4]
    export = run / "export" / "step-4"
    assert (export / "config.json").exists()
    assert (export / "adapter" / "adapter_config.json").exists()
