"""``TrainState``: the trainer's counters and random number generator states.

Saved as the ``"train_state"`` entry of every checkpoint, so a resumed run
continues with the same step, token count and random streams.

RNG policy: **rank 0's RNG states are saved and restored on every rank.** DCP
keeps one copy of a non-tensor entry that all ranks share, so per-rank states
could not be told apart anyway; saving rank 0's (broadcast when a process group
is up) makes the saved value deterministic and lets a run resume bit-exactly
on a different number of ranks. A trainer that needs different streams per
rank derives them after loading (e.g. ``torch.manual_seed(seed + rank)`` at the
start, then ``torch.manual_seed(base + rank)`` from a value it draws).

Captured: torch's CPU generator, the current CUDA device's generator when CUDA
is available, and Python's :mod:`random`.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist

from ckpt_core.rank_zero import distributed_on


def _python_rng_tensor() -> tuple[torch.Tensor, int, float]:
    version, internal, gauss = random.getstate()
    return (
        torch.tensor(internal, dtype=torch.int64),
        int(version),
        float("nan") if gauss is None else float(gauss),
    )


class TrainState:
    """Step, tokens seen and RNG states; a DCP ``Stateful``."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0
        #: CPU-capable group for the rank-0 broadcast (the manager sets its gloo group).
        self.process_group: Any = None

    def state_dict(self) -> dict[str, Any]:
        """Counters plus rank 0's RNG states (see the module docstring)."""
        py_state, py_version, py_gauss = _python_rng_tensor()
        rng: dict[str, Any] = {
            "torch_cpu": torch.get_rng_state(),
            "python_state": py_state,
            "python_version": py_version,
            "python_gauss": py_gauss,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {"step": int(self.step), "tokens_seen": int(self.tokens_seen), "rng": rng}
        if distributed_on() and dist.get_world_size() > 1:
            box = [state]
            group = self.process_group if self.process_group is not None else _cpu_group()
            dist.broadcast_object_list(box, src=0, group=group)
            state = box[0]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore counters and RNG states (missing RNG entries are left alone)."""
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        rng = state_dict.get("rng") or {}
        if "torch_cpu" in rng:
            torch.set_rng_state(rng["torch_cpu"].to(torch.uint8).cpu())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"].to(torch.uint8).cpu())
        if "python_state" in rng:
            gauss = float(rng.get("python_gauss", float("nan")))
            random.setstate(
                (
                    int(rng.get("python_version", 3)),
                    tuple(int(v) for v in rng["python_state"].tolist()),
                    None if gauss != gauss else gauss,
                )
            )

    def __repr__(self) -> str:
        return f"TrainState(step={self.step}, tokens_seen={self.tokens_seen})"


_GLOO: Any = None


def _cpu_group() -> Any:
    """A process group that can move Python objects on CPU (gloo when the default is not)."""
    global _GLOO
    if dist.get_backend() == "gloo":
        return None
    if _GLOO is None:
        _GLOO = dist.new_group(backend="gloo")
    return _GLOO
