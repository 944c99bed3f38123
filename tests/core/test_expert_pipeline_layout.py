"""Expert and pipeline parallel layouts without processes: the checks and the split.

The multi-rank runs (gradients, resume across layouts, exports) are in
tests/e2e/test_train_expert_pipeline.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ckpt_core.errors import ConfigError
from ckpt_core.reference.flavors import FLAVORS
from ckpt_core.reference.model import Transformer
from ckpt_core.reference.moe import MOE_FLAVORS, MoETransformer
from ckpt_core.trainer.config import ParallelismConfig
from ckpt_core.trainer.expert_parallel import check_expert_parallel
from ckpt_core.trainer.pipeline import microbatches, split_stage, stages_per_rank


def _llama(n_layers: int, tied: bool = False) -> Transformer:
    args = copy.deepcopy(FLAVORS["tiny"])
    args.n_layers, args.tie_word_embeddings = n_layers, tied
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    return model


def test_expert_parallel_degree_must_divide_the_experts() -> None:
    model = MoETransformer(copy.deepcopy(MOE_FLAVORS["tiny"]))  # 4 experts
    check_expert_parallel(model, 2)
    check_expert_parallel(model, 4)
    with pytest.raises(ConfigError) as err:
        check_expert_parallel(model, 3)
    msg = str(err.value)
    assert "parallelism.expert_parallel_degree = 3" in msg and "[1, 2, 4]" in msg, msg
    assert "\n" not in msg


def test_expert_parallel_needs_experts() -> None:
    with pytest.raises(ConfigError, match="no stacked experts.*moe:tiny"):
        check_expert_parallel(_llama(2), 2)
    check_expert_parallel(_llama(2), 1)  # degree 1 is always fine


def test_pipeline_degree_must_divide_the_layers() -> None:
    assert stages_per_rank(_llama(4), 2) == 2  # looped: two stages per rank
    assert stages_per_rank(_llama(2), 2) == 1
    assert stages_per_rank(_llama(6), 3) == 2
    with pytest.raises(ConfigError) as err:
        stages_per_rank(_llama(3), 2)
    msg = str(err.value)
    assert "pipeline_parallel_degree = 2" in msg and "3 layers" in msg and "[1, 3]" in msg
    with pytest.raises(ConfigError, match="ties its input and output embeddings"):
        stages_per_rank(_llama(4, tied=True), 2)


def test_microbatches_default_to_the_stages_and_must_divide_the_batch() -> None:
    par = ParallelismConfig(pipeline_parallel_degree=2)
    assert microbatches(par, num_stages=4, pp=2, local_batch=4) == 4
    with pytest.raises(ConfigError, match="does not divide the per-replica batch 6"):
        microbatches(par, num_stages=4, pp=2, local_batch=6)
    par = ParallelismConfig(pipeline_parallel_degree=2, pipeline_parallel_microbatches=3)
    with pytest.raises(ConfigError, match="multiple of pipeline_parallel_degree 2"):
        microbatches(par, num_stages=4, pp=2, local_batch=6)
    assert microbatches(par, num_stages=2, pp=2, local_batch=6) == 3  # one stage per rank


@pytest.mark.parametrize("family", ["llama", "moe"])
def test_stages_keep_names_and_chain_to_the_whole_model(family: str) -> None:
    if family == "moe":
        args = copy.deepcopy(MOE_FLAVORS["tiny"])
        args.n_layers = 4
        torch.manual_seed(0)
        model = MoETransformer(args)
        model.init_weights()
    else:
        model = _llama(4)
    tokens = torch.randint(256, (2, 8), generator=torch.Generator().manual_seed(0))
    stages = [split_stage(model, s, 4) for s in range(4)]
    keys = [set(stage.state_dict()) for stage in stages]
    assert set().union(*keys) == set(model.state_dict())
    assert sum(len(k) for k in keys) == len(model.state_dict())  # disjoint
    assert all(k.startswith("layers.1.") for k in keys[1])
    assert "tok_embeddings.weight" in keys[0] and "output.weight" in keys[3]
    h = tokens
    with torch.no_grad():
        for stage in stages:
            h = stage(h)
        assert torch.equal(h, model(tokens))
