"""The child side of ``ckpt selftest``: train, save, resume a tiny model; report as JSON lines.

Run as ``python -m ckpt_core.selftest_worker '<tasks as JSON>'``. Each task
trains or resumes a small MLP (about a million parameters, AdamW, a step
scheduler) through :class:`~ckpt_core.policy.manager.CheckpointManager` on the
storage under test. The data of step ``s`` is drawn from a generator seeded
with ``s``, so two runs that hold the same state at step ``s`` hold the same
state at every later step: a resume is bit-exact when the digest of the
resumed run equals the digest an uninterrupted run printed at the same step.

Every event is one line on stdout, ``@@selftest {json}``, flushed at once (the
parent kills this process at a moment it picks from these lines):

* ``{"event": "digest", "task", "step", "digest"}`` after each training step;
* ``{"event": "save-begin" | "save-end", "task", "step", "seconds"}`` around a save;
* ``{"event": "resumed", "task", "step", "digest"}`` after a load;
* ``{"event": "verified", "task", "problems": [...]}``: every committed step
  checked against its manifest (sizes and CRC-32);
* ``{"event": "refused", "task", "message"}`` / ``{"event": "not-refused", "task"}``
  for a second writer;
* ``{"event": "done" | "error", "task", "seconds", "error"?}`` at the end of each task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import Any

PREFIX = "@@selftest "
DIM = 512
LAYERS = 4


def emit(event: str, task: str, **fields: Any) -> None:
    """One event line on stdout, flushed."""
    print(PREFIX + json.dumps({"event": event, "task": task, **fields}), flush=True)


class _Run:
    """A tiny MLP, its optimizer and scheduler, and a manager on ``folder``."""

    def __init__(self, folder: str, *, async_mode: str, interval: int, seed: int) -> None:
        import torch
        from torch import nn

        from ckpt_core import CheckpointConfig
        from ckpt_core.policy.manager import CheckpointManager

        torch.manual_seed(seed)
        self.torch = torch
        self.model = nn.Sequential(*[nn.Linear(DIM, DIM) for _ in range(LAYERS)])
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.sched = torch.optim.lr_scheduler.StepLR(self.optim, step_size=2, gamma=0.9)
        config = CheckpointConfig(
            folder=folder,
            interval=interval,
            async_mode=async_mode,
            export={"enable": False},
        )
        self.manager = CheckpointManager(
            config, self.model, optimizers=self.optim, lr_schedulers=self.sched
        )

    def step(self, step: int) -> None:
        gen = self.torch.Generator().manual_seed(step)
        x = self.torch.randn(8, DIM, generator=gen)
        y = self.torch.randn(8, DIM, generator=gen)
        loss = (self.model(x) - y).square().mean()
        loss.backward()
        self.manager.maybe_wait_for_staging()
        self.optim.step()
        self.optim.zero_grad()
        self.sched.step()

    def digest(self) -> str:
        """SHA-256 over the model's tensors, the optimizer state and the scheduler state."""
        sha = hashlib.sha256()

        def feed(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k in sorted(value, key=str):
                    feed(f"{prefix}.{k}", value[k])
            elif isinstance(value, list | tuple):
                for i, v in enumerate(value):
                    feed(f"{prefix}.{i}", v)
            elif isinstance(value, self.torch.Tensor):
                t = value.detach().cpu().contiguous()
                sha.update(f"{prefix}:{t.dtype}:{list(t.shape)}".encode())
                sha.update(t.view(-1).view(self.torch.uint8).numpy().tobytes())
            else:
                sha.update(f"{prefix}={value!r}".encode())

        feed("model", self.model.state_dict())
        feed("optimizer", self.optim.state_dict()["state"])
        feed("lr", self.sched.state_dict())
        return sha.hexdigest()

    def save(self, task: str, step: int) -> None:
        emit("save-begin", task, step=step)
        start = time.perf_counter()
        self.manager.save(step)
        emit("save-end", task, step=step, seconds=time.perf_counter() - start)


def _acquire(manager: Any) -> None:
    if hasattr(manager, "acquire"):
        manager.acquire()


def train(spec: dict[str, Any]) -> None:
    """Steps ``1..steps``, saving steps up to ``save_upto`` (every ``interval``)."""
    task = spec["task"]
    run = _Run(spec["folder"], async_mode=spec["async_mode"], interval=spec["interval"], seed=0)
    _acquire(run.manager)
    for step in range(1, spec["steps"] + 1):
        run.step(step)
        emit("digest", task, step=step, digest=run.digest())
        if step <= spec["save_upto"]:
            run.save(task, step)
    run.manager.close()


def resume(spec: dict[str, Any]) -> None:
    """Load the newest committed step, train on to ``steps`` saving each interval, verify."""
    from ckpt_core.storage import layout, manifest

    task = spec["task"]
    for step in spec.get("partial") or []:  # what a crashed save leaves behind
        tmp = layout.tmp_step_dir(spec["folder"], step)
        layout.makedirs(tmp)
        layout.write_file(layout.join(tmp, ".metadata"), b"torn by ckpt selftest")
    if spec.get("corrupt") is not None:
        emit("injected", task, what=corrupt(spec["folder"], spec["corrupt"]))
    run = _Run(spec["folder"], async_mode=spec["async_mode"], interval=spec["interval"], seed=1)
    _acquire(run.manager)
    loaded = run.manager.load()
    step = run.manager.train_state.step if loaded else 0
    emit("resumed", task, step=step, digest=run.digest())
    for s in range(step + 1, spec["steps"] + 1):
        run.step(s)
        emit("digest", task, step=s, digest=run.digest())
        run.save(task, s)
    run.manager.close()
    problems = []
    for s in layout.committed_steps(spec["folder"]):
        folder = layout.step_dir(spec["folder"], s)
        problems += [f"step-{s}/{p}" for p in manifest.verify(folder)]
    emit("verified", task, steps=layout.committed_steps(spec["folder"]), problems=problems)


def corrupt(folder: str, step: int) -> str:
    """Flip one byte in the middle of the largest file of committed ``step``; names it."""
    from ckpt_core.storage import layout, manifest

    step_folder = layout.step_dir(folder, step)
    files = (manifest.read(step_folder) or {"files": {}})["files"]
    name = max(files, key=lambda n: files[n]["size"])
    path = layout.join(step_folder, name)
    with layout.open_file(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    layout.write_file(path, bytes(data))
    return f"flipped a byte of step-{step}/{name}"


def second_writer(spec: dict[str, Any]) -> None:
    """Start a writer on a folder another process holds: it must be refused."""
    from ckpt_core.errors import CkptError

    run = _Run(spec["folder"], async_mode="disabled", interval=1, seed=2)
    try:
        run.manager.acquire()
        run.step(1)
        run.manager.save(1)
    except CkptError as exc:
        emit("refused", spec["task"], message=str(exc).splitlines()[0])
    else:
        emit("not-refused", spec["task"])
    finally:
        run.manager.close()


TASKS = {"train": train, "resume": resume, "second_writer": second_writer}


def main(argv: list[str]) -> int:
    """Run each task of the JSON list ``argv[0]`` in order; one failing does not stop the rest."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for spec in json.loads(argv[0]):
        start = time.perf_counter()
        try:
            TASKS[spec["op"]](spec)
        except Exception as exc:  # noqa: BLE001 - reported to the parent as a FAIL
            first = (str(exc).splitlines() or [""])[0]
            emit("error", spec["task"], error=f"{type(exc).__name__}: {first}")
        else:
            emit("done", spec["task"], seconds=time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
