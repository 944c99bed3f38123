"""torchtitan → ckpt: a torchtitan step converts (or loads) and computes what torchtitan does."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_core.cli.main import main
from tests.torchtitan import _titan
from tests.torchtitan.conftest import STEPS


def _probe() -> torch.Tensor:
    return _titan.batch(torch.Generator().manual_seed(123), size=8)


def _titan_logits(run) -> torch.Tensor:
    with torch.no_grad():
        return run.model(_probe())


def _llama(config: dict):
    from ckpt_core.content.families import model_family

    return model_family("llama").build_model(config)


def _ckpt_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_probe())


def _load_dcp_model(step: str):
    """The reference Llama of a converted ckpt step (architecture from its manifest)."""
    from ckpt_core.storage.dcp_entries import read_entries

    manifest = json.loads(open(f"{step}/manifest.json").read())
    model = _llama(manifest["model"]["config"])
    entries = read_entries(step, [k for k in _keys(step) if k.startswith("model.")])
    model.load_state_dict({k[len("model.") :]: v for k, v in entries.items()})
    return model, manifest


def _keys(step: str) -> list[str]:
    from ckpt_core.storage.safe_metadata import read_metadata

    return list(read_metadata(step).state_dict_metadata)


def test_a_torchtitan_step_converts_to_a_ckpt_step_computing_torchtitans_logits(
    titan, tmp_path, capsys
):
    run, step = titan
    args = _titan.args_file(tmp_path / "args.json")
    out = tmp_path / "ckpt" / f"step-{STEPS}"
    assert main(["convert", step, str(out), "--from", "torchtitan", "--to", "dcp",
                 "--model", args, "--no-progress"]) == 0  # fmt: skip
    model, manifest = _load_dcp_model(str(out))
    assert manifest["model"]["adapter"] == "llama"
    assert manifest["model"]["rope_layout"] == "rotate_half"
    assert manifest["step"] == STEPS and manifest["kind"] == "checkpoint"
    expected, got = _titan_logits(run), _ckpt_logits(model)
    assert (got - expected).abs().max() < 1e-5
    # The task depends on positions: q/k left interleaved computes something else.
    from ckpt_core.storage.dcp_entries import read_entries

    raw = read_entries(step, [k for k in _keys(step) if not k.startswith(("optim", "lr_", "tr"))])
    wrong = _llama(manifest["model"]["config"])
    wrong.load_state_dict(
        {
            k.replace("qkv_linear.", "").replace("lm_head", "output"): v
            for k, v in raw.items()
            if k != "dataloader"
        }
    )
    assert (_ckpt_logits(wrong) - expected).abs().max() > 0.5
    entries = _keys(str(out))
    assert "train_state.tokens_seen" in entries and "lr_scheduler.last_epoch" in entries
    assert "optimizer.state.layers.0.attention.wk.weight.exp_avg" in entries
    assert not any(k.startswith("dataloader") for k in entries)


def test_a_torchtitan_step_converts_to_an_hf_folder_transformers_loads(titan, tmp_path):
    transformers = pytest.importorskip("transformers")
    run, step = titan
    out = tmp_path / "hf"
    args = _titan.args_file(tmp_path / "a.json")
    assert main(["convert", step, str(out), "--from", "torchtitan", "--to", "hf",
                 "--model", args, "--no-progress"]) == 0  # fmt: skip
    assert (out / "config.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = hf(_probe()).logits
    assert (got - _titan_logits(run)).abs().max() < 1e-5


def test_the_torchtitan_flavor_table_matches_torchtitans_registry():
    from torchtitan.models.llama3 import llama3_configs

    from ckpt_core.torchtitan import architecture

    for flavor, build in llama3_configs.items():
        theirs = architecture.from_model_config(build(attn_backend="flex"))
        ours = architecture.from_spec(f"llama3:{flavor}")
        assert ours == theirs, flavor


def test_tied_embeddings_cross_both_ways_as_one_tensor(gloo, tmp_path):
    import json as _json

    run = _titan.build(seed=2, tied=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        _titan.train_step(run, _titan.batch(gen))
    manager = _titan.manager(run, str(tmp_path / "tt"))
    manager.save(10)
    manager.close()
    args = tmp_path / "tied.json"
    args.write_text(_json.dumps({**_titan.ARGS, "enable_weight_tying": True}))
    out = tmp_path / "ckpt" / "step-10"
    assert main(["convert", str(tmp_path / "tt" / "checkpoint" / "step-10"), str(out),
                 "--from", "torchtitan", "--to", "dcp", "--model", str(args)]) == 0  # fmt: skip
    model, manifest = _load_dcp_model(str(out))
    assert manifest["model"]["config"]["tie_word_embeddings"] is True
    assert not any("output" in k for k in _keys(str(out)))
    assert (_ckpt_logits(model) - _titan_logits(run)).abs().max() < 1e-5
    back = tmp_path / "back" / "checkpoint" / "step-10"
    assert main(["convert", str(out), str(back), "--to", "torchtitan"]) == 0
    again = _titan.build(seed=3, tied=True)
    loader = _titan.manager(again, str(tmp_path / "back"), exclude_from_loading=["dataloader"])
    assert loader.load()
    loader.close()
    assert again.model.lm_head.weight is again.model.tok_embeddings.weight
    assert torch.equal(again.model.lm_head.weight, run.model.lm_head.weight)
    ours, theirs = again.optimizers.state_dict(), run.optimizers.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(v, ours[k]) for k, v in theirs.items() if isinstance(v, torch.Tensor))
