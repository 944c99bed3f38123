"""``ckpt convert`` of a transformers model's checkpoint to HF, through the ``hf`` family.

The family is found through its entry point (ckpt-core declares it): the
manifest names ``hf``, and the converted folder loads in transformers with the
trained model's logits, tied ``lm_head`` left out.
"""

from __future__ import annotations

import pytest
from safetensors import safe_open

from tests.hf_native import _families as f

pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_convert_of_an_hf_native_checkpoint_loads_in_transformers(family, tmp_path):
    from ckpt_core.cli.main import main

    model = f.build(family)
    f.run(model, f.config(str(tmp_path), export={"enable": False}), steps=2)
    out = tmp_path / "out"
    argv = ["convert", str(tmp_path / "ckpt"), str(out), "--to", "hf", "--dtype", "float32"]
    assert main([*argv, "--no-progress"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert ("lm_head.weight" in handle.keys()) == (family not in f.TIED)
    loaded = f.from_export(str(out))
    assert abs(f.logits(loaded) - f.logits(model.eval())).max() < 1e-5
