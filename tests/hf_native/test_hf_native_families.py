"""transformers models of seven families checkpointed and exported with no adapter (1 rank).

Per family, one uninterrupted run (checkpoints and fp32 HF exports at steps 2
and 4), then: the export loads in transformers with the trained model's logits;
a run resumed from step 2 ends bit-identical to the uninterrupted one; a fresh
model initial-loaded from the export holds the trained weights exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.hf_native import _families as f

pytest.importorskip("transformers")


def hf_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys |= set(handle.keys())
    return keys


@pytest.fixture(scope="module", params=sorted(f.FAMILIES))
def trained(request, tmp_path_factory):
    """One uninterrupted run of a family: (family, folder, model, its full state at step 4)."""
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    model = f.build(family, seed=0)
    _, opt = f.run(model, f.config(str(folder)))
    return family, folder, model, f.full_state(model, opt)


def test_export_loads_in_transformers_with_the_trained_logits(trained):
    family, folder, model, _ = trained
    export = folder / "export" / "step-4"
    assert (folder / "export" / "step-2").is_dir()  # export interval 2
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    assert config["model_type"] == model.config.model_type
    assert config["dtype"] == "float32"
    keys = hf_keys(export)
    assert keys == set(model.state_dict()) - ({"lm_head.weight"} if family in f.TIED else set())
    loaded = f.from_export(str(export))
    if family in f.TIED:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    diff = abs(f.logits(loaded) - f.logits(model.eval())).max()
    assert diff < 1e-5, (family, diff)


def test_resume_from_step_two_ends_bit_identical_to_the_uninterrupted_run(trained):
    family, folder, _, want = trained
    model = f.build(family, seed=1)  # other weights: everything must come from the checkpoint
    manager, opt = f.run(model, f.config(str(folder)), load_step=2)
    assert manager._loaded_step == 2
    f.assert_identical(f.full_state(model, opt), want)


def test_initial_load_from_the_export_gives_the_trained_weights(trained, tmp_path):
    family, folder, model, _ = trained
    initial = {"path": str(folder / "export" / "step-4"), "format": "hf"}
    fresh = f.build(family, seed=2)
    cfg = f.config(str(tmp_path), initial_load=initial)
    from ckpt_core import CheckpointManager

    manager = CheckpointManager(cfg, fresh)
    assert manager.load()
    got, want = fresh.state_dict(), model.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), (family, key)
    if family in f.TIED:
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_manifest_records_the_hf_adapter_and_the_model_config(trained):
    from ckpt_core.storage import manifest

    family, folder, model, _ = trained
    record = manifest.read(str(folder / "ckpt" / "step-4"))["model"]
    assert record["adapter"] == "hf"
    assert record["config"]["model_type"] == model.config.model_type
    assert record["config"]["tie_word_embeddings"] == (family in f.TIED)


def test_compiled_model_gets_the_adapter_and_canonical_names(tmp_path):
    from ckpt_core import CheckpointManager
    from ckpt_core.content.hf_native import HFNativeAdapter

    model = f.build("gemma3")
    compiled = torch.compile(model)  # compiled lazily: nothing here runs the compiler
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    manager = CheckpointManager(f.config(str(tmp_path)), compiled)
    adapter = manager.sd_adapter
    assert isinstance(adapter, HFNativeAdapter)
    assert adapter.config["architectures"] == ["Gemma3ForCausalLM"]
    assert adapter.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    manager.save(1, last_step=True)
    manager.close()
    assert hf_keys(tmp_path / "export" / "step-1") == set(model.state_dict()) - {"lm_head.weight"}


def test_explicit_adapter_from_model_and_a_plain_module_refused():
    from ckpt_core import HFNativeAdapter
    from ckpt_core.content.hf_native import adapter_for
    from ckpt_core.errors import ConfigError

    adapter = HFNativeAdapter.from_model(f.build("llama"))
    assert adapter.tied == {} and adapter.update_hf_config({"dtype": "bfloat16"})["dtype"] == (
        "bfloat16"
    )
    assert adapter_for(torch.nn.Linear(2, 2)) is None
    offline = HFNativeAdapter.from_hf_config(HFNativeAdapter.from_model(f.build("gemma3")).config)
    assert offline.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert HFNativeAdapter.from_hf_config(adapter.config).tied == {}
    with pytest.raises(ConfigError, match="Linear is not a transformers PreTrainedModel"):
        HFNativeAdapter.from_model(torch.nn.Linear(2, 2))
