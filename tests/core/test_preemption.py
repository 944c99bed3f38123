"""Preemption signals: parsing, the handler (real signals), and the manager's collective
flag and save on two gloo ranks. The trainer's behaviour is in tests/e2e."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ckpt_core import CheckpointConfig
from ckpt_core.policy.preemption import (
    DUPLICATE_WINDOW_S,
    PREEMPTED_EXIT,
    PreemptionHandler,
    parse_signals,
)
from ckpt_core.storage import layout
from tests.core._dist import run_on_ranks


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("SIGTERM", [signal.SIGTERM]),
        ("term", [signal.SIGTERM]),
        ("SIGTERM, usr1", [signal.SIGTERM, signal.SIGUSR1]),
        (["SIGUSR2", "SIGUSR2"], [signal.SIGUSR2]),
        ("none", []),
        ([], []),
        (None, []),
    ],
)
def test_signal_names_parse(value, want):
    assert list(parse_signals(value)) == want


@pytest.mark.parametrize("bad", ["SIGKILL", "SIGSEGV", "SIGNOPE", "15x"])
def test_uncatchable_or_unknown_signals_are_config_errors_naming_them(bad):
    with pytest.raises(ValueError, match=f"{bad!r} is not a signal"):
        CheckpointConfig(preemption_signal=bad)


def test_the_first_signal_only_sets_a_flag_and_uninstall_restores_the_old_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append("old"))
    try:
        handler = PreemptionHandler([signal.SIGUSR1])
        handler.install()
        assert not handler.requested and handler.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested and handler.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGUSR1)  # within the duplicate window: same notice
        assert handler.requested
        handler.uninstall()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == ["old"]
    finally:
        signal.signal(signal.SIGUSR1, previous)


_SECOND_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys, time
    from ckpt_core.policy.preemption import PreemptionHandler
    handler = PreemptionHandler([signal.SIGUSR1])
    handler.install()
    os.kill(os.getpid(), signal.SIGUSR1)
    if sys.argv[1] == "saved":
        handler.saved()
    time.sleep({gap})
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(30)  # never reached: the second signal exits at once
    sys.exit(0)
    """
).format(gap=DUPLICATE_WINDOW_S + 0.1)


@pytest.mark.parametrize(
    ("phase", "code"), [("saving", 128 + signal.SIGUSR1), ("saved", PREEMPTED_EXIT)]
)
def test_a_second_signal_exits_at_once_with_its_own_status(phase, code):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _SECOND_SIGNAL, phase], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == code, proc.stderr
    assert time.monotonic() - start < 20
    assert f"second SIGUSR1: exiting now with {code}" in proc.stderr


def _two_ranks(rank: int, world_size: int, folder: str) -> tuple[bool, bool, list[int]]:
    """Rank 1 alone gets SIGUSR1; both ranks must agree, then save the step together."""
    from tests.core._manager_models import Trainable

    run = Trainable(folder=folder, interval=100, preemption_signal="SIGUSR1")
    handler = run.manager.install_preemption_handler()
    run.step()
    before = run.manager.preemption_requested()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    assert handler.requested == (rank == 1)
    after = run.manager.preemption_requested()
    saved = run.manager.save_now(1)
    run.manager.close()
    handler.uninstall()
    return before, after and saved, layout.committed_steps(folder)


def test_every_rank_sees_a_signal_one_rank_got_and_saves_the_step(tmp_path):
    results = run_on_ranks(_two_ranks, 2, str(tmp_path))
    assert results == [(False, True, [1]), (False, True, [1])]


def test_save_now_waits_for_an_async_save_and_skips_a_committed_step(tmp_path):
    from tests.core._manager_models import Trainable

    run = Trainable(folder=str(tmp_path), interval=1, async_mode="async")
    run.step()
    run.manager.save(1)  # in flight in the background
    assert run.manager.save_now(1)  # waits for it; step 1 is not written twice
    run.step()
    assert run.manager.save_now(2)
    run.manager.close()
    assert layout.committed_steps(str(tmp_path)) == [1, 2]
    assert run.manager.install_preemption_handler("none") is None
