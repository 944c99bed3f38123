"""torchtitan's layouts and names, and the recorded rotary layout, without torchtitan installed."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_core.errors import CheckpointError
from ckpt_core.torchtitan import Heads, from_torchtitan, keys, to_torchtitan
from ckpt_core.torchtitan.tensors import (
    fuse_qkv,
    half_to_interleaved,
    interleaved_to_half,
    split_qkv,
)

HEADS = Heads(n_heads=4, n_kv_heads=2, tied=False)


def test_the_rotary_permutation_and_its_inverse_move_rows_within_each_head():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    half = interleaved_to_half(w, 4)
    assert torch.equal(half_to_interleaved(half, 4), w)
    # head 0, pair 1: rows 2 (real) and 3 (imaginary) go to rows 1 and 1 + head_dim / 2
    assert torch.equal(half[1], w[2]) and torch.equal(half[5], w[3])
    assert torch.equal(half[8:16].sort(0).values, w[8:16].sort(0).values)  # within its head


def test_the_fused_qkv_splits_by_kv_group_and_fuses_back():
    hd = 2
    wq, wk, wv = (torch.randn(n * hd, 3) for n in (4, 2, 2))
    fused = fuse_qkv(wq, wk, wv, 4, 2)
    assert torch.equal(fused[: 2 * hd], wq[: 2 * hd])  # group 0: its two query heads first
    assert torch.equal(fused[2 * hd : 3 * hd], wk[:hd])
    q, k, v = split_qkv(fused, 4, 2)
    assert torch.equal(q, wq) and torch.equal(k, wk) and torch.equal(v, wv)


@pytest.mark.parametrize(
    "name, native",
    [
        ("layers.3.attention.qkv_linear.wq.weight", ("layers.3.attention.wq.weight", "q")),
        ("layers.3.attention.wk.weight", ("layers.3.attention.wk.weight", "k")),  # ≤ 0.2
        ("model.layers.0.attention.wv.weight", ("layers.0.attention.wv.weight", "v")),  # renamed
        ("layers.1.attention.qkv_linear.wqkv.weight", ("layers.1.attention.wq.weight", "qkv")),
        ("lm_head.weight", ("output.weight", None)),
        ("output.weight", ("output.weight", None)),
        ("layers.0.feed_forward.w2.weight", ("layers.0.feed_forward.w2.weight", None)),
        ("layers.0.attention.rotary.inv_freq", None),
    ],
)
def test_torchtitan_names_of_every_version_map_to_ckpts(name, native):
    assert keys.to_native(name) == native


def test_keys_that_show_a_torchtitan_folder():
    assert keys.torchtitan_evidence(["tok_embeddings.weight"]) == "tok_embeddings.weight"
    assert keys.torchtitan_evidence(["train_state.ntokens_seen", "model.x"])
    assert keys.torchtitan_evidence(["model.layers.0.attention.qkv_linear.wq.weight"])
    assert (
        keys.torchtitan_evidence(["model.layers.0.attention.wq.weight", "train_state.step"]) is None
    )


def _state(tied: bool) -> dict:
    torch.manual_seed(0)
    hd, dim = 2, 6
    out = {
        "tok_embeddings.weight": torch.randn(10, dim),
        "layers.0.attention.qkv_linear.wq.weight": torch.randn(4 * hd, dim),
        "layers.0.attention.qkv_linear.wk.weight": torch.randn(2 * hd, dim),
        "layers.0.attention.qkv_linear.wv.weight": torch.randn(2 * hd, dim),
        "norm.weight": torch.randn(dim),
        "lm_head.weight": torch.randn(10, dim),
        "optimizer.state.layers.0.attention.qkv_linear.wqkv.weight.exp_avg": torch.randn(16, dim),
        "optimizer.state.layers.0.attention.qkv_linear.wqkv.weight.step": torch.tensor(7.0),
        "optimizer.param_groups.layers.0.attention.qkv_linear.wqkv.weight.lr": 0.1,
        "optimizer.state.tok_embeddings.weight.exp_avg": torch.randn(10, dim),
        "optimizer.state.tok_embeddings.weight.step": torch.tensor(7.0),
        "optimizer.param_groups.tok_embeddings.weight.lr": 0.1,
        "train_state.step": 7,
        "train_state.ntokens_seen": 700,
        "lr_scheduler.last_epoch": 7,
        "dataloader.dp_rank_0": b"pickled",
    }
    if tied:
        out["lm_head.weight"] = out["tok_embeddings.weight"]
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_a_whole_state_goes_to_ckpt_and_back_unchanged(tied):
    heads = Heads(4, 2, tied)
    state = _state(tied)
    ckpt = from_torchtitan(state, heads, source="t")
    assert ckpt.entries["train_state.tokens_seen"] == 700
    assert "dataloader.dp_rank_0" in ckpt.dropped
    assert ("model.output.weight" in ckpt.entries) is not tied
    steps = [v for k, v in ckpt.entries.items() if k.endswith(".step") and "attention" in k]
    assert len(steps) == 3 and len({id(s) for s in steps}) == 3  # Adam bumps each in place
    back = to_torchtitan(ckpt.entries, heads, source="c").entries
    for key, value in state.items():
        if key.startswith("dataloader"):
            assert key not in back
        elif isinstance(value, torch.Tensor):
            assert torch.equal(back[key], value), key
        else:
            assert back[key] == value, key


def test_a_qkv_group_with_different_hyperparameters_is_refused_for_torchtitan():
    entries = {
        f"optimizer.param_groups.layers.0.attention.{p}.weight.lr": lr
        for p, lr in (("wq", 0.1), ("wk", 0.1), ("wv", 0.2))
    }
    with pytest.raises(CheckpointError, match="one param group"):
        to_torchtitan(entries, HEADS, source="c")


# -- the recorded layout ------------------------------------------------------------------


def _saved(tmp_path):
    from ckpt_core import CheckpointConfig, CheckpointManager
    from ckpt_core.reference import LlamaStateDictAdapter, ModelArgs, build_model

    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, ffn_hidden_dim=64)
    model = build_model(args)

    def manager(folder, **extra):
        cfg = CheckpointConfig(folder=str(folder), export={"enable": False}, **extra)
        return CheckpointManager(cfg, model, sd_adapter=LlamaStateDictAdapter(args))

    run = manager(tmp_path / "ckpt")
    run.save(1, last_step=True)
    run.close()
    return tmp_path / "ckpt" / "step-1", manager


def test_manifests_record_the_rotary_layout_and_a_different_one_is_refused(tmp_path):
    step, manager = _saved(tmp_path)
    path = step / "manifest.json"
    data = json.loads(path.read_text())
    assert data["model"]["rope_layout"] == "rotate_half"
    assert manager(tmp_path / "ckpt").load()
    data["model"]["rope_layout"] = "interleaved"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'interleaved' rotary layout"):
        manager(tmp_path / "ckpt").load()
    with pytest.raises(CheckpointError, match="'interleaved' rotary layout"):
        manager(tmp_path / "new", initial_load={"path": str(step)}).load()


def test_a_manifest_of_ckpt_0_1_without_a_layout_means_rotate_half(tmp_path):
    step, manager = _saved(tmp_path)
    path = step / "manifest.json"
    data = json.loads(path.read_text())
    del data["model"]["rope_layout"]
    path.write_text(json.dumps(data))
    assert manager(tmp_path / "ckpt").load()


def test_a_converter_key_is_refused_for_torchtitan():
    entries = {"model.layers.0.attention.wq.lora_a.weight": torch.zeros(2, 3)}
    with pytest.raises(CheckpointError, match="converter"):
        to_torchtitan(entries, HEADS, source="c")
