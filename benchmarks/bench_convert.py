"""Benchmark: ``ckpt convert`` of a large fp32 DCP checkpoint to bf16 Hugging Face safetensors.

One run, on one source (a reference-Llama DCP checkpoint of ``--size-gib`` fp32,
written directly as a DCP save of random tensors under the reference Llama's
key names, with its manifest), measures side by side:

* ``disk``: the disk's durable write rate, ``dd`` of zeros with ``O_DIRECT`` and
  ``fsync`` (before and after the converts);
* ``old``: ``ckpt convert`` as it was before streaming (git commit ``1325242``,
  checked out into a temporary worktree and run with ``PYTHONPATH`` there): it
  builds the model, loads it whole, then exports;
* ``stream``: today's ``ckpt convert`` with ``--workers 1`` and ``--workers 2``;
* ``dcp_hf``: DCP's own route: the checkpoint loaded whole, renamed, cast to
  bf16 and saved with ``torch.distributed.checkpoint.HuggingFaceStorageWriter``.

Each variant runs in a fresh process that imports what it needs, resets its peak
RSS (``/proc/self/clear_refs``), runs, and reports its wall time and its peak
resident memory above that baseline (``VmHWM``); for ``--workers 2`` the forked
worker's peak is reported too. The page cache is dropped before each variant when
the machine allows it (the table says whether it did).

    python benchmarks/bench_convert.py --size-gib 4.2 --dir /tmp/bench-convert

Needs about ``2.5 x size`` of free disk in ``--dir``; everything is removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_COMMIT = "1325242"

RUNNER = r"""
import json, os, resource, shutil, sys, time

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

mode, warmup, src, out = sys.argv[1:5]
import torch
from ckpt_core.cli.main import main


def dcp_hf(src, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from ckpt_core.policy.exporter import single_process_quiet
    from ckpt_core.reference import LlamaStateDictAdapter
    from ckpt_core.reference.hf_config import from_hf_config
    from ckpt_core.storage import manifest
    from ckpt_core.storage.safe_metadata import read_metadata, safe_load

    meta = read_metadata(src)
    state = {k[len("model."):]: torch.empty(v.size, dtype=v.properties.dtype)
             for k, v in meta.state_dict_metadata.items() if k.startswith("model.")}
    with single_process_quiet():
        safe_load({"model": state}, src, metadata=meta)
    adapter = LlamaStateDictAdapter(from_hf_config(manifest.read(src)["model"]["config"]))
    hf = {k: v.to(torch.bfloat16) for k, v in adapter.to_hf(state).items()}
    del state
    with single_process_quiet():
        dcp.save(hf, storage_writer=HuggingFaceStorageWriter(out))
    del hf
    for root, _, files in os.walk(out):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def once(src, out):
    if mode == "dcp_hf":
        return dcp_hf(src, out)
    workers = mode.split(":")[1] if ":" in mode else None
    argv = ["convert", src, out, "--to", "hf", "--dtype", "bfloat16", "--no-progress"]
    assert main(argv + (["--workers", workers] if workers else [])) == 0


once(warmup, out + "-warmup")  # every module a convert imports, imported before the baseline
shutil.rmtree(out + "-warmup")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status("VmRSS")
start = time.perf_counter()
once(src, out)
seconds = time.perf_counter() - start
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "extra": status("VmHWM") - base, "base": base,
                  "child_peak": children}))
"""


def drop_caches() -> bool:
    """Drop the page cache (root only); whether it worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_rate(folder: str, nbytes: int = 2 << 30) -> float:
    """Durable write rate in bytes/s: dd of zeros, O_DIRECT, fsync at the end."""
    path = os.path.join(folder, "dd.bin")
    block = 64 << 20
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={nbytes // block}",
         "oflag=direct", "conv=fsync"],
        check=True, capture_output=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    os.remove(path)
    return nbytes / seconds


