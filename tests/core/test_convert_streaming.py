"""Streaming ``ckpt convert``: any transformers decoder-only model, workers, bounded memory.

* HF → DCP → HF is bit-exact for transformers model types no family of ckpt-core
  lists (they go to the ``hf`` fallback family) and for one the reference Llama
  reads; the DCP checkpoint starts training in a user loop on the transformers model;
* ``--workers 2`` writes the very files ``--workers 1`` writes, and a spawned worker
  (JSON frames on its pipes, no pickle) what a forked one writes;
* a config whose tensors do not fit the weights names the keys and both shapes;
  weights with neither manifest nor config.json are refused with what to pass;
* peak memory of a convert in a fresh process stays near one tensor plus the write
  buffer on a model of many layers (not a timing: a later change that loads the
  whole model again fails it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ckpt_core.cli.main import main
from ckpt_core.storage import manifest
from tests.conftest import REPO_ROOT
from tests.core.test_convert_cli import _tensors
from tests.hf_native._families import COMMON, VOCAB

transformers = pytest.importorskip("transformers")

#: model_type → (its own options, the family ckpt picks). qwen2 ties lm_head.
TYPES = {
    "gpt_neox": ({}, "hf"),
    "olmo": ({}, "hf"),
    "starcoder2": ({}, "hf"),
    "qwen2": ({"tie_word_embeddings": True}, "hf"),
    "llama": ({}, "llama"),
    "qwen3_moe": (  # the native moe family: stacked experts, one group per layer's experts
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 8},
        "moe",
    ),
}


def _convert(*argv) -> int:
    return main(["convert", *map(str, argv), "--no-progress"])


def _model(model_type: str, seed: int = 0):
    options, _ = TYPES[model_type]
    config = transformers.AutoConfig.for_model(model_type, **COMMON, **options)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_hf_to_dcp_to_hf_is_bit_exact_for_transformers_model_types(tmp_path, model_type):
    model = _model(model_type)
    dtype = torch.bfloat16 if model_type == "olmo" else torch.float32
    model.to(dtype).save_pretrained(str(tmp_path / "hf"))
    assert _convert(tmp_path / "hf", tmp_path / "dcp", "--to", "dcp") == 0
    assert manifest.read(str(tmp_path / "dcp"))["model"]["adapter"] == TYPES[model_type][1]
    assert _convert(tmp_path / "dcp", tmp_path / "back", "--to", "hf") == 0
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert loaded.config.model_type == model_type
    if dtype == torch.float32:  # (bf16 rotary tables differ between a cast and a load)
        with torch.no_grad():
            assert torch.equal(loaded(_tokens()).logits, model(_tokens()).logits)
    assert manifest.verify(str(tmp_path / "back")) == []


def test_dcp_to_dcp_casts_and_applies_the_recorded_converters_like_dcp_to_hf(tmp_path):
    pytest.importorskip("ckpt_plugins_lora")
    from ckpt_core import CheckpointConfig, CheckpointManager, ConverterSet
    from ckpt_core.reference import LlamaStateDictAdapter, ModelArgs, build_model
    from ckpt_core.storage.safe_metadata import read_metadata, safe_load

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96)
    torch.manual_seed(0)
    model = build_model(args)
    converters = ConverterSet.from_config(["lora"], {"lora": {"rank": 4, "alpha": 8}})
    converters.convert(model)
    with torch.no_grad():  # trained factors: merging changes the weights
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    config = CheckpointConfig(folder=str(tmp_path / "ckpt"), export={"enable": False})
    adapter = LlamaStateDictAdapter(args)
    manager = CheckpointManager(config, model, converters=converters, sd_adapter=adapter)
    manager.save(3, last_step=True)
    manager.close()
    for to in ("dcp", "hf"):
        argv = [tmp_path / "ckpt", tmp_path / to, "--to", to, "--dtype", "bfloat16"]
        assert _convert(*argv, "--max-shard-size", "30KB") == 0
    meta = read_metadata(str(tmp_path / "dcp"))
    state = {
        k.removeprefix("model."): torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in meta.state_dict_metadata.items()
    }
    safe_load({"model": state}, str(tmp_path / "dcp"), metadata=meta)
    assert len(os.listdir(tmp_path / "dcp")) > 4  # several data files
    assert not any("lora" in k for k in state) and "layers.0.attention.wq.weight" in state
    hf = _tensors(tmp_path / "hf")
    assert hf.keys() == adapter.to_hf(state).keys()
    for name, value in adapter.to_hf(state).items():
        assert value.dtype == torch.bfloat16 and torch.equal(hf[name], value), name
    assert manifest.read(str(tmp_path / "dcp"))["kind"] == "export"


def test_the_hf_family_is_the_fallback_for_causal_lm_types_no_family_lists(capsys):
    from ckpt_core.content.families import family_for_hf_config

    assert family_for_hf_config({"model_type": "gpt_neox"}).name == "hf"
    assert family_for_hf_config({"model_type": "llama"}).name == "llama"
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    assert "ckpt_core.content.hf_native_family:hf_family" in listing
    assert "and, when no family lists it: any causal LM model_type transformers knows" in listing


def test_a_converted_dcp_checkpoint_starts_training_in_a_user_loop(tmp_path):
    from ckpt_core import CheckpointConfig, CheckpointManager

    source = _model("gpt_neox")
    source.save_pretrained(str(tmp_path / "hf"))
    assert _convert(tmp_path / "hf", tmp_path / "dcp", "--to", "dcp") == 0

    def loop(steps: int):
        model = _model("gpt_neox", seed=1).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = CheckpointConfig(
            folder=str(tmp_path / "ckpt"),
            export={"enable": False},
            initial_load={"path": str(tmp_path / "dcp"), "format": "dcp"},
        )
        manager = CheckpointManager(config, model, optimizers=opt)
        manager.load()
        start = manager.train_state.step
        if start == 0:
            for key, value in source.state_dict().items():
                assert torch.equal(model.state_dict()[key], value), key
        for step in range(start + 1, steps + 1):
            tokens = _tokens()
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad()
            manager.save(step, last_step=step == steps)
        manager.close()
        return model

    trained = loop(2)
    resumed = loop(2)  # resumes step 2 of the loop's own checkpoints
    for key, value in trained.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize("to", ["hf", "dcp"])
def test_two_workers_write_the_same_files_as_one(tmp_path, to):
    _model("qwen2").save_pretrained(str(tmp_path / "hf"))
    for workers in (1, 2):
        argv = [tmp_path / "hf", tmp_path / f"out{workers}", "--to", to]
        assert _convert(*argv, "--workers", workers, "--max-shard-size", "20KB") == 0
    one, two = tmp_path / "out1", tmp_path / "out2"
    data = sorted(n for n in os.listdir(one) if n.endswith((".safetensors", ".distcp")))
    assert len(data) > 2 and data == sorted(
        n for n in os.listdir(two) if n.endswith((".safetensors", ".distcp"))
    )
    same = [n for n in data + ["config.json", "model.safetensors.index.json"] if (one / n).exists()]
    for name in same:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert manifest.verify(str(one)) == [] and manifest.verify(str(two)) == []
    if to == "dcp":
        _a_spawned_worker_writes_what_a_forked_one_writes(tmp_path, data)


def _a_spawned_worker_writes_what_a_forked_one_writes(tmp_path, data: list[str]) -> None:
    # The request goes to the spawned worker as JSON on stdin, its DCP write results come
    # back as JSON frames: the parent's .metadata must say what the fork path's says.
    from ckpt_core.convert.workers import WORKERS_ENV
    from ckpt_core.storage.safe_metadata import read_metadata

    fork, spawn = tmp_path / "out2", tmp_path / "spawn"
    argv = [tmp_path / "hf", spawn, "--to", "dcp", "--workers", 2, "--max-shard-size", "20KB"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(WORKERS_ENV, "spawn")
        assert _convert(*argv) == 0
    assert data == sorted(n for n in os.listdir(spawn) if n.endswith(".distcp"))
    for name in data:
        assert (fork / name).read_bytes() == (spawn / name).read_bytes(), name
    forked, spawned = read_metadata(str(fork)), read_metadata(str(spawn))
    assert spawned.state_dict_metadata == forked.state_dict_metadata
    assert spawned.storage_data == forked.storage_data
    assert {i.relative_path for i in spawned.storage_data.values()} == set(data)
    assert manifest.verify(str(spawn)) == []


def test_a_config_that_does_not_fit_names_the_keys_and_both_shapes(tmp_path, capsys):
    _model("llama").save_pretrained(str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    argv = [tmp_path / "hf", tmp_path / "out", "--to", "dcp", "--model", tmp_path / "other.json"]
    capsys.readouterr()  # save_pretrained's own output
    assert _convert(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "does not fit" in err and "6 of" in err
    assert "'model.layers.0.mlp.gate_proj.weight' is [48, 32] in the model and [64, 32]" in err
    assert not (tmp_path / "out").exists()


def test_weights_without_manifest_or_config_are_refused_with_what_to_pass(tmp_path, capsys):
    _model("llama").save_pretrained(str(tmp_path / "hf"))
    config = tmp_path / "config.json"
    os.rename(tmp_path / "hf" / "config.json", config)
    capsys.readouterr()
    assert _convert(tmp_path / "hf", tmp_path / "out", "--to", "dcp") == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "pass --model" in err
    assert _convert(tmp_path / "hf", tmp_path / "out", "--to", "dcp", "--model", config) == 0


# -- the memory bound ---------------------------------------------------------------------

LAYERS, DIM, FFN = 64, 256, 1024  # 4 MiB a layer in fp32, 1 MiB the largest tensor
CHILD = r"""
import json, os, sys
from ckpt_core.cli.main import main

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

