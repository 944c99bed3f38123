"""Helpers for the ``ckpt train`` end-to-end tests: real processes, real files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ckpt_core.storage import layout, manifest

#: A few-second run of the tiny flavor: 24 steps, checkpoints every 3.
STEPS = 24
TINY = [
    "--model.name",
    "tiny",
    "--training.seq_len",
    "32",
    "--training.batch_size",
    "4",
    "--training.warmup_steps",
    "3",
    "--training.lr",
    "1e-3",
    "--checkpoint.interval",
    "3",
    "--checkpoint.export.enable",
    "false",
]

CONVERTER_SETS = {
    "none": [],
    "lora": ["lora"],
    "qat": ["qat"],
    "float8": ["float8"],
    "qat+lora": ["qat", "lora"],
}


def converter_args(names: list[str]) -> list[str]:
    """``--converters.enabled a,b`` (nothing for no converters)."""
    if not names:
        return []
    return ["--converters.enabled", ",".join(names)]


#: Converters this repository ships: CI installs them all, so a missing or broken one fails.
BUNDLED = {"lora": "ckpt_plugins_lora", "qat": "ckpt_plugins_qat", "float8": "ckpt_plugins_float8"}


def plugin_missing(names: list[str]) -> str | None:
    """Why a converter set cannot run here (a third-party converter not installed), else None.

    A bundled converter that is not installed, fails to import or lacks the
    ``convert`` hook fails the calling test (``pytest.fail``): it is broken, not absent.
    """
    from importlib.metadata import entry_points

    import pytest

    from ckpt_core.protocol.hookspecs import ENTRY_POINT_GROUP

    # Entry points directly: the workers discover them even if this process has
    # CKPT_DISABLE_PLUGIN_AUTOLOAD set.
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in names:
        if name not in found:
            if name in BUNDLED:
                pytest.fail(
                    f"bundled converter {name!r} is not installed: pip install -e ./{BUNDLED[name]}"
                )
            return f"converter {name!r} is not installed"
        try:
            cls = found[name].load()
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's
            pytest.fail(f"converter {name!r} fails to import: {type(exc).__name__}: {exc}")
        if not callable(getattr(cls, "convert", None)):
            pytest.fail(f"converter {name!r} has no convert hook")
    return None


def seeded_rng(what: str) -> random.Random:
    """A random generator whose seed is printed (shown with a failure's output) and can be
    replayed with ``CKPT_TEST_SEED=<seed>``."""
    seed = int(os.environ.get("CKPT_TEST_SEED") or random.randrange(1 << 30))
    print(f"{what} seed: {seed} (replay: CKPT_TEST_SEED={seed})")
    return random.Random(seed)


def env() -> dict[str, str]:
    """The workers' environment: plugin discovery on, one thread, unbuffered."""
    out = dict(os.environ)
    out.pop("CKPT_DISABLE_PLUGIN_AUTOLOAD", None)
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return out


def command(folder: Path, *args: str, steps: int = STEPS, nproc: int = 1) -> list[str]:
    """``python -m ckpt_core.cli.main train`` on the tiny flavor in ``folder``."""
    cmd = [sys.executable, "-m", "ckpt_core.cli.main", "train", *TINY]
    cmd += ["--training.steps", str(steps), "--job.folder", str(folder), *args]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return cmd


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion, capturing output."""
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def run_ok(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion and fail the test with the output when it fails."""
    proc = run(cmd, cwd, timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def records(folder: Path) -> list[dict]:
    """Every complete metrics line, in order."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


def losses(folder: Path) -> dict[int, float]:
    """Step -> loss (the last line of each step)."""
    return {r["step"]: r["loss"] for r in records(folder)}


def committed_steps(folder: Path) -> list[int]:
    """Steps discovery would consider (committed step-N folders)."""
    return layout.committed_steps(str(folder / "checkpoints"))


def damaged_steps(folder: Path) -> dict[int, list[str]]:
    """Committed steps whose files do not match their manifest (should be none)."""
    out = {}
    for step in committed_steps(folder):
        problems = manifest.verify(layout.step_dir(str(folder / "checkpoints"), step))
        if problems:
            out[step] = [str(p) for p in problems]
    return out


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    """Start a run in the background (output to files in ``cwd``)."""
    out = open(cwd / "stdout.txt", "w")  # noqa: SIM115 - owned by the child
    err = open(cwd / "stderr.txt", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=out, stderr=err)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240, delay: float = 0.0) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` holds; fails if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it was killed")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill the run")
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is not None:
        raise AssertionError(f"the run ended (exit {proc.returncode}) before it was killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def kill_in_background(proc: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 240):
    """:func:`kill_when` in a thread; returns ``join()``, which re-raises its failure."""
    failures: list[BaseException] = []

    def target() -> None:
        try:
            kill_when(proc, ready, timeout, delay)
        except BaseException as exc:  # noqa: BLE001 - handed to join()
            failures.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(timeout + 30)
        if thread.is_alive():
            proc.kill()
            raise AssertionError("the killer thread did not finish")
        if failures:
            raise failures[0]

    return join
