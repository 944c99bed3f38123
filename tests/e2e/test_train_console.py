"""What ``ckpt train`` shows and records: a bar on a terminal, log lines elsewhere, metrics."""

from __future__ import annotations

import math
import os
import pty
import subprocess

from tests.e2e import _train as t

STEPS = 6
SHORT = ["--metrics.log_every", "3", "--checkpoint.interval", "6"]


def run_on_a_terminal(cmd: list[str], cwd) -> tuple[int, str]:
    """Run with stdin/stdout/stderr on a pseudo-terminal; (exit code, everything shown)."""
    env = t.env()
    env.update(TERM="xterm-256color", COLUMNS="160")
    for name in ("TTY_INTERACTIVE", "NO_COLOR", "FORCE_COLOR"):
        env.pop(name, None)
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_rank_0_shows_a_progress_bar_with_loss_and_throughput(tmp_path):
    code, shown = run_on_a_terminal(t.command(tmp_path, *SHORT, steps=STEPS), tmp_path)
    assert code == 0, shown[-3000:]
    assert "━" in shown and f"{STEPS}/{STEPS}" in shown  # rich's bar, completed
    assert "loss " in shown and "tok/s" in shown
    assert f"step {STEPS}/{STEPS}  loss" not in shown  # no plain progress lines under the bar
    assert "Saved checkpoint" in shown  # log lines still show, above the bar


def test_off_a_terminal_it_logs_plain_lines_and_writes_one_metrics_line_per_step(tmp_path):
    proc = t.run_ok(t.command(tmp_path, *SHORT, steps=STEPS), tmp_path)
    assert "━" not in proc.stdout + proc.stderr
    logged = [line for line in proc.stderr.splitlines() if "ckpt_core.trainer: step " in line]
    assert [line.split("step ")[1].split()[0] for line in logged] == ["3/6", "6/6"]
    assert all("loss " in line and "tok/s" in line for line in logged)

    records = t.records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    tokens_per_step = 4 * 32  # the tiny run's batch_size x seq_len
    for r in records:
        assert {"step", "loss", "tokens", "seconds"} <= set(r)
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["tokens"] == r["step"] * tokens_per_step
        assert 0 < r["seconds"] < 60
