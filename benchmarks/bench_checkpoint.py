"""Checkpoint benchmark: the manager against raw DCP and the disk, in one process.

    python benchmarks/bench_checkpoint.py --size-gib 1 --reps 5

Builds one fp32 model of ``--size-gib`` (tensors of ~96 MiB) and, in every
repetition, runs each variant once in turn (alternating, so a noisy neighbour
hits all variants alike):

* ``disk``        — the same bytes written sequentially to one file + fsync
                    (buffered, one stream: the bar DCP's writer is held to);
* ``dcp.save``    — raw ``dcp.save`` with ``FileSystemWriter`` (fsync on);
* ``mgr sync``    — ``CheckpointManager.save`` with async off: DCP + CRC-32
                    while writing + manifest + fsync'd commit by rename;
* ``mgr async``   — the time ``save`` takes to return, the time the caller is
                    blocked when it calls ``maybe_wait_for_staging`` right away
                    (no forward/backward to overlap the copy into the reused
                    staging buffers: the worst case), and the time until the
                    step is committed;
* ``dcp.load``    — raw ``dcp.load`` of the raw step (hot, then cold: the
                    files' pages evicted with ``posix_fadvise(DONTNEED)``,
                    which touches no other file's cache);
* ``mgr load``    — ``CheckpointManager.load`` of the manager's step: manifest
                    size check, safe metadata read, model comparison, DCP load
                    in place. Both folders are read once before timing (hot
                    page cache): the manager writes with O_DIRECT, which leaves
                    nothing in the cache, and a cold read would not compare.

Prints medians and the ratios the targets refer to (manager / raw DCP for save
and load, async blocked time / sync save). Not a test: timings on a shared
machine are noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ckpt_core import CheckpointConfig
from ckpt_core.policy.manager import CheckpointManager
from ckpt_core.storage import layout

TENSOR_BYTES = 96 << 20


class Blob(nn.Module):
    """Parameters adding up to ``nbytes`` of fp32."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        cols = 4096
        left, i = nbytes, 0
        while left > 0:
            rows = max(1, min(TENSOR_BYTES, left) // (4 * cols))
            self.register_parameter(f"p{i}", nn.Parameter(torch.randn(rows, cols)))
            left -= rows * cols * 4
            i += 1


def _disk_write(model: nn.Module, path: str) -> None:
    with open(path, "wb") as f:
        for p in model.parameters():
            f.write(memoryview(p.detach().numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def _raw_save(model: nn.Module, path: str) -> None:
    writer = dcp.FileSystemWriter(path, sync_files=True)
    dcp.save({"model": model.state_dict()}, storage_writer=writer)


def _raw_load(model: nn.Module, path: str) -> None:
    sd = {"model": model.state_dict()}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(path))


def _evict(folder: str) -> None:
    """Drop these files' pages from the page cache (only theirs: fair to neighbours)."""
    for name in sorted(os.listdir(folder)):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_all(folder: str) -> None:
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            while f.read(64 << 20):
                pass


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    nbytes = int(args.size_gib * (1 << 30))
    model = Blob(nbytes)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    gb = nbytes / 1e9
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    sync_mgr = CheckpointManager(CheckpointConfig(folder=f"{root}/sync", interval=1), model)
    async_mgr = CheckpointManager(
        CheckpointConfig(folder=f"{root}/async", interval=1, async_mode="async"), model
    )
    # Warm-up: first async save allocates the staging buffers (kept from then on).
    t0 = time.perf_counter()
    async_mgr.save(10_000)
    async_mgr.maybe_wait_for_staging()
    first_blocked = time.perf_counter() - t0
    async_mgr._async.wait()
    layout.remove_tree(layout.step_dir(f"{root}/async", 10_000))

    times: dict[str, list[float]] = {
        k: []
        for k in (
            "disk",
            "dcp.save",
            "mgr sync",
            "mgr async save()",
            "mgr async blocked",
            "mgr async total",
            "dcp.load",
            "mgr load",
            "dcp.load cold",
            "mgr load cold",
        )
    }
    try:
        for rep in range(1, args.reps + 1):
            raw = f"{root}/raw-{rep}"

            def disk() -> None:
                times["disk"].append(_timed(_disk_write, model, f"{root}/plain.bin"))
                os.remove(f"{root}/plain.bin")

            def raw_save(raw=raw) -> None:
                times["dcp.save"].append(_timed(_raw_save, model, raw))

            def mgr_sync(rep=rep) -> None:
                times["mgr sync"].append(_timed(sync_mgr.save, rep))

            def mgr_async(rep=rep) -> None:
                t0 = time.perf_counter()
                async_mgr.save(rep)
                times["mgr async save()"].append(time.perf_counter() - t0)
                async_mgr.maybe_wait_for_staging()
                times["mgr async blocked"].append(time.perf_counter() - t0)
                async_mgr._async.wait()
                times["mgr async total"].append(time.perf_counter() - t0)

            def raw_load(raw=raw) -> None:
                times["dcp.load"].append(_timed(_raw_load, model, raw))

            def mgr_load(rep=rep) -> None:
                times["mgr load"].append(_timed(sync_mgr.load, rep))

            def raw_load_cold(raw=raw) -> None:
                _evict(raw)
                times["dcp.load cold"].append(_timed(_raw_load, model, raw))

            def mgr_load_cold(rep=rep) -> None:
                _evict(layout.step_dir(f"{root}/sync", rep))
                times["mgr load cold"].append(_timed(sync_mgr.load, rep))

            # Rotate the order each repetition so no variant always follows the same one.
            saves = [disk, raw_save, mgr_sync, mgr_async]
            loads = [raw_load, mgr_load]
            for fn in saves[rep % 4 :] + saves[: rep % 4]:
                fn()
            _read_all(raw)
            _read_all(layout.step_dir(f"{root}/sync", rep))
            for fn in loads[rep % 2 :] + loads[: rep % 2]:
                fn()
            colds = [raw_load_cold, mgr_load_cold]
            for fn in colds[rep % 2 :] + colds[: rep % 2]:
                fn()

            shutil.rmtree(raw)
            layout.remove_tree(layout.step_dir(f"{root}/sync", rep))
            layout.remove_tree(layout.step_dir(f"{root}/async", rep))
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    finally:
        async_mgr.close()
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n{gb:.2f} GB fp32 in {len(list(model.parameters()))} tensors, medians of "
        f"{args.reps}, torch threads {torch.get_num_threads()}"
    )
    print("| variant | median s | GB/s |")
    print("|---|---|---|")
    for k, v in med.items():
        rate = "" if k in ("mgr async save()", "mgr async blocked") else f"{gb / v:.2f}"
        print(f"| {k} | {v:.3f} | {rate} |")
    print(f"| first async save, blocked (allocates buffers) | {first_blocked:.3f} | |")
    print("\n| ratio | value | target |")
    print("|---|---|---|")
    print(f"| mgr sync save / dcp.save | {med['mgr sync'] / med['dcp.save']:.3f} | <= 1.05 |")
    print(f"| mgr load / dcp.load | {med['mgr load'] / med['dcp.load']:.3f} | <= 1.05 |")
    print(
        f"| mgr load cold / dcp.load cold | "
        f"{med['mgr load cold'] / med['dcp.load cold']:.3f} | <= 1.05 |"
    )
    print(
        f"| mgr async blocked / mgr sync save | "
        f"{med['mgr async blocked'] / med['mgr sync']:.3f} | <= 0.10 |"
    )
    print(f"| mgr async total / mgr sync save | {med['mgr async total'] / med['mgr sync']:.3f} | |")
    print(f"| dcp.save / disk | {med['dcp.save'] / med['disk']:.3f} | |")


if __name__ == "__main__":
    main()
