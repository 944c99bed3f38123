"""``ckpt train`` with no arguments: README's first command."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e import _train as t


def test_core_declares_numpy_because_dcp_needs_it_and_torch_does_not_install_it():
    # A fresh `pip install torch==2.13.0 .` has no numpy unless ckpt-core asks for it, and
    # DCP's save then fails in gather_object ("Numpy is not available") at the first checkpoint.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = {
        re.split(r"[<>=!~; \[]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]
    }
    assert "numpy" in names


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
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]  # nothing else in the cwd
    out = tmp_path / "outputs"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "export", "metrics.jsonl"]
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
