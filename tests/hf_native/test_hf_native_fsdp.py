"""The seven families under FSDP2 on 2 gloo ranks, all in one process group (one spawn).

Per family, on both ranks: an uninterrupted run (async checkpoints and fp32 HF
exports at steps 2 and 4), a run resumed from step 2 that must end
bit-identical, and a fresh sharded model initial-loaded from the export. The
test process then loads the export in transformers and compares logits with
the sharded model's.
"""

from __future__ import annotations

import pytest

from tests.core._dist import run_on_ranks
from tests.hf_native import _families as f

pytest.importorskip("transformers")


def _all_families(rank: int, world_size: int, root: str) -> dict:
    out = {}
    for family in sorted(f.FAMILIES):
        folder = f"{root}/{family}"
        cfg = f.config(folder, async_mode="async")
        model = f.shard(f.build(family, seed=0))
        _, opt = f.run(model, cfg)
        want = f.full_state(model, opt)
        trained_logits = f.logits(model)

        resumed = f.shard(f.build(family, seed=1))
        manager, opt = f.run(resumed, cfg, load_step=2)
        got = f.full_state(resumed, opt)

        from ckpt_core import CheckpointManager

        initial = {"path": f"{folder}/export/step-4", "format": "hf"}
        fresh = f.shard(f.build(family, seed=2))
        loader = CheckpointManager(f.config(f"{folder}/again", initial_load=initial), fresh)
        assert loader.load()
        loaded = f.full_state(fresh, None)
        if rank == 0:
            out[family] = {
                "want": want,
                "resumed": got,
                "loaded_step": manager._loaded_step,
                "initial": loaded,
                "logits": trained_logits,
                "tied": fresh.lm_head.weight is fresh.model.embed_tokens.weight,
            }
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    return root, run_on_ranks(_all_families, 2, str(root), timeout=300)[0]


@pytest.mark.parametrize("family", sorted(f.FAMILIES))
def test_fsdp2_resume_is_bit_identical_and_the_export_loads_with_equal_logits(family, two_ranks):
    import numpy as np

    root, results = two_ranks
    result = results[family]
    assert result["loaded_step"] == 2
    f.assert_identical(result["resumed"], result["want"])
    model_state = {k: v for k, v in result["want"].items() if k.startswith("model.")}
    f.assert_identical(result["initial"], model_state)
    assert result["tied"] == (family in f.TIED)

    loaded = f.from_export(str(root / family / "export" / "step-4"))
    diff = np.abs(f.logits(loaded) - result["logits"]).max()
    assert diff < 1e-5, (family, diff)
