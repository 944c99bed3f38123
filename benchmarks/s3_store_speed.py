"""Quick speed check of the object-store path: local folder vs S3 on a loopback server.

Starts ``moto_server`` (moto's S3 server, a separate process, so it does not share
this process's GIL) on 127.0.0.1 and a free port, then saves and loads the same
state through ``CheckpointManager`` into a local folder and into ``s3://``, with
1 and with ``CKPT_S3_CONCURRENCY`` parts in flight. Prints MB/s and the requests
the server saw per save::

    python benchmarks/s3_store_speed.py --mib 256
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch
from torch import nn

from ckpt_core import CheckpointConfig, CheckpointManager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return server, endpoint


def _model(mib: int) -> nn.Module:
    rows = mib * (1 << 20) // 4 // 4096 // 4
    return nn.Sequential(*[nn.Linear(4096, rows, bias=False) for _ in range(4)])


def _run(folder: str, model: nn.Module, mib: int, label: str) -> None:
    manager = CheckpointManager(CheckpointConfig(folder=folder, preflight="off"), model)
    start, cpu = time.perf_counter(), time.process_time()
    manager.save(1, last_step=True)
    saved, save_cpu = time.perf_counter() - start, time.process_time() - cpu
    manager.close()
    fresh = CheckpointManager(CheckpointConfig(folder=folder), model)
    start, cpu = time.perf_counter(), time.process_time()
    assert fresh.load()
    loaded, load_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        f"{label:<28} save {mib / saved:8.1f} MB/s ({saved:6.2f} s)   "
        f"load {mib / loaded:8.1f} MB/s ({loaded:6.2f} s)   "
        f"client CPU s: save {save_cpu:.1f}, load {load_cpu:.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = _model(args.mib)
    mib = sum(p.numel() * p.element_size() for p in model.parameters()) / (1 << 20)
    print(
        f"state: {mib:.0f} MiB in 4 tensors; parts of {os.environ.get('CKPT_S3_PART_MB', '16')}"
        " MiB",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        _run(os.path.join(tmp, "local"), model, mib, "local folder")
    server, endpoint = _start_server()
    try:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        for workers in ("1", os.environ.get("CKPT_S3_CONCURRENCY", "4")):
            os.environ["CKPT_S3_CONCURRENCY"] = workers
            _run(f"s3://bench/run-{workers}", model, mib, f"s3 loopback, {workers} in flight")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
