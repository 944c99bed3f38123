"""``ckpt train`` with no arguments: README's first command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e import _train as t


@pytest.mark.slow
def test_the_default_run_learns_checkpoints_and_exports_a_bf16_model_transformers_loads(
    tmp_path,
):
    env = t.env()
    env.pop("OMP_NUM_THREADS")  # as a user runs it: torch's default thread count
    proc = subprocess.run(
        [sys.executable, "-m", "ckpt_core.cli.main", "train"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "outputs"
    logged = t.records(out)
    assert [r["step"] for r in logged] == list(range(1, 201))
    first = sum(r["loss"] for r in logged[:10]) / 10
    last = sum(r["loss"] for r in logged[-10:]) / 10
    assert first > 7.0 and last < first - 2.0, (first, last)
    assert t.committed_steps(out) == [50, 100, 150, 200]
    assert t.damaged_steps(out) == {}

    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "export" / "step-200"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.hidden_size == 256