src, out = sys.argv[1:3]
argv = ["--to", "hf", "--dtype", "bfloat16", "--no-progress"]
assert main(["convert", src, out + "-warmup", *argv, "--max-shard-size", "1MB"]) == 0
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    base = status("VmRSS")
except OSError:
    base = None
rss = status("VmRSS")
assert main(["convert", src, out, *argv]) == 0
print(json.dumps({"base": base if base is not None else rss, "peak": status("VmHWM")}))
"""


def test_peak_memory_of_a_convert_is_about_one_tensor_not_the_model(tmp_path):
    """A 64-layer model (260 MiB fp32) converts to bf16 HF within 2 x 1 MiB + 100 MiB."""
    import torch.distributed.checkpoint as dcp

    from ckpt_core.reference import LlamaStateDictAdapter, ModelArgs, build_model

    args = ModelArgs(
        dim=DIM, n_layers=LAYERS, n_heads=4, n_kv_heads=4, vocab_size=64, ffn_hidden_dim=FFN
    )
    meta = build_model(args, device="meta")
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in meta.state_dict().items()}
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    largest = max(t.numel() * t.element_size() for t in state.values())
    src = str(tmp_path / "src")
    dcp.save({"model": state}, checkpoint_id=src)
    del state
    model = LlamaStateDictAdapter(args).describe()
    files = manifest.file_entries(src)
    manifest.write(src, manifest.build(kind="checkpoint", step=1, files=files, model=model))
    env = {k: v for k, v in os.environ.items() if k != "CKPT_DISABLE_PLUGIN_AUTOLOAD"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, src, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    extra = got["peak"] - got["base"]
    bound = 2 * largest + 100 * 2**20  # the 64 MiB write buffer, allocator and Python slack
    assert model_bytes > 2.5 * bound  # the bound would catch a whole-model read
    assert extra <= bound, f"peak grew by {extra / 2**20:.0f} MiB (bound {bound / 2**20:.0f})"
    assert _tensors(tmp_path / "out").keys() == _tensors(tmp_path / "out-warmup").keys()


# -- grouping -----------------------------------------------------------------------------


def test_groups_keep_factors_with_their_weight_and_a_fused_adapter_must_name_its_group():
    from ckpt_core import StateDictAdapter
    from ckpt_core.content.transforms import StateDictTransforms
    from ckpt_core.convert.plan import GroupConverter, group_keys, plan
    from ckpt_core.errors import CheckpointError

    keys = [
        "embed.weight",
        "layers.0.q.weight",
        "layers.0.q.lora_a.weight",
        "layers.0.q.lora_b.weight",
        "layers.0.experts.w1",
        "layers.0.experts.w2",
        "layers.0.k.weight",
        "head.weight",
    ]
    groups = group_keys(keys, tied={"head.weight": "embed.weight"})
    assert groups == [
        ["embed.weight", "head.weight"],
        ["layers.0.q.weight", "layers.0.q.lora_a.weight", "layers.0.q.lora_b.weight"],
        ["layers.0.experts.w1", "layers.0.experts.w2"],
        ["layers.0.k.weight"],
    ]

    class Fused(StateDictAdapter):  # writes q and k as one "qk" tensor
        def __init__(self, together: bool) -> None:
            self.together = together

        def to_hf(self, sd):
            out = {k: v for k, v in sd.items() if not k.endswith((".q.weight", ".k.weight"))}
            if "a.q.weight" in sd and "a.k.weight" in sd:
                out["a.qk.weight"] = torch.cat([sd["a.q.weight"], sd["a.k.weight"]])
            return out

        def from_hf(self, sd):
            return sd

        def convert_group(self, fqn):
            return "a" if self.together and fqn.startswith("a.") else None

    full = {k: torch.empty(4, 4, device="meta") for k in ("a.q.weight", "a.k.weight")}
    for together in (False, True):
        converter = GroupConverter(StateDictTransforms(Fused(together)), "hf", None)
        if not together:
            with pytest.raises(CheckpointError, match="convert_group"):
                plan(converter, full, tied={}, max_file_bytes=1 << 20)
        else:
            entries = plan(converter, full, tied={}, max_file_bytes=1 << 20).files[0].entries
            assert [(s.name, s.shape) for _, s in entries] == [("a.qk.weight", (8, 4))]
