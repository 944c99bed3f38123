"""Benchmark: bf16 Hugging Face export of an fp32 model.

Compares, on the same reference-Llama weights (``--size-gib`` of fp32, default 1):

* ``ckpt``: :func:`ckpt_core.policy.exporter.write_export` (``fmt="hf"``, bf16): export
  view, cast tensor by tensor into one reused buffer, safetensors + index +
  config + manifest, temporary folder committed by rename, fsync'd;
* ``dcp_hf``: ``torch.distributed.checkpoint`` ``HuggingFaceStorageWriter``
  (one process), fed the HF-named tensors cast to bf16 (the cast is timed: DCP
  cannot cast), then fsync'd;
* ``save_file``: ``safetensors.torch.save_file`` of tensors already cast to
  bf16 (the cast is not timed: a lower bound for one file), then fsync'd.

Variants alternate inside each repetition (the machine is shared); the table
reports medians, throughput in GB/s of bf16 data written, the ratio to
``dcp_hf``, and the peak resident memory above what the process held before
the variant (sampled every 2 ms from ``/proc/self/statm``).

    python benchmarks/bench_export.py --size-gib 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled on a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, rss_bytes())
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base


def fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def model_for(size_gib: float):
    """A reference Llama of about ``size_gib`` GiB in fp32 (dim 2048, vocab 32000)."""
    from ckpt_core.reference import ModelArgs, build_model

    base = ModelArgs(
        dim=2048, n_layers=1, n_heads=16, n_kv_heads=8, vocab_size=32000, ffn_hidden_dim=5632
    )
    per_layer = ModelArgs(**{**base.to_dict(), "n_layers": 2}).num_params() - base.num_params()
    fixed = base.num_params() - per_layer
    layers = max(1, round((size_gib * 2**30 / 4 - fixed) / per_layer))
    args = ModelArgs(**{**base.to_dict(), "n_layers": layers})
    return build_model(args)


def run_ckpt(model, adapter, out: str) -> None:
    from ckpt_core import ModelWrapper
    from ckpt_core.policy.exporter import write_export

    write_export(ModelWrapper(model), out, fmt="hf", dtype="bfloat16", sd_adapter=adapter)


def run_dcp_hf(model, adapter, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from ckpt_core.policy.exporter import single_process_quiet

    hf = {k: v.to(torch.bfloat16) for k, v in adapter.to_hf(model.state_dict()).items()}
    with single_process_quiet():
        dcp.save(hf, storage_writer=HuggingFaceStorageWriter(out))
    del hf
    fsync_tree(out)


def run_save_file(precast: dict, out: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out)
    save_file(precast, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    fsync_tree(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="fp32 model size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--variants", default="ckpt,dcp_hf,save_file")
    parser.add_argument("--json", default=None, help="also write results as JSON here")
    args = parser.parse_args()

    from ckpt_core.reference import LlamaStateDictAdapter

    model = model_for(args.size_gib)
    adapter = LlamaStateDictAdapter(model.args)
    sd = model.state_dict()
    fp32_bytes = sum(t.numel() * 4 for t in sd.values())
    bf16_bytes = fp32_bytes // 2
    largest = max(t.numel() * 4 for t in sd.values())
    print(
        f"model: {len(sd)} tensors, {fp32_bytes / 2**30:.2f} GiB fp32, largest tensor "
        f"{largest / 2**20:.0f} MiB fp32; bf16 output {bf16_bytes / 1e9:.2f} GB"
    )
    precast = None
    variants = args.variants.split(",")
    if "save_file" in variants:
        precast = {k: v.to(torch.bfloat16) for k, v in adapter.to_hf(sd).items()}
    del sd
    scratch = args.dir or tempfile.mkdtemp(prefix="bench_export_")
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, list[int]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        order = variants if rep % 2 == 0 else variants[::-1]
        for name in order:
            out = os.path.join(scratch, f"{name}-{rep}")
            time.sleep(0.6)  # let freed memory go back to the host between variants
            with PeakRSS() as mem:
                start = time.perf_counter()
                if name == "ckpt":
                    run_ckpt(model, adapter, out)
                elif name == "dcp_hf":
                    run_dcp_hf(model, adapter, out)
                elif name == "save_file":
                    run_save_file(precast, out)
                else:
                    raise SystemExit(f"unknown variant {name!r}; known: ckpt,dcp_hf,save_file")
                elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            peaks[name].append(mem.extra)
            shutil.rmtree(out, ignore_errors=True)
            print(f"  rep {rep} {name:10s} {elapsed:7.2f} s  peak +{mem.extra / 2**20:7.0f} MiB")
    if args.dir is None:
        shutil.rmtree(scratch, ignore_errors=True)

    base = statistics.median(times["dcp_hf"]) if "dcp_hf" in times else None
    rows = []
    print()
    print("| variant | median s | GB/s bf16 | × dcp_hf | peak extra RSS MiB (median / max) |")
    print("|---|---|---|---|---|")
    for name in variants:
        med = statistics.median(times[name])
        ratio = f"{base / med:.1f}" if base else "-"
        peak_med = statistics.median(peaks[name]) / 2**20
        peak_max = max(peaks[name]) / 2**20
        print(
            f"| {name} | {med:.2f} | {bf16_bytes / med / 1e9:.2f} | {ratio} | "
            f"{peak_med:.0f} / {peak_max:.0f} |"
        )
        rows.append(
            {
                "variant": name,
                "median_s": med,
                "gbps": bf16_bytes / med / 1e9,
                "times": times[name],
                "peak_extra_bytes": peaks[name],
            }
        )
    print(
        f"\nlargest tensor {largest / 2**20:.0f} MiB fp32, write buffer 64 MiB; "
        f"model {fp32_bytes / 2**20:.0f} MiB fp32"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size_gib": args.size_gib,
                    "fp32_bytes": fp32_bytes,
                    "largest_tensor_bytes": largest,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
