"""A resume refuses a checkpoint whose recorded config differs in a field that changes the math."""

from __future__ import annotations

import pytest
import torch

from ckpt_core import CheckpointManager
from ckpt_core.config import CheckpointConfig
from ckpt_core.errors import CheckpointError
from ckpt_core.reference import LlamaStateDictAdapter, build_model, model_args


def _manager(folder, scaling):
    args = model_args("tiny")
    args.rope_scaling = scaling
    torch.manual_seed(0)
    model = build_model(args)
    cfg = CheckpointConfig(folder=str(folder), interval=1, export={"enable": False})
    return CheckpointManager(cfg, [model], sd_adapter=LlamaStateDictAdapter(model.args))


SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_resume_refuses_a_checkpoint_saved_with_other_rope_scaling(tmp_path):
    saver = _manager(tmp_path, dict(SCALING))
    saver.save(1)
    saver.close()
    same = _manager(tmp_path, dict(SCALING))
    assert same.load()
    same.close()
    other = _manager(tmp_path, {**SCALING, "original_max_position_embeddings": 256})
    with pytest.raises(CheckpointError) as info:
        other.load()
    other.close()
    message = str(info.value)
    assert "rope_parameters" in message and "\n" not in message
