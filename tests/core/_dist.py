"""Run a function on N gloo ranks in fresh processes (CPU), for tests.

    from tests.core._dist import run_on_ranks

    def body(rank, world_size, folder):   # module-level; runs in each child
        ...

    results = run_on_ranks(body, 2, str(tmp_path))   # [rank 0's return, rank 1's]

Each child sets ``torch.set_num_threads(1)``, joins a gloo process group, runs
``fn(rank, world_size, *args)`` and tears the group down. If any rank fails,
``run_on_ranks`` raises ``RuntimeError`` with that rank's traceback; a rank that
hangs past ``timeout`` seconds is killed. Children are forked on CPU-only machines
(fast) and spawned where CUDA is available (autograd's device threads do not
survive a fork); ``CKPT_TEST_START_METHOD=fork|spawn`` overrides.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = float(os.environ.get("CKPT_TEST_RANK_TIMEOUT", "180"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world_size: int, port: int, args: tuple, out: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        try:
            result = fn(rank, world_size, *args)
            dist.barrier()  # no rank tears gloo down while a peer still talks to it
        finally:
            dist.destroy_process_group()
        out.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        out.put((rank, False, traceback.format_exc()))
        out.close()
        out.join_thread()  # flush the report before _exit skips the queue's feeder thread
        os._exit(1)


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; their results."""
    import torch

    default = "spawn" if torch.cuda.is_available() else "fork"
    ctx = mp.get_context(os.environ.get("CKPT_TEST_START_METHOD", default))
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, out), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, ok, value = out.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(results) - set(errors))
                errors.update({r: f"rank {r} timed out after {timeout}s" for r in missing})
                break
            (results if ok else errors)[rank] = value
            if not ok:
                # Peers of a failed rank usually block in a collective: give them a moment.
                timeout = min(timeout, 20.0)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        first = min(errors)
        raise RuntimeError(
            f"rank {first} of {world_size} failed:\n{errors[first]}"
            + "".join(f"\n(rank {r} also failed)" for r in sorted(errors) if r != first)
        )
    return [results[r] for r in range(world_size)]
