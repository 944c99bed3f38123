"""One torchtitan run for the folder: trained on CPU, saved by torchtitan's own manager."""

from __future__ import annotations

import os
import socket

import pytest

pytest.importorskip("torchtitan", reason="torchtitan interop tests need the test extra")

STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gloo():
    """A one-process gloo group (torchtitan's manager and DCP run collectives on it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def titan(gloo, tmp_path_factory):
    """``(run, step folder)``: a torchtitan run trained STEPS steps and saved at STEPS."""
    import torch

    from tests.torchtitan import _titan

    root = tmp_path_factory.mktemp("titan")
    run = _titan.build(seed=0)
    gen = torch.Generator().manual_seed(1)
    first = _titan.train_step(run, _titan.batch(gen))
    for _ in range(STEPS - 1):
        last = _titan.train_step(run, _titan.batch(gen))
    assert last < 0.6 * first, (first, last)  # it learned something position-dependent
    manager = _titan.manager(run, str(root))
    manager.save(STEPS)
    manager.close()
    return run, str(root / "checkpoint" / f"step-{STEPS}")
