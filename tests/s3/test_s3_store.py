"""The object-store commit protocol against a real S3 server (moto on loopback).

Data goes straight into ``step-<N>/``; the manifest, written last, commits it.
These tests drive the real manager, retention, verify and lease through s3fs
over HTTP: save/resume bit-exact, partial steps ignored and cleaned up, the
server stopped mid-save, kill -9 mid-save, a changed object, the one-writer
lease, hostile manifests and metadata, and ``checkpoint.storage_options``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from ckpt_core.errors import CheckpointError, FolderLockedError, PreflightError, SaveError
from ckpt_core.storage import layout, lock, manifest, signing
from ckpt_core.storage.safe_metadata import loads_metadata, read_metadata
from tests.core._manager_models import Trainable, assert_same, snapshot

#: Fail fast when the server is stopped (s3fs and botocore retry for seconds otherwise).
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}


def _client(server):
    import boto3

    return boto3.client("s3", endpoint_url=server.endpoint)


def _keys(server, bucket_uri: str) -> list[str]:
    bucket = bucket_uri.split("://", 1)[1]
    out = _client(server).list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(o["Key"] for o in out)


def _optim_tensors(optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{k}": v
        for i, state in optim.state_dict()["state"].items()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def test_save_resume_is_bit_exact_and_writes_in_place(s3_env, s3_bucket, tmp_path):
    folder = f"{s3_bucket}/run"
    private, public, _ = signing.generate_key(str(tmp_path / "key"))
    run = Trainable(folder=folder, interval=1, async_mode="async", sign_key=private)
    for step in (1, 2):
        run.step()
        run.manager.save(step, last_step=step == 2)  # step 1 async, step 2 sync
    weights, optim = snapshot(run.model), _optim_tensors(run.optim)
    sched = run.sched.state_dict()
    run.manager.close()
    keys = _keys(s3_env, s3_bucket)
    assert "run/step-2/manifest.json" in keys and "run/step-2/__0_0.distcp" in keys
    assert not [k for k in keys if ".tmp-step" in k or "lease" in k]  # no copy, lease gone

    assert "run/step-2/signature.json" in keys  # signed before the manifest committed it
    resumed = Trainable(seed=7, folder=folder, verify_key=public)
    assert resumed.manager.load()  # the signature covers the manifest as written
    assert resumed.manager.train_state.step == 2
    assert_same(snapshot(resumed.model), weights)
    assert_same(_optim_tensors(resumed.optim), optim)
    assert resumed.sched.state_dict() == sched
    assert manifest.verify(layout.step_dir(folder, 2)) == []


def _copy_objects(server, bucket_uri: str, src: str, dst: str, skip=("manifest.json",)) -> None:
    client, bucket = _client(server), bucket_uri.split("://", 1)[1]
    for key in _keys(server, bucket_uri):
        if key.startswith(src + "/") and not key.endswith(skip):
            target = dst + key[len(src) :]
            client.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": key})


def test_partial_steps_are_never_loaded_and_retention_removes_them(s3_env, s3_bucket):
    folder = f"{s3_bucket}/run"
    bucket = s3_bucket.split("://", 1)[1]
    run = Trainable(folder=folder, interval=1, keep_latest_k=2)
    for step in (1, 2):
        run.step()
        run.manager.save(step)
    weights = snapshot(run.model)
    run.manager.close()
    # A save of step 3 cut off before its manifest, an older one of step 0, and a
    # multipart upload nobody completed (a rank killed mid-upload).
    _copy_objects(s3_env, s3_bucket, "run/step-2", "run/step-3")
    _copy_objects(s3_env, s3_bucket, "run/step-2", "run/step-0")
    upload = _client(s3_env).create_multipart_upload(Bucket=bucket, Key="run/step-0/__1_0.distcp")
    export = _client(s3_env).create_multipart_upload(Bucket=bucket, Key="run/export/step-9/a.bin")
    _client(s3_env).put_object(Bucket=bucket, Key="run/step-3/__1_0.distcp", Body=b"stale rank")
    assert layout.committed_steps(folder) == [1, 2]

    resumed = Trainable(seed=3, folder=folder, interval=1, keep_latest_k=2)
    assert resumed.manager.load()
    assert resumed.manager.train_state.step == 2
    assert_same(snapshot(resumed.model), weights)
    for step in (3, 4):  # step 3 over the partial one: its stale objects go first
        resumed.step()
        resumed.manager.save(step)
    resumed.manager.close()  # waits for retention
    # Step 1 superseded and deleted; step 2 kept (this run loaded it); partials gone.
    assert layout.committed_steps(folder) == [2, 3, 4]
    assert manifest.verify(layout.step_dir(folder, 3)) == []
    prefixes = sorted({k.split("/")[1] for k in _keys(s3_env, s3_bucket)})
    assert prefixes == ["step-2", "step-3", "step-4"]  # the export upload has no object yet
    left = [u["UploadId"] for u in _client(s3_env).list_multipart_uploads(Bucket=bucket)["Uploads"]]
    assert upload["UploadId"] not in left and export["UploadId"] in left  # an export's: not ours


def test_a_server_stopped_mid_save_is_one_line_and_loses_nothing(s3_env, s3_bucket, monkeypatch):
    folder = f"{s3_bucket}/run"
    run = Trainable(folder=folder, interval=1, storage_options=FAST_FAIL)
    run.step()
    run.manager.save(1)
    weights = snapshot(run.model)
    run.step()
    from ckpt_core.policy import manager

    monkeypatch.setattr(manager, "pause_before_commit", s3_env.stop)
    with pytest.raises(SaveError) as failed:
        run.manager.save(2)  # data uploaded, the server gone before the manifest
    message = str(failed.value)
    assert "\n" not in message and "step 2" in message and folder in message
    monkeypatch.setattr(manager, "pause_before_commit", lambda: None)
    s3_env.start()
    run.manager.close()
    assert layout.committed_steps(folder) == [1]

    resumed = Trainable(seed=3, folder=folder, interval=1)
    assert resumed.manager.load()
    assert resumed.manager.train_state.step == 1
    assert_same(snapshot(resumed.model), weights)
    resumed.step()
    assert resumed.manager.save(2)
    resumed.manager.close()
    assert layout.committed_steps(folder) == [1, 2]


_CHILD = """
import os, sys, torch
sys.path.insert(0, {root!r})
from tests.core._manager_models import Trainable
run = Trainable(folder={folder!r}, interval=1)
run.step()
run.manager.save(1)
torch.save(run.model.state_dict(), {weights!r})
run.step()
os.environ["CKPT_TEST_SAVE_DELAY_S"] = "120"  # hold step 2 between its data and its manifest
print("saving 2", flush=True)
run.manager.save(2)
"""


def test_kill_9_mid_save_leaves_the_previous_step_resumable(s3_env, s3_bucket, tmp_path):
    folder = f"{s3_bucket}/run"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _CHILD.format(root=root, folder=folder, weights=str(tmp_path / "w.pt"))
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "saving 2"
        deadline = time.time() + 60
        while "run/step-2/.metadata" not in _keys(s3_env, s3_bucket):
            assert time.time() < deadline and child.poll() is None
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert "run/step-2/__0_0.distcp" in _keys(s3_env, s3_bucket)
    assert layout.committed_steps(folder) == [1]
    resumed = Trainable(seed=3, folder=folder)
    assert resumed.manager.load()
    assert resumed.manager.train_state.step == 1
    assert_same(snapshot(resumed.model), torch.load(tmp_path / "w.pt"))
    with pytest.raises(CheckpointError, match="not a committed step"):
        resumed.manager.load(step=2)


def test_verify_catches_a_changed_object(s3_env, s3_bucket):
    folder = f"{s3_bucket}/run"
    run = Trainable(folder=folder, interval=1)
    run.manager.save(1)
    run.manager.close()
    bucket, key = s3_bucket.split("://", 1)[1], "run/step-1/__0_0.distcp"
    client = _client(s3_env)
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    problems = manifest.verify(layout.step_dir(folder, 1))
    assert [(p.file, p.reason) for p in problems] == [("__0_0.distcp", "checksum")]


def test_the_lease_holds_on_s3_with_conditional_writes(s3_env, s3_bucket, monkeypatch):
    folder = f"{s3_bucket}/run"
    me = lock._OWNER_ID
    first = lock._Lease(folder, "checkpoint.folder", ttl=60, settle_s=0)
    first.acquire()
    assert first.conditional and first.etag  # a compare-and-swap took it, no settle wait
    monkeypatch.setattr(lock, "_OWNER_ID", "another-run")
    second = lock._Lease(folder, "checkpoint.folder", ttl=60, settle_s=0)
    with pytest.raises(FolderLockedError, match="in use by another run"):
        second.acquire()
    assert not second._put_if(if_match=None)  # the atomic take fails while a lease exists
    monkeypatch.setattr(lock, "_OWNER_ID", me)
    first.release()
    assert not layout.exists(layout.join(folder, lock.LEASE_NAME))

    stale = lock._Lease(folder, "checkpoint.folder", ttl=0.5, settle_s=0)
    stale.acquire()
    stale._stop.set()  # a run that died: it renews no more
    time.sleep(0.7)
    monkeypatch.setattr(lock, "_OWNER_ID", "another-run")
    taker = lock._Lease(folder, "checkpoint.folder", ttl=60, settle_s=0)
    taker.acquire()  # expired: taken over
    monkeypatch.setattr(lock, "_OWNER_ID", me)
    stale._renew_once()
    assert stale.lost is not None  # the dead run's renewal loses, it does not steal back
    with pytest.raises(FolderLockedError, match="taken over"):
        stale.check()
    monkeypatch.setattr(lock, "_OWNER_ID", "another-run")
    taker.release()


def test_hostile_manifest_and_metadata_are_refused_on_s3(s3_env, s3_bucket):
    folder = f"{s3_bucket}/run"
    run = Trainable(folder=folder, interval=1)
    run.manager.save(1)
    run.manager.save(2)
    run.manager.close()
    step1, step2 = layout.step_dir(folder, 1), layout.step_dir(folder, 2)

    # A manifest naming a file outside its step: never read, never a resume point.
    found = manifest.read(step2)
    found["files"]["../escape.distcp"] = {"size": 1, "checksum": "crc32:00000000"}
    layout.write_file(layout.join(step2, manifest.MANIFEST_NAME), json.dumps(found).encode())
    with pytest.raises(CheckpointError, match="escape"):
        manifest.read(step2)
    resumed = Trainable(seed=3, folder=folder)
    assert resumed.manager.load() and resumed.manager.train_state.step == 1

    # Metadata whose item runs past the end of its object (manifest rewritten to match).
    meta_path = layout.join(step1, ".metadata")
    with layout.open_file(meta_path, "rb") as f:
        metadata = loads_metadata(f.read(), meta_path)
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = _StorageInfo(info.relative_path, info.offset, 1 << 30)
    data = pickle.dumps(metadata)
    layout.write_file(meta_path, data)
    found = manifest.read(step1)
    found["files"][".metadata"] = {"size": len(data), "checksum": manifest.file_checksum(meta_path)}
    manifest.write(step1, found)
    with pytest.raises(CheckpointError, match="past|beyond|outside|size|bytes"):
        read_metadata(step1)
    with pytest.raises(CheckpointError):
        Trainable(seed=3, folder=folder).manager.load(step=1)


def test_storage_options_reach_s3_and_are_never_written_or_logged(
    s3_env, s3_bucket, monkeypatch, caplog
):
    secret = "ckpt-secret-do-not-log-4711"
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)  # only storage_options can reach the server now
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"endpoint_url": s3_env.endpoint, "key": "ckpt-test-key", "secret": secret}
    caplog.set_level(logging.DEBUG, logger="ckpt_core")
    folder = f"{s3_bucket}/run"
    run = Trainable(folder=folder, interval=1, storage_options=options)
    run.manager.acquire()
    run.manager.save(1)
    run.manager.close()
    assert secret not in repr(run.config)
    resumed = Trainable(seed=3, folder=folder, storage_options=options)
    assert resumed.manager.load()
    assert secret not in caplog.text
    client, bucket = _client(s3_env), s3_bucket.split("://", 1)[1]
    for key in _keys(s3_env, s3_bucket):
        assert secret.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.parametrize("problem", ["no bucket", "no credentials", "unreachable"])
def test_storage_problems_are_one_line_before_step_1(s3_env, s3_bucket, monkeypatch, problem):
    folder, options, expect = f"{s3_bucket}/run", dict(FAST_FAIL), ""
    if problem == "no bucket":
        folder, expect = "s3://ckpt-no-such-bucket/run", "does not exist"
    elif problem == "no credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        expect = "no credentials"
    else:
        options["endpoint_url"], expect = "http://127.0.0.1:9", "cannot reach"
    run = Trainable(folder=folder, interval=1, storage_options=options)
    with pytest.raises(PreflightError) as refused:
        run.manager.acquire()
        run.manager.preflight()
    message = str(refused.value)
    assert "\n" not in message and expect in message and folder in message


def test_an_export_to_s3_is_written_in_place_and_committed_by_its_manifest(s3_env, s3_bucket):
    from ckpt_core.policy.exporter import write_export

    run = Trainable(folder=f"{s3_bucket}/run")
    final = f"{s3_bucket}/export/step-1"
    # A cut-off export left objects there: not an export, replaced by a complete one.
    layout.write_file(layout.join(final, "stale.distcp"), b"partial")
    write_export(run.manager.wrapper, final, fmt="dcp", dtype=None, sd_adapter=None, step=1)
    keys = [k for k in _keys(s3_env, s3_bucket) if k.startswith("export/")]
    assert "export/step-1/manifest.json" in keys and not [k for k in keys if ".tmp" in k]
    assert manifest.verify(final) == []  # the stale object went first


def test_a_data_file_goes_up_as_parallel_parts_and_an_aborted_one_leaves_nothing(s3_env, s3_bucket):
    from ckpt_core.storage import object_io

    fs, inner = layout.filesystem(f"{s3_bucket}/big.distcp")
    part = object_io.MIN_PART
    data = os.urandom(2 * part + 12345)
    stream = object_io.PartUploadStream(fs, inner, size=part, workers=2)
    for start in range(0, len(data), 3_000_001):  # writes that straddle part boundaries
        stream.write(memoryview(data)[start : start + 3_000_001])
    assert stream.tell() == len(data) and len(stream._buf) < part  # one part buffered at most
    stream.close()
    bucket = s3_bucket.split("://", 1)[1]
    head = _client(s3_env).head_object(Bucket=bucket, Key="big.distcp")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    assert _client(s3_env).get_object(Bucket=bucket, Key="big.distcp")["Body"].read() == data

    broken = object_io.PartUploadStream(fs, f"{inner}.2", size=part, workers=2)
    broken.write(data)
    broken.abort()  # a failed save: no object, no upload left behind
    assert "big.distcp.2" not in _keys(s3_env, s3_bucket)
    assert not _client(s3_env).list_multipart_uploads(Bucket=bucket).get("Uploads")