def make_source(folder: str, size_gib: float, dim: int = 1024) -> dict:
    """A reference-Llama DCP checkpoint of about ``size_gib`` fp32 with its manifest."""
    import torch
    import torch.distributed.checkpoint as dcp

    from ckpt_core.policy.exporter import single_process_quiet
    from ckpt_core.reference import LlamaStateDictAdapter, ModelArgs, build_model
    from ckpt_core.storage import manifest

    ffn, vocab = dim * 11 // 4, 32000 if dim >= 256 else 64
    per_layer = (4 * dim * dim + 3 * dim * ffn + 2 * dim) * 4
    layers = max(1, round((size_gib * 2**30 - 2 * vocab * dim * 4) / per_layer))
    args = ModelArgs(
        dim=dim, n_layers=layers, n_heads=8, n_kv_heads=8, vocab_size=vocab, ffn_hidden_dim=ffn
    )
    meta = build_model(args, device="meta")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in meta.state_dict().items():
        state[key] = torch.empty(value.shape).normal_(generator=generator)
    nbytes = sum(t.numel() * 4 for t in state.values())
    largest = max(t.numel() * 4 for t in state.values())
    with single_process_quiet():
        dcp.save({"model": state}, checkpoint_id=folder)
    del state
    model = LlamaStateDictAdapter(args).describe()
    files = manifest.file_entries(folder)
    manifest.write(folder, manifest.build(kind="checkpoint", step=1, files=files, model=model))
    return {
        "layers": layers,
        "bytes": nbytes,
        "largest": largest,
        "tensors": len(meta.state_dict()),
    }


def run(mode: str, src: str, warmup: str, out: str, pythonpath: str | None = None) -> dict:
    """One variant in a fresh process; its JSON report plus whether the cache was dropped."""
    dropped = drop_caches()
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, mode, warmup, src, out],
        capture_output=True, text=True, env=env, cwd=pythonpath or REPO,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["written"] = sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(out)
        for f in files
        if f.endswith(".safetensors")
    )
    report["cache_dropped"] = dropped
    shutil.rmtree(out)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=4.2, help="fp32 source size")
    parser.add_argument("--dir", default="/tmp/bench-convert", help="scratch folder")
    parser.add_argument("--variants", default="old,stream:1,stream:2,dcp_hf")
    parser.add_argument("--json", default=None, help="also write the results here")
    opts = parser.parse_args()

    subprocess.run(["df", "-h", "/tmp", opts.dir if os.path.exists(opts.dir) else "/tmp"])
    os.makedirs(opts.dir, exist_ok=True)
    src = os.path.join(opts.dir, "src")
    old = "/tmp/oldckpt"
    results: dict = {"size_gib": opts.size_gib}
    try:
        results["source"] = make_source(src, opts.size_gib)
        warmup = os.path.join(opts.dir, "warmup")
        make_source(warmup, 0.0, dim=64)
        results["disk_before"] = disk_rate(opts.dir)
        variants = opts.variants.split(",")
        if "old" in variants:
            subprocess.run(
                ["git", "-C", REPO, "worktree", "add", "--detach", old, OLD_COMMIT],
                check=True, capture_output=True,
            )  # fmt: skip
        for mode in variants:
            path = old if mode == "old" else None
            results[mode] = run(mode, src, warmup, os.path.join(opts.dir, "out"), path)
            print(mode, json.dumps(results[mode]), flush=True)
        results["disk_after"] = disk_rate(opts.dir)
    finally:
        if os.path.exists(old):
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", old])
        shutil.rmtree(opts.dir, ignore_errors=True)
    print_table(results)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)


def print_table(results: dict) -> None:
    """The markdown table of docs/performance.md."""
    source = results["source"]
    disk = (results["disk_before"] + results["disk_after"]) / 2
    bound = 2 * source["largest"] + (256 << 20)
    print(
        f"\nsource: {source['bytes'] / 2**30:.2f} GiB fp32, {source['layers']} layers, "
        f"{source['tensors']} tensors, largest {source['largest'] / 2**20:.0f} MiB; "
        f"disk durable write {results['disk_before'] / 1e9:.2f} / "
        f"{results['disk_after'] / 1e9:.2f} GB/s (before / after); "
        f"RSS target {bound / 2**20:.0f} MiB\n"
    )
    columns = (
        "variant | seconds | written GB/s | x disk | source GB/s | peak extra RSS | cache dropped"
    )
    print(f"| {columns} |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("old", "stream:1", "stream:2", "dcp_hf"):
        r = results.get(mode)
        if r is None:
            continue
        rate = r["written"] / r["seconds"]
        extra = f"{r['extra'] / 2**20:.0f} MiB"
        if mode == "stream:2":
            extra += f" (+ worker peak RSS {r['child_peak'] / 2**20:.0f} MiB)"
        print(
            f"| {mode} | {r['seconds']:.1f} | {rate / 1e9:.2f} | {rate / disk:.2f} | "
            f"{source['bytes'] / r['seconds'] / 1e9:.2f} | {extra} | {r['cache_dropped']} |"
        )


if __name__ == "__main__":
    main()
