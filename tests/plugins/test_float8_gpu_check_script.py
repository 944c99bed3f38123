"""benchmarks/gpu_float8_check.py stays runnable: CPU smoke mode, and clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_float8_check.py"


def run_script(args: list[str], blocked: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the script from a foreign folder with ``blocked`` packages made unimportable."""
    shadow = tmp_path / "shadow"
    for name in blocked:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} blocked')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_check_passes_in_cpu_smoke_mode_with_only_the_core_dependencies(tmp_path):
    pytest.importorskip("torchao.float8")
    proc = run_script(
        ["--cpu-smoke", "--steps", "4", "--keep", str(tmp_path / "out")],
        ["transformers", "compressed_tensors", "fsspec", "rich"],
        tmp_path,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SUMMARY ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(line.removeprefix("SUMMARY "))
    assert proc.returncode == 0 and summary["passed"], summary["checks"]
    assert summary["checks"]["resumed_losses_equal_uninterrupted"]
    assert summary["checks"]["export_fp8_bytes_equal_torchao_training_cast"]
    assert summary["float8_linears"] == 14
    assert "eager_float8" in summary["timing_ms"]
    assert (tmp_path / "out" / "export" / "step-final" / "config.json").is_file()


def test_gpu_check_without_torchao_says_how_to_install_it(tmp_path):
    proc = run_script(["--cpu-smoke"], ["torchao"], tmp_path)
    assert proc.returncode == 2
    assert "pip install 'torchao==0.18.0'" in proc.stdout


def test_gpu_check_without_a_float8_gpu_points_to_the_smoke_mode(tmp_path):
    from ckpt_plugins_float8.conversion import float8_gpu_present

    if float8_gpu_present():
        pytest.skip("a float8 GPU is present")
    proc = run_script([], [], tmp_path)
    assert proc.returncode == 2
    assert "--cpu-smoke" in proc.stdout
