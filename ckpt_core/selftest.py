"""``ckpt selftest``: does save / kill / resume hold on *this* storage?

A small fault matrix a user runs on the storage a job will use (a local disk,
an NFS mount, an fsspec URI). Everything runs in child processes
(:mod:`ckpt_core.selftest_worker`) under ``PATH/ckpt-selftest-<random>/``:

1. a writer trains a tiny model for ``steps`` steps, saving (sync in one folder,
   async in another) up to ``steps - 2``, and prints a digest of its whole state
   after every step: the reference;
2. ``kill`` writers save every step and are SIGKILLed at a seeded random moment
   inside a save (the seed is printed; ``--seed`` replays it);
3. the parent leaves partial ``.tmp-step-N`` folders (a torn file) beside the
   sync folder's steps and, when the one-writer lock exists, holds the lock on
   a folder of its own;
4. one fresh process resumes every folder, trains on to ``steps`` and checks
   every committed step against its manifest, and a second writer tries the
   locked folder.

A case holds when the resumed digest equals the reference at the resumed step
and at the last step (bit-exact), every committed step verifies, no partial
folder is loaded, and the second writer is refused. ``inject="corrupt"`` flips
a byte of a committed step before the resume, to show that a damaged storage
is reported as FAIL. A ``memory://`` store lives inside one process, so there
every task runs in one child and the kill and lock cases are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ckpt_core.selftest_worker import PREFIX
from ckpt_core.storage import layout

INJECTIONS = ("corrupt",)


@dataclass
class Case:
    """One row of the report."""

    name: str
    status: str = "FAIL"  # PASS | FAIL | SKIP
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Plan:
    """What one selftest run does."""

    root: str
    seed: int
    quick: bool = True
    inject: str | None = None
    steps: int = field(init=False)
    kills: int = field(init=False)

    def __post_init__(self) -> None:
        self.steps = 6 if self.quick else 10
        self.kills = 1 if self.quick else 3

    def folder(self, name: str) -> str:
        return layout.join(self.root, name)


def lock_available() -> bool:
    """Whether the one-writer lock (:mod:`ckpt_core.storage.lock`) is part of this install."""
    return importlib.util.find_spec("ckpt_core.storage.lock") is not None


def one_process_store(path: str) -> bool:
    """A store that only the process that wrote it can see (``memory://``)."""
    return path.startswith("memory://")


def new_root(path: str) -> str:
    """``PATH/ckpt-selftest-<random>``, created."""
    root = layout.join(path, f"ckpt-selftest-{secrets.token_hex(4)}")
    layout.makedirs(root)
    return root


# -- child processes -----------------------------------------------------------------


def _spawn(tasks: list[dict[str, Any]]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "ckpt_core.selftest_worker", json.dumps(tasks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _events(line: str) -> dict[str, Any] | None:
    return json.loads(line[len(PREFIX) :]) if line.startswith(PREFIX) else None


def run_tasks(tasks: list[dict[str, Any]], timeout: float = 600) -> list[dict[str, Any]]:
    """Run ``tasks`` in one child; its events (a crash becomes an ``error`` per open task)."""
    proc = _spawn(tasks)
    out, err = proc.communicate(timeout=timeout)
    events = [e for e in map(_events, out.splitlines()) if e is not None]
    if proc.returncode != 0:
        ended = {e["task"] for e in events if e["event"] in ("done", "error")}
        last = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        events += [
            {"event": "error", "task": t["task"], "error": f"worker died: {last}"}
            for t in tasks
            if t["task"] not in ended
        ]
    return events


def run_killed(task: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Run a saving ``train`` task and SIGKILL it at a random moment inside one save.

    The save to hit is drawn from steps 3..steps-1 and the moment from the time
    the earlier saves after the first took (the first is slower). Returns what
    happened (for the report).
    """
    target = rng.randint(3, task["steps"] - 1)
    fraction = rng.random()
    start = time.perf_counter()
    proc = _spawn([task])
    durations: list[float] = []
    killed_after = None
    assert proc.stdout is not None
    for line in proc.stdout:
        event = _events(line)
        if event is None:
            continue
        if event["event"] == "save-end":
            durations.append(event["seconds"])
        if event["event"] == "save-begin" and event["step"] == target:
            delay = fraction * min(durations[1:] or durations or [0.05])
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            killed_after = delay
            break
    rest, err = proc.communicate(timeout=60)
    events = [e for e in map(_events, rest.splitlines()) if e is not None]
    error = _first(events, "error")
    folder = task["folder"]
    if target in layout.committed_steps(folder):
        left = f"step {target} was committed"
    elif layout.exists(layout.tmp_step_dir(folder, target)):
        left = f"it left {layout.TMP_PREFIX}{target}"
    else:
        left = "it left nothing of that step"
    return {
        "left": left,
        "target": target,
        "killed_after": killed_after,
        "save_finished_first": any(
            e["event"] == "save-end" and e["step"] == target for e in events
        ),
        "returncode": proc.returncode,
        "error": error["error"] if error else (err.strip().splitlines() or [""])[-1],
        "seconds": time.perf_counter() - start,
    }


# -- the matrix ---------------------------------------------------------------------


def _by_task(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        out.setdefault(e["task"], []).append(e)
    return out


def _digests(events: list[dict[str, Any]]) -> dict[int, str]:
    return {e["step"]: e["digest"] for e in events if e["event"] == "digest"}


def _first(events: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((e for e in events if e["event"] == name), None)


def _seconds(*groups: list[dict[str, Any]]) -> float:
    return sum(e.get("seconds", 0.0) for g in groups for e in g if e["event"] == "done")


def check_resume(
    events: list[dict[str, Any]], reference: dict[int, str], steps: int, expect: int | None
) -> tuple[bool, str]:
    """Whether a resume task held: bit-exact at the resumed and the last step, clean verify."""
    error = _first(events, "error")
    if error is not None:
        return False, error["error"]
    resumed = _first(events, "resumed")
    verified = _first(events, "verified")
    if resumed is None or verified is None:
        return False, "the resume task reported nothing"
    step = resumed["step"]
    if expect is not None and step != expect:
        return False, f"resumed from step {step}, expected the newest committed step {expect}"
    if step == 0:
        return False, "nothing was resumed (no committed step found)"
    if resumed["digest"] != reference.get(step):
        return False, f"state loaded from step {step} differs from the state saved there"
    final = resumed["digest"] if step == steps else _digests(events).get(steps)
    if final != reference.get(steps):
        return False, f"training on from step {step} ended in a different state at step {steps}"
    if verified["problems"]:
        return False, f"committed step does not match its manifest: {verified['problems'][0]}"
    return True, f"resumed step {step} bit-exact; steps {verified['steps']} verify"


def run_matrix(plan: Plan, progress: Any = None) -> list[Case]:
    """Run every case of ``plan``; ``progress(text)`` is told what runs now."""
    say = progress or (lambda _text: None)
    rng = random.Random(plan.seed)
    steps, saved = plan.steps, plan.steps - 2
    one_process = one_process_store(plan.root)
    common = {"steps": steps, "save_upto": saved, "interval": 2}
    writers = [
        dict(common, op="train", task="sync", folder=plan.folder("sync"), async_mode="disabled"),
        dict(common, op="train", task="async", folder=plan.folder("async"), async_mode="async"),
    ]
    kills = [
        dict(
            op="train",
            task=f"kill{i}",
            folder=plan.folder(f"kill{i}"),
            async_mode="disabled",
            steps=steps,
            save_upto=steps,
            interval=1,
        )
        for i in range(plan.kills)
    ]

    def resumer(name: str, async_mode: str = "disabled") -> dict[str, Any]:
        return dict(
            op="resume",
            task=f"resume-{name}",
            folder=plan.folder(name),
            async_mode=async_mode,
            steps=steps,
            interval=1,
        )

    partial = [saved + 1, 10 * steps]
    resumes = [
        dict(resumer("sync"), partial=partial, corrupt=saved if plan.inject == "corrupt" else None),
        resumer("async", "async"),
    ]
    resumes += [resumer(k["task"]) for k in kills]
    cases: dict[str, Case] = {}
    kill_reports: list[dict[str, Any]] = []

    if one_process:
        say("training, saving and resuming in one process (memory:// store)")
        events = run_tasks(writers + resumes[:2])
        kills = []
    else:
        say(f"training and saving (sync, async) under {plan.root}")
        events = run_tasks(writers)
        for task in kills:
            say(f"killing a writer inside a save ({task['task']}, seed {plan.seed})")
            kill_reports.append(run_killed(task, rng))
        holder = None
        contender: list[dict[str, Any]] = []
        if lock_available():
            from ckpt_core.storage import lock

            holder = lock.acquire(plan.folder("locked"), "selftest holder")
            contender = [dict(op="second_writer", task="second", folder=plan.folder("locked"))]
        say("resuming every folder in a fresh process")
        try:
            events += run_tasks(resumes + contender)
        finally:
            if holder is not None:
                holder.release()
    tasks = _by_task(events)
    reference = _digests(tasks.get("sync", []))
    ref_error = _first(tasks.get("sync", []), "error")

    for name, label in (("sync", "sync save + resume"), ("async", "async save + resume")):
        writer, back = tasks.get(name, []), tasks.get(f"resume-{name}", [])
        case = cases[name] = Case(label, seconds=_seconds(writer, back))
        if ref_error or _first(writer, "error"):
            case.detail = (ref_error or _first(writer, "error"))["error"]
            continue
        if name == "async" and _digests(writer) != reference:
            case.detail = "training with async saves differs from training with sync saves"
            continue
        ok, case.detail = check_resume(back, reference, steps, saved)
        case.status = "PASS" if ok else "FAIL"
        injected = _first(back, "injected")
        if injected is not None:
            case.detail += f" (injected: {injected['what']})"

    back = tasks.get("resume-sync", [])
    case = cases["partial"] = Case("partial .tmp-step-N never loaded", seconds=_seconds(back))
    resumed = _first(back, "resumed")
    verified = _first(back, "verified") or {"steps": []}
    if resumed is None:
        case.detail = "the resume of the sync folder did not run"
    elif resumed["step"] in partial or partial[1] in verified["steps"]:
        case.detail = f"a partial folder was taken for a step ({resumed['step']})"
    elif saved + 1 not in verified["steps"]:
        case.detail = f"the save of step {saved + 1} over a torn .tmp-step-{saved + 1} failed"
    else:
        case.status = "PASS"
        case.detail = (
            f"resumed step {resumed['step']} beside torn .tmp-step-{partial[0]} and "
            f".tmp-step-{partial[1]}; step {saved + 1} saved over the torn one"
        )

    for i, task in enumerate(kills):
        back = tasks.get(f"resume-{task['task']}", [])
        report = kill_reports[i]
        case = cases[task["task"]] = Case(
            f"kill -9 inside a save (seed {plan.seed}, #{i + 1})",
            seconds=report["seconds"] + _seconds(back),
        )
        committed = _first(back, "verified")
        if report["killed_after"] is None:
            case.detail = f"the writer ended before the save of step {report['target']}: " + (
                report["error"] or f"exit status {report['returncode']}"
            )
            continue
        ok, detail = check_resume(back, reference, steps, None)
        where = (
            "after that save finished"
            if report["save_finished_first"]
            else f"{report['killed_after'] * 1000:.0f} ms into it"
        )
        case.status = "PASS" if ok else "FAIL"
        case.detail = (
            f"killed in the save of step {report['target']}, {where} ({report['left']}); {detail}"
        )
        if committed is not None and ok:
            case.detail += "; the dead writer's lock did not block"
    if one_process:
        for label in ("kill -9 inside a save", "second writer refused"):
            cases[label] = Case(label, "SKIP", detail="memory:// is private to one process")
    elif not lock_available():
        cases["second"] = Case(
            "second writer refused", "SKIP", detail="skipped: one-writer lock not available"
        )
    else:
        second = tasks.get("second", [])
        case = cases["second"] = Case("second writer refused", seconds=_seconds(second))
        refused = _first(second, "refused")
        if refused is not None:
            case.status, case.detail = "PASS", refused["message"].split(". ")[0]
        else:
            error = _first(second, "error")
            case.detail = error["error"] if error else "a second writer was let in"
    return list(cases.values())
