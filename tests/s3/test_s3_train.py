"""``ckpt train`` with its folders on ``s3://`` (real processes, the loopback server).

The run folder is a URI: checkpoints and the export go to the bucket; the
per-step metrics lines go to a local spool file and are copied to the bucket
when the run ends (an object store cannot append). A second "machine" (another
working directory) resumes from the bucket and continues the metrics.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from ckpt_core.storage import layout
from ckpt_core.trainer.metrics import read_metrics
from tests.e2e import _train as t


def _train(cwd, *args: str, steps: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ckpt_core.cli.main", "train", *t.TINY]
    cmd += ["--training.steps", str(steps), "--checkpoint.interval", "2", *args]
    os.makedirs(cwd, exist_ok=True)
    return t.run(cmd, cwd)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    """One 4-step run with ``job.folder = s3://<bucket>/run`` (export on), shared by the tests."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        bucket = f"ckpt-train-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
        run, cwd = f"s3://{bucket}/run", tmp_path_factory.mktemp("node-a")
        export = ("--checkpoint.export.enable", "true")
        proc = _ok(_train(cwd, "--job.folder", run, *export, steps=4))
    return run, cwd, proc


def test_a_run_folder_on_s3_holds_checkpoints_export_and_metrics_and_resumes_elsewhere(
    s3_run, s3_env, tmp_path
):
    run, cwd, proc = s3_run
    assert layout.committed_steps(f"{run}/checkpoints") == [2, 4]
    assert layout.exists(f"{run}/export/step-4/model.safetensors")
    assert layout.exists(f"{run}/export/step-4/manifest.json")
    spool = cwd / "ckpt-spool" / "s3" / run[len("s3://") :] / "metrics.jsonl"
    assert str(spool) in proc.stderr  # the log says where the lines go
    assert [r["step"] for r in read_metrics(f"{run}/metrics.jsonl")] == [1, 2, 3, 4]
    assert read_metrics(str(spool)) == read_metrics(f"{run}/metrics.jsonl")
    assert not any(name.startswith("s3:") for name in os.listdir(cwd))

    # Another machine (no spool file) resumes from the bucket and continues the metrics.
    proc = _ok(_train(tmp_path / "b", "--job.folder", run, steps=6))
    assert "step-4" in proc.stderr
    records = read_metrics(f"{run}/metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["tokens"] == 5 * 4 * 32


def test_initial_load_takes_a_dcp_step_on_s3(s3_run, s3_env, tmp_path):
    run = s3_run[0]
    step = f"{run}/checkpoints/step-4"
    load = ("--checkpoint.initial_load.path", step, "--checkpoint.initial_load.format", "dcp")
    proc = _ok(_train(tmp_path, "--job.folder", str(tmp_path), *load, steps=2))
    assert step in proc.stderr and layout.committed_steps(str(tmp_path / "checkpoints")) == [2]


def test_a_missing_bucket_stops_ckpt_train_before_step_1_with_one_line(s3_env, tmp_path):
    run = "s3://ckpt-no-such-bucket-train/run"
    proc = _train(tmp_path, "--job.folder", run, steps=2)
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ckpt train:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "ckpt-no-such-bucket-train" in lines[0] and "does not exist" in lines[0]
    assert not (tmp_path / "ckpt-spool").exists()  # no step ran, no metrics line
