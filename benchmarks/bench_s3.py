"""S3 checkpoint benchmark: the same model saved and loaded locally and on a loopback S3 server.

    python benchmarks/bench_s3.py --size-gib 1 --reps 3

Builds one fp32 model of ``--size-gib`` (tensors of ~96 MiB, as
``bench_checkpoint.py``), starts moto's S3 server as a child process on
127.0.0.1 and a free port, and in every repetition runs, in a rotated order:

* ``disk``      — the same bytes written sequentially to one file + fsync (the
                  disk's own rate in this run: the disk is noisy, read ratios);
* ``local save`` / ``local load`` — ``CheckpointManager.save`` / ``load`` on a
                  local folder (load hot: the folder was read once before);
* ``s3 save`` / ``s3 load`` — the same through ``s3://bench/ckpt`` on the server;
* ``s3 raw put`` / ``s3 raw get`` — the same bytes as one object through boto3's own
                  managed transfer (multipart with the same part size and parts in
                  flight; one whole-object GET): the server's own rate in this run,
                  the bar the S3 path is held to, as the disk is for local saves.

For each S3 save it also records the HTTP requests the server answered (its
request log), the peak extra memory of this process (RSS sampled every 5 ms by
a thread, minus the RSS just before the save) and the CPU seconds the server
process and this process spent (``/proc/<pid>/stat``), which says where the
time goes. The server runs in its own process so that its copy of the objects
is not counted as the client's memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_checkpoint import Blob, _disk_write, _read_all  # noqa: E402

from ckpt_core import CheckpointConfig  # noqa: E402
from ckpt_core.policy.manager import CheckpointManager  # noqa: E402
from ckpt_core.storage import layout  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _cpu_s(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


class PeakRss:
    """Samples this process's RSS in a thread; ``extra`` is the peak above the start."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


