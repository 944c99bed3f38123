"""Exports at intervals, written by CheckpointManager, leave training and resume untouched."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from ckpt_core import CheckpointConfig, CheckpointManager
from ckpt_core.reference import LlamaStateDictAdapter, build_model
from ckpt_core.storage import layout

LAST = 6


def _run(root, steps, *, exports: bool, async_mode: str, seed: int = 0):
    """Train the tiny flavor through a manager (resuming if ``root`` holds a step)."""
    torch.manual_seed(seed)
    model = build_model("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    export = {"enable": exports, "folder": str(root / "export"), "format": "hf"}
    config = CheckpointConfig(
        folder=str(root / "ckpt"),
        interval=2,
        async_mode=async_mode,
        export={**export, "dtype": "bfloat16", "interval": 1},
    )
    manager = CheckpointManager(
        config,
        model,
        optimizers=opt,
        lr_schedulers=sched,
        sd_adapter=LlamaStateDictAdapter(model.args),
    )
    resumed = manager.load()
    losses = {}
    for n in steps:
        batch = torch.randint(0, 256, (2, 17))  # from the (checkpointed) global RNG
        loss = torch.nn.functional.cross_entropy(
            model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()
        manager.maybe_wait_for_staging()
        opt.step()
        sched.step()
        losses[n] = loss.item()
        manager.save(n, last_step=n == LAST)
    manager.close()
    return model, opt, sched, losses, resumed


def _assert_same_tensors(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_exports_at_intervals_do_not_disturb_resume(tmp_path, async_mode):
    ref_model, ref_opt, ref_sched, ref_losses, _ = _run(
        tmp_path / "plain", range(1, LAST + 1), exports=False, async_mode=async_mode
    )
    assert not (tmp_path / "plain" / "export").exists()

    run = tmp_path / "exports"
    _, _, _, first, _ = _run(run, range(1, 4), exports=True, async_mode=async_mode)
    assert layout.committed_steps(str(run / "ckpt")) == [2]  # "crash" after step 3
    model, opt, sched, losses, resumed = _run(
        run, range(3, LAST + 1), exports=True, async_mode=async_mode, seed=7
    )
    assert resumed
    assert {**first, **losses} == ref_losses
    _assert_same_tensors(model.state_dict(), ref_model.state_dict(), "model")
    _assert_same_tensors(opt.state_dict(), ref_opt.state_dict(), "optimizer")
    assert sched.state_dict() == ref_sched.state_dict()

    # Exports never become resume points, and each holds that step's weights.
    assert layout.committed_steps(str(run / "export")) == list(range(1, LAST + 1))
    assert layout.committed_steps(str(run / "ckpt")) == [2, 4, 6]
    want = LlamaStateDictAdapter(model.args).to_hf(model.state_dict())
    with safe_open(str(run / "export" / f"step-{LAST}" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(want)
        for key in want:
            assert torch.equal(f.get_tensor(key), want[key].bfloat16()), key
