"""Tensor-parallel degree checks and the manifest's layout record, without a process group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckpt_core.errors import ConfigError
from ckpt_core.policy.parallel_layout import (
    describe_layout,
    family_of,
    layout_lines,
    pipeline_split,
)
from ckpt_core.reference import build_model
from ckpt_core.trainer.parallel import build_mesh, check_tensor_parallel, data_parallel


def test_a_tp_degree_that_does_not_divide_the_heads_is_one_config_error_listing_the_allowed():
    model = build_model("tiny")  # 4 heads, 2 key/value heads
    check_tensor_parallel(model, 2)
    with pytest.raises(ConfigError) as err:
        check_tensor_parallel(model, 4)
    msg = str(err.value)
    assert "parallelism.tensor_parallel_degree = 4" in msg
    assert "n_kv_heads (2)" in msg and "[1, 2]" in msg
    assert "\n" not in msg


def test_tp_on_a_model_without_a_plan_is_a_config_error():
    with pytest.raises(ConfigError, match="no TP plan"):
        check_tensor_parallel(nn.Linear(4, 4), 2)


def test_one_rank_has_no_mesh_and_is_its_own_data_parallel_group():
    assert build_mesh({"pp": 1, "dp_shard": 1, "ep": 1, "tp": 1}, "cpu") is None
    assert data_parallel(None) == (0, 1)


def test_parameter_families_fold_layer_numbers():
    assert family_of("layers.3.attention.wq.weight") == "layers.*.attention.wq.weight"
    assert family_of("layers.12.moe.experts.w1") == "layers.*.moe.experts.w1"
    assert family_of("tok_embeddings.weight") == "tok_embeddings.weight"


def test_a_one_rank_state_dict_records_no_layout_and_the_split_lists_every_module():
    model = build_model("tiny")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    split = pipeline_split([model])
    assert split == [
        {
            "ranks": [0],
            "parts": [{"layers": ["0", "1"], "modules": ["norm", "output", "tok_embeddings"]}],
        }
    ]
    assert describe_layout(sd, split) is None
    assert torch.is_tensor(sd["norm.weight"])


def test_inspect_lines_for_old_and_new_manifests():
    assert layout_lines(None) == ["layout: one process, no mesh"]
    old = {"shape": [2], "dim_names": [], "device_type": "cpu", "placements": ["Shard(dim=0)"]}
    assert layout_lines(old) == ["mesh [2] (cpu)", "  placements ['Shard(dim=0)']"]
    new = {
        "shape": [2, 2],
        "dim_names": ["dp_shard", "tp"],
        "device_type": "cpu",
        "root": {"shape": [1, 2, 2], "dim_names": ["pp", "dp_shard", "tp"]},
        "families": {"norm.weight": [], "layers.*.attention.wo.weight": ["tp: Shard(1)"]},
        "pipeline": [{"ranks": [0, 1], "parts": [{"layers": ["0"], "modules": ["norm"]}]}],
    }
    assert layout_lines(new) == [
        "mesh pp=1 x dp_shard=2 x tp=2 (cpu)",
        "  norm.weight: whole on every rank",
        "  layers.*.attention.wo.weight: tp: Shard(1)",
        "  ranks [0, 1]: layers 0 + norm",
    ]


def test_a_malformed_layout_record_is_shown_as_it_is():
    bad = {"root": {"shape": 3, "dim_names": 7}, "families": {"x": 5}, "pipeline": [1]}
    assert layout_lines(bad) == [f"mesh {bad!r}"]