class Server:
    """An S3 server in a child process; its request log counts the requests.

    ``s3rver`` (optional): the path of the ``s3rver`` executable of the Node.js
    package of that name (``npm install s3rver``), a second loopback server that
    keeps objects in files; the default is moto's Python server.
    """

    def __init__(self, root: str, s3rver: str | None = None) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = Path(root) / "server.log"
        if s3rver is None:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
            self._line = " HTTP/1.1"
        else:
            os.makedirs(f"{root}/s3rver-data")
            cmd = [s3rver, "-d", f"{root}/s3rver-data", "-a", "127.0.0.1", "-p", str(self.port)]
            cmd.append("--allow-mismatched-signatures")
            self._line = "ms "  # "info: /bucket/key 200 3ms 149b"
        self._out = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        # s3rver 3 hashes listings with a digest Node >= 17 keeps in OpenSSL's legacy provider.
        env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"no S3 server: {self.log.read_text()}") from None
                time.sleep(0.2)

    def requests(self) -> int:
        """Requests answered so far (one log line each)."""
        return sum(1 for line in self.log.read_text().splitlines() if self._line in line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._out.close()


def _raw_put(client, model: torch.nn.Module) -> None:
    """The model's bytes as one object, through boto3's managed multipart transfer."""
    from boto3.s3.transfer import TransferConfig

    part = int(float(os.environ.get("CKPT_S3_PART_MB", "16")) * (1 << 20))
    conc = int(os.environ.get("CKPT_S3_CONCURRENCY", "4"))
    config = TransferConfig(multipart_chunksize=part, max_concurrency=conc)

    class Params:
        """A read-only stream over the parameters' bytes (no joined copy)."""

        def __init__(self) -> None:
            self.views = [memoryview(p.detach().numpy()).cast("B") for p in model.parameters()]
            self.i = self.at = 0

        def read(self, n: int = -1) -> bytes:
            out = bytearray()
            while self.i < len(self.views) and (n < 0 or len(out) < n):
                view = self.views[self.i]
                take = len(view) - self.at if n < 0 else min(n - len(out), len(view) - self.at)
                out += view[self.at : self.at + take]
                self.at += take
                if self.at == len(view):
                    self.i, self.at = self.i + 1, 0
            return bytes(out)

    client.upload_fileobj(Params(), "bench", "raw.bin", Config=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument(
        "--s3rver",
        default=None,
        help="path of an s3rver executable (npm install s3rver) to use instead of moto",
    )
    args = parser.parse_args()

    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="ckpt-bench-s3-", dir=args.dir)
    server = Server(root, args.s3rver)
    os.environ.update(
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_ACCESS_KEY_ID="S3RVER",  # s3rver's built-in key pair; moto takes any
        AWS_SECRET_ACCESS_KEY="S3RVER",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        config=Config(read_timeout=1800, retries={"max_attempts": 1}),
    )
    client.create_bucket(Bucket="bench")

    model = Blob(int(args.size_gib * (1 << 30)))
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    gb = nbytes / 1e9
    local = CheckpointManager(CheckpointConfig(folder=f"{root}/ckpt", interval=1), model)
    # moto answers a 1 GiB CompleteMultipartUpload slowly on a busy machine; botocore's
    # 60 s read timeout would retry it, and moto fails the retry of a completed upload.
    slow_ok = {"config_kwargs": {"read_timeout": 1800, "retries": {"max_attempts": 1}}}
    remote = CheckpointManager(
        CheckpointConfig(folder="s3://bench/ckpt", interval=1, storage_options=slow_ok), model
    )
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "disk",
            "s3 raw put",
            "local save",
            "s3 save",
            "local load",
            "s3 load",
            "s3 raw get",
        )
    }
    requests: list[int] = []
    extra: list[int] = []
    local_extra: list[int] = []
    cpu: dict[str, list[float]] = {"server": [], "client": [], "server load": [], "client load": []}
    load_requests: list[int] = []
    try:
        for rep in range(1, args.reps + 1):

            def disk() -> None:
                t0 = time.perf_counter()
                _disk_write(model, f"{root}/plain.bin")
                times["disk"].append(time.perf_counter() - t0)
                os.remove(f"{root}/plain.bin")

            def local_save(rep=rep) -> None:
                with PeakRss() as rss:
                    t0 = time.perf_counter()
                    local.save(rep)
                    times["local save"].append(time.perf_counter() - t0)
                local_extra.append(rss.extra)

            def s3_save(rep=rep) -> None:
                time.sleep(0.5)  # the log of earlier requests is flushed
                n0, s0, c0 = server.requests(), _cpu_s(server.proc.pid), _cpu_s()
                with PeakRss() as rss:
                    t0 = time.perf_counter()
                    remote.save(rep)
                    times["s3 save"].append(time.perf_counter() - t0)
                cpu["server"].append(_cpu_s(server.proc.pid) - s0)
                cpu["client"].append(_cpu_s() - c0)
                extra.append(rss.extra)
                time.sleep(0.5)
                requests.append(server.requests() - n0)

            def raw_put() -> None:
                t0 = time.perf_counter()
                _raw_put(client, model)
                times["s3 raw put"].append(time.perf_counter() - t0)

            saves = [disk, raw_put, local_save, s3_save]
            for fn in saves[rep % 4 :] + saves[: rep % 4]:
                fn()
            _read_all(layout.step_dir(f"{root}/ckpt", rep))

            def local_load(rep=rep) -> None:
                t0 = time.perf_counter()
                local.load(rep)
                times["local load"].append(time.perf_counter() - t0)

            def s3_load(rep=rep) -> None:
                time.sleep(0.5)
                n0, s0, c0 = server.requests(), _cpu_s(server.proc.pid), _cpu_s()
                t0 = time.perf_counter()
                remote.load(rep)
                times["s3 load"].append(time.perf_counter() - t0)
                cpu["server load"].append(_cpu_s(server.proc.pid) - s0)
                cpu["client load"].append(_cpu_s() - c0)
                time.sleep(0.5)
                load_requests.append(server.requests() - n0)

            def raw_get() -> None:
                t0 = time.perf_counter()
                client.get_object(Bucket="bench", Key="raw.bin")["Body"].read()
                times["s3 raw get"].append(time.perf_counter() - t0)

            loads = [local_load, s3_load, raw_get]
            for fn in loads[rep % 3 :] + loads[: rep % 3]:
                fn()
            client.delete_object(Bucket="bench", Key="raw.bin")
            layout.remove_tree(layout.step_dir(f"{root}/ckpt", rep))
            layout.remove_tree(layout.step_dir("s3://bench/ckpt", rep))
            print(
                f"rep {rep}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
                + f", s3 save: {requests[-1]} requests, +{extra[-1] / 2**20:.0f} MiB RSS, "
                f"CPU server {cpu['server'][-1]:.1f}s client {cpu['client'][-1]:.1f}s; "
                f"s3 load CPU server {cpu['server load'][-1]:.1f}s "
                f"client {cpu['client load'][-1]:.1f}s",
                flush=True,
            )
    except BaseException:
        tail = server.log.read_text().splitlines()[-40:]
        print("server log (last lines):", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        local.close()
        remote.close()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    part = int(float(os.environ.get("CKPT_S3_PART_MB", "16")))
    conc = int(os.environ.get("CKPT_S3_CONCURRENCY", "4"))
    print(
        f"\n{gb:.2f} GB fp32 in {len(list(model.parameters()))} tensors, medians of "
        f"{args.reps}, server {'s3rver' if args.s3rver else 'moto'}, "
        f"torch threads {torch.get_num_threads()}, parts {part} MiB x {conc} "
        "in flight"
    )
    print("| variant | median s | GB/s |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {gb / v:.2f} |")
    print("\n| measure | value | target |")
    print("|---|---|---|")
    print(f"| s3 save / local save | {med['s3 save'] / med['local save']:.2f} | <= 2 |")
    print(f"| s3 load / local load | {med['s3 load'] / med['local load']:.2f} | <= 2 |")
    print(f"| local save / disk | {med['local save'] / med['disk']:.2f} | |")
    print(f"| s3 save / disk | {med['s3 save'] / med['disk']:.2f} | |")
    print(f"| s3 save / s3 raw put | {med['s3 save'] / med['s3 raw put']:.2f} | |")
    print(f"| s3 load / s3 raw get | {med['s3 load'] / med['s3 raw get']:.2f} | |")
    print(f"| requests per s3 save | {statistics.median(requests):.0f} | |")
    print(f"| requests per s3 load | {statistics.median(load_requests):.0f} | |")
    later = extra[1:] or extra
    print(
        f"| peak extra RSS per s3 save, after the first | {max(later) / 2**20:.0f} MiB | <= "
        f"multipart buffers ({(conc + 1) * part} MiB per open file) |"
    )
    print(f"| peak extra RSS, first s3 save (client set-up) | {extra[0] / 2**20:.0f} MiB | |")
    print(f"| peak extra RSS per local save | {max(local_extra) / 2**20:.0f} MiB | |")
    for what in ("save", "load"):
        server_s = statistics.median(cpu["server" if what == "save" else "server load"])
        client_s = statistics.median(cpu["client" if what == "save" else "client load"])
        print(f"| CPU s per s3 {what}: server / client | {server_s:.1f} / {client_s:.1f} | |")


if __name__ == "__main__":
    main()
