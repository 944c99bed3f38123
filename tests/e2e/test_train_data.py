"""The trainer's synthetic token stream and config: pure functions, no processes."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ckpt_core.errors import ConfigError
from ckpt_core.trainer.config import load_train_config
from ckpt_core.trainer.data import SyntheticTokens


def make(rank: int = 0, world_size: int = 1, **kw) -> SyntheticTokens:
    args = dict(vocab_size=256, seq_len=16, batch_size=4, seed=3)
    args.update(kw)
    return SyntheticTokens(rank=rank, world_size=world_size, **args)


def test_a_batch_is_a_pure_function_of_seed_and_position():
    a, b = make(), make()
    for _ in range(3):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(next(make(seed=4))[0], next(make())[0])


def test_targets_are_the_inputs_shifted_by_one():
    x, y = next(make())
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_two_ranks_together_see_exactly_the_one_rank_global_batch():
    one = make()
    two = [make(rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        full, _ = next(one)
        halves = [next(loader)[0] for loader in two]
        assert torch.equal(torch.cat(halves), full)


def test_loader_state_is_the_global_position_and_a_new_loader_continues_from_it():
    first = make()
    next(first)
    next(first)
    state = first.state_dict()
    assert state == {"position": 8}
    expected = next(first)[0]
    # Resume on a different world size: the same global batch, split in two.
    resumed = [make(rank=r, world_size=2) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(state)
    assert torch.equal(torch.cat([next(loader)[0] for loader in resumed]), expected)


def test_the_stream_is_learnable_its_next_token_entropy_is_far_below_uniform():
    loader = make(batch_size=64, seq_len=128)
    x, y = next(loader)
    pairs = Counter(zip(x.flatten().tolist(), y.flatten().tolist()))
    firsts = Counter(x.flatten().tolist())
    total = sum(pairs.values())
    cond_entropy = -sum(n / total * math.log(n / firsts[a]) for (a, _), n in pairs.items())
    assert cond_entropy < 0.5 * math.log(256)


def test_a_batch_that_does_not_split_evenly_across_ranks_is_a_config_error():
    with pytest.raises(ConfigError, match="batch_size = 4 is not divisible by the world size 3"):
        make(world_size=3)


def test_relative_paths_resolve_against_the_job_folder_and_absolute_ones_do_not():
    cfg = load_train_config(
        None, ["--job.folder", "/runs/a", "--checkpoint.export.folder", "/elsewhere/export"]
    )
    ckpt = cfg.resolved_checkpoint()
    assert ckpt.folder == "/runs/a/checkpoints"
    assert ckpt.export.folder == "/elsewhere/export"
    assert cfg.resolve(cfg.metrics.path) == "/runs/a/metrics.jsonl"
    assert cfg.resolve("memory://x/y") == "memory://x/y"


def test_the_embedded_default_is_the_debug_flavor_with_a_bf16_export_under_outputs():
    cfg = load_train_config()
    assert cfg.model.name == "debug"
    assert cfg.job.folder == "outputs"
    assert cfg.checkpoint.export.enable and cfg.checkpoint.export.dtype == "bfloat16"


def test_an_unknown_field_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"training\.stepz: unknown field"):
        load_train_config(None, ["--training.stepz", "3"])
