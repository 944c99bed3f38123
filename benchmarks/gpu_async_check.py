"""GPU check of the async modes (needs CUDA): exact weights per step, and blocked time.

    python benchmarks/gpu_async_check.py

1. ``async_with_pinned_mem`` while training goes on: every saved step reloads with exactly
   the weights (and CUDA RNG state) it had when ``save`` was called.
2. ~1 GiB of fp32 parameters on the GPU: sync save vs ``async`` vs ``async_with_pinned_mem``,
   the time ``save`` blocks and the time ``maybe_wait_for_staging`` then waits (medians of 5).
"""

import logging
import shutil
import statistics
import tempfile
import time

import torch
from torch import nn

from ckpt_core import CheckpointConfig
from ckpt_core.policy.manager import CheckpointManager

dev = "cuda"


def build(seed, dim=256, layers=2):
    torch.manual_seed(seed)
    m = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)]).to(dev)
    o = torch.optim.AdamW(m.parameters(), lr=1e-2)
    return m, o


def snap(m):
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this check needs CUDA")
    logging.basicConfig(level=logging.WARNING)
    print("torch", torch.__version__, torch.cuda.get_device_name())
    root = tempfile.mkdtemp()
    # 1) correctness: async_with_pinned_mem holds exactly its step's weights while training goes on
    m, o = build(0)
    mgr = CheckpointManager(
        CheckpointConfig(folder=f"{root}/a", interval=2, async_mode="async_with_pinned_mem"),
        m,
        optimizers=o,
    )
    assert mgr._async.mode == "async_with_pinned_mem", mgr._async.mode
    assert mgr._async.stager.pin_memory
    exp = {}
    for step in range(1, 8):
        x = torch.randn(64, 256, device=dev)
        m(x).square().mean().backward()
        mgr.maybe_wait_for_staging()
        o.step()
        o.zero_grad()
        rng_before = torch.cuda.get_rng_state().clone()
        if mgr.save(step, last_step=step == 7):
            exp[step] = (snap(m), rng_before)
    mgr.close()
    ok = True
    for step, (weights, rng) in exp.items():
        m2, o2 = build(1)
        mg2 = CheckpointManager(CheckpointConfig(folder=f"{root}/a"), m2, optimizers=o2)
        mg2.load(step)
        same = all(torch.equal(weights[k], v.cpu()) for k, v in m2.state_dict().items())
        rng_ok = torch.equal(torch.cuda.get_rng_state(), rng)
        print(f"step {step}: weights identical {same}, cuda rng restored {rng_ok}")
        ok &= same and rng_ok
    print("PINNED CORRECTNESS", "OK" if ok else "FAILED")

    # 2) blocked time: ~1 GiB of fp32 on the GPU, sync vs async vs pinned (medians of 5)
    big = nn.ParameterList(
        [nn.Parameter(torch.randn(8192, 4096, device=dev)) for _ in range(8)]
    )  # 8 x 128 MiB
    res = {}
    for mode in ("disabled", "async", "async_with_pinned_mem"):
        mg = CheckpointManager(
            CheckpointConfig(folder=f"{root}/{mode}", interval=1, async_mode=mode), big
        )
        mg.save(1000)  # warm-up: allocates staging buffers
        mg.close() if mode == "disabled" else mg._async.wait()
        blocked, total = [], []
        for rep in range(1, 6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            mg.save(rep)
            t1 = time.perf_counter()
            mg.maybe_wait_for_staging()
            t2 = time.perf_counter()
            if mg._async is not None:
                mg._async.wait()
            t3 = time.perf_counter()
            blocked.append(t1 - t0)
            total.append(t3 - t0)
            res.setdefault(mode + " staging wait", []).append(t2 - t1)
            shutil.rmtree(f"{root}/{mode}/step-{rep}")
        mg.close()
        res[mode + " blocked"] = blocked
        res[mode + " total"] = total
    for k, v in res.items():
        print(f"{k}: median {statistics.median(v):.3f}s  {[round(x, 3) for x in v]}")
    sync = statistics.median(res["disabled blocked"])
    for mode in ("async", "async_with_pinned_mem"):
        b = statistics.median(res[mode + " blocked"]) + statistics.median(
            res[mode + " staging wait"]
        )
        print(f"{mode}: blocked+staging wait / sync save = {b / sync:.3f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
