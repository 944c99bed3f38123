"""``ckpt convert``: HF ↔ DCP round trips, sources from any world size, overwrite rules."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from ckpt_core import ModelWrapper
from ckpt_core.cli.main import main
from ckpt_core.policy.exporter import write_export
from ckpt_core.reference import LlamaStateDictAdapter, ModelArgs, build_model
from ckpt_core.storage import manifest
from tests.core._dist import run_on_ranks
from tests.core.hf_helpers import hf_llama, save_hf_llama

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=128)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _convert(*argv) -> int:
    return main(["convert", *map(str, argv), "--no-progress"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_to_dcp_to_hf_is_bit_exact(tmp_path, tied, dtype):
    hf_llama(tied=tied, llama3=True).to(dtype).save_pretrained(str(tmp_path / "hf"))
    assert _convert(tmp_path / "hf", tmp_path / "dcp", "--to", "dcp") == 0
    assert os.path.exists(tmp_path / "dcp" / ".metadata")
    assert manifest.read(str(tmp_path / "dcp"))["model"]["adapter"] == "llama"
    assert _convert(tmp_path / "dcp", tmp_path / "back", "--to", "hf") == 0
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    assert ("lm_head.weight" in back) is not tied
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_convert_refuses_an_existing_destination_unless_asked(tmp_path, capsys):
    save_hf_llama(tmp_path / "hf")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("precious")
    assert _convert(tmp_path / "hf", tmp_path / "dst", "--to", "hf") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "dst" / "keep.txt").read_text() == "precious"
    assert _convert(tmp_path / "hf", tmp_path / "dst", "--to", "hf", "--overwrite") == 0
    assert sorted(os.listdir(tmp_path / "dst")) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
    ]
    assert sorted(os.listdir(tmp_path)) == ["dst", "hf"]


def test_convert_refuses_a_file_source_and_an_overwrite_that_would_delete_the_source(
    tmp_path, capsys
):
    save_hf_llama(tmp_path / "hf")
    assert _convert(tmp_path / "hf" / "config.json", tmp_path / "out", "--to", "hf") == 2
    assert "is a file" in capsys.readouterr().err
    for dst in (tmp_path / "hf", tmp_path):
        assert _convert(tmp_path / "hf", dst, "--to", "dcp", "--overwrite") == 2
        assert "would delete the source" in capsys.readouterr().err
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert not os.path.exists(tmp_path / "out")


def test_converters_recorded_but_not_applied_are_named_in_a_warning(tmp_path, caplog):
    from ckpt_core import CheckpointConfig, CheckpointManager, ConverterSet
    from tests.core._export_converters import SidecarConverter

    model = build_model(ARGS)
    converters = ConverterSet([SidecarConverter()])
    converters.convert(model)
    config = CheckpointConfig(folder=str(tmp_path / "ckpt"), export={"enable": False})
    manager = CheckpointManager(config, model, converters=converters)
    manager.save(1, last_step=True)
    manager.close()
    man = manifest.read(str(tmp_path / "ckpt" / "step-1"))
    assert [c["name"] for c in man["converters"]] == ["sidecar"]
    man["model"] = LlamaStateDictAdapter(ARGS).describe()  # no sd_adapter was given
    manifest.write(str(tmp_path / "ckpt" / "step-1"), man)
    assert _convert(tmp_path / "ckpt", tmp_path / "out", "--to", "hf", "--converters", "none") == 0
    assert "['sidecar'] that are not applied" in caplog.text
    assert not any("sidecar" in k for k in _tensors(tmp_path / "out"))


def test_dcp_source_without_manifest_needs_model_option(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    model = build_model(ARGS)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "raw"))
    assert _convert(tmp_path / "raw", tmp_path / "out", "--to", "hf") == 2
    assert "--model" in capsys.readouterr().err
    config = tmp_path / "config.json"
    import json

    config.write_text(json.dumps(LlamaStateDictAdapter(ARGS).hf_config()))
    declared = ("--from", "ckpt", "--model", config)  # no manifest: ckpt's layout, declared
    assert _convert(tmp_path / "raw", tmp_path / "out", "--to", "hf", *declared) == 0
    got = _tensors(tmp_path / "out")
    assert torch.equal(got["model.norm.weight"], model.norm.weight)


def _two_rank_save_and_export(rank, world_size, root):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = build_model(ARGS)
    with torch.no_grad():  # a "trained" state: every tensor differs from a fresh init
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    wrapper = ModelWrapper(model)
    adapter = LlamaStateDictAdapter(ARGS)
    step = os.path.join(root, "ckpt", "step-5")
    dcp.save({"model": wrapper.state_dict("full")}, checkpoint_id=step)
    if rank == 0:
        manifest.write(
            step,
            manifest.build(
                kind="checkpoint",
                step=5,
                world_size=world_size,
                files=manifest.file_entries(step),
                model=adapter.describe(),
            ),
        )
    write_export(
        wrapper,
        os.path.join(root, "export", "step-5"),
        fmt="hf",
        dtype="bfloat16",
        sd_adapter=adapter,
        step=5,
        max_shard_bytes=60_000,
    )
    write_export(
        wrapper,
        os.path.join(root, "dcp-export", "step-5"),
        fmt="dcp",
        dtype="bfloat16",
        sd_adapter=adapter,
        step=5,
    )


def test_two_rank_export_equals_one_rank_offline_convert_of_the_same_checkpoint(tmp_path):
    run_on_ranks(_two_rank_save_and_export, 2, str(tmp_path))
    assert (
        _convert(
            tmp_path / "ckpt",
            tmp_path / "offline",
            "--to",
            "hf",
            "--dtype",
            "bfloat16",
            "--converters",
            "none",
        )
        == 0
    )
    online, offline = tmp_path / "export" / "step-5", tmp_path / "offline"
    a, b = _tensors(online), _tensors(offline)
    assert a.keys() == b.keys() and len(a) == 2 + 9 * 2 + 1
    for key in a:
        assert a[key].dtype == torch.bfloat16 and torch.equal(a[key], b[key]), key
    assert (online / "config.json").read_text() == (offline / "config.json").read_text()
    assert os.path.exists(online / "model.safetensors.index.json")
    assert manifest.read(str(online))["world_size"] == 2
    assert manifest.verify(str(online)) == []
    # the 2-rank DCP export of the same step converts to the same files as well
    assert _convert(tmp_path / "dcp-export", tmp_path / "from-dcp", "--to", "hf") == 0
    c = _tensors(tmp_path / "from-dcp")
    assert c.keys() == a.keys()
    for key in a:
        assert c[key].dtype == torch.bfloat16 and torch.equal(c[key], a[key]), key


@pytest.fixture
def codes_converter():
    from ckpt_core.protocol.discovery import register_converter_class, unregister_converter_class
    from tests.core._export_converters import IntCodesConverter, SidecarConverter

    register_converter_class(IntCodesConverter)
    register_converter_class(SidecarConverter)
    yield
    unregister_converter_class("intcodes")
    unregister_converter_class("sidecar")


def test_convert_applies_the_converters_recorded_in_the_manifest(tmp_path, codes_converter):
    import torch.distributed.checkpoint as dcp

    from ckpt_core import ConverterSet

    converters = ConverterSet.from_config(["intcodes", "sidecar"])
    model = build_model(ARGS)
    converters.convert(model)
    step = tmp_path / "ckpt" / "step-7"
    dcp.save({"model": ModelWrapper(model, converters).state_dict("full")}, checkpoint_id=str(step))
    files = manifest.file_entries(str(step))
    desc = LlamaStateDictAdapter(ARGS).describe()
    data = manifest.build(
        kind="checkpoint", step=7, files=files, converters=converters.describe(), model=desc
    )
    manifest.write(str(step), data)

    assert _convert(tmp_path / "ckpt", tmp_path / "with", "--to", "hf") == 0
    got = _tensors(tmp_path / "with")
    assert got["model.layers.1.self_attn.q_proj.codes"].dtype == torch.int8
    assert torch.equal(
        got["model.layers.1.self_attn.q_proj.codes"], model.layers["1"].attention.wq.codes
    )
    side = _tensors(tmp_path / "with" / "adapter")
    key = "base_model.model.model.layers.0.self_attn.q_proj.sidecar.weight"
    assert torch.equal(side[key], model.layers["0"].attention.wq.sidecar.weight)
    assert manifest.read(str(tmp_path / "with"))["converters"] == converters.describe()

    assert _convert(tmp_path / "ckpt", tmp_path / "raw", "--to", "hf", "--converters", "none") == 0
    raw = _tensors(tmp_path / "raw")
    assert not any(k.endswith(".codes") for k in raw)
    assert not os.path.exists(tmp_path / "raw" / "adapter")
    assert torch.equal(raw["lm_head.weight"], model.output.weight)


def test_convert_of_a_lora_checkpoint_writes_a_merged_model_and_its_peft_adapter(tmp_path):
    import warnings

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("ckpt_plugins_lora")
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from ckpt_core import CheckpointConfig, CheckpointManager, ConverterSet

    torch.manual_seed(0)
    model = build_model(ARGS).eval()
    converters = ConverterSet.from_config(["lora"], {"lora": {"rank": 4, "alpha": 8}})
    converters.convert(model)
    with torch.no_grad():  # trained factors: B != 0, so merging changes the weights
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    config = CheckpointConfig(folder=str(tmp_path / "ckpt"), export={"enable": False})
    manager = CheckpointManager(
        config, model, converters=converters, sd_adapter=LlamaStateDictAdapter(ARGS)
    )
    manager.save(4, last_step=True)
    manager.close()
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(tokens)

    # converters default to the manifest's: LoRA merges and writes its PEFT adapter
    assert _convert(tmp_path / "ckpt", tmp_path / "merged", "--to", "hf") == 0
    merged, info = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "merged"), output_loading_info=True
    )
    assert not any(info.values()), info
    with torch.no_grad():
        assert (merged.eval()(tokens).logits - want).abs().max().item() < 1e-4
    # DCP's HF reader sees the model files only: the adapter lives in its subfolder
    keys = set(
        HuggingFaceStorageReader(str(tmp_path / "merged")).read_metadata().state_dict_metadata
    )
    assert keys == set(_tensors(tmp_path / "merged")) and not any("lora" in k for k in keys)

    # the base as stored (no converters) plus the PEFT adapter is the same model again
    assert _convert(tmp_path / "ckpt", tmp_path / "base", "--to", "hf", "--converters", "none") == 0
    base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    with torch.no_grad():
        assert (base(tokens).logits - want).abs().max().item() > 1e-3
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(missing|unexpected|not used).*")
        adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "merged" / "adapter"))
    with torch.no_grad():
        assert (adapted.eval()(tokens).logits - want).abs().max().item() < 1e-4


def test_convert_shows_reading_and_writing_progress_by_default(tmp_path, capsys):
    save_hf_llama(tmp_path / "hf")
    for src, dst, to in (("hf", "as-dcp", "dcp"), ("as-dcp", "back", "hf")):
        assert main(["convert", str(tmp_path / src), str(tmp_path / dst), "--to", to]) == 0
        out = capsys.readouterr().out
        assert f"reading {tmp_path / src}" in out and f"writing {tmp_path / dst}" in out, out


@pytest.mark.parametrize("fmt", ["hf", "dcp"])
def test_export_progress_adds_up_to_the_announced_total(tmp_path, fmt):
    from ckpt_core import ConverterSet
    from tests.core._export_converters import IntCodesConverter, SidecarConverter

    model = build_model(ARGS)
    converters = ConverterSet([IntCodesConverter(), SidecarConverter()])
    converters.convert(model)
    totals, done = [], []
    write_export(
        ModelWrapper(model, converters),
        str(tmp_path / "out"),
        fmt=fmt,
        dtype="bfloat16",
        sd_adapter=LlamaStateDictAdapter(ARGS),
        converters=converters,
        on_total=totals.append,
        progress=done.append,
    )
    written = sum(
        t.numel() * t.element_size()
        for folder in (tmp_path / "out", tmp_path / "out" / "adapter")
        if fmt == "hf"
        for t in _tensors(folder).values()
    )
    assert len(totals) == 1 and sum(done) == totals[0] > 0
    if fmt == "hf":
        assert totals[0] == written


def test_a_registered_model_family_is_picked_from_config_json_and_the_manifest(
    tmp_path, monkeypatch, capsys
):
    import json

    from ckpt_core.content import families as adapters

    monkeypatch.setattr(adapters, "_manual", {})  # forget it after the test

    class MyAdapter(LlamaStateDictAdapter):
        registry_name = "my-llama"

    def as_llama(config):
        return {**config, "model_type": "llama"}

    save_hf_llama(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "my"}))
    assert _convert(tmp_path / "hf", tmp_path / "dcp", "--to", "dcp") == 2
    err = capsys.readouterr().err
    assert "model_type 'my' has no installed model family" in err
    assert "Installed: hf from ckpt-core reads any causal LM model_type transformers knows" in err
    assert "; llama from ckpt-core reads llama" in err
    assert "docs/writing-model-families.md" in err

    adapters.register_model_family(
        adapters.ModelFamily(
            "my-llama",
            adapter=lambda config: MyAdapter.from_hf_config(as_llama(config)),
            build_model=lambda config, device=None: build_model(as_llama(config), device=device),
            model_types=("my",),
        )
    )
    assert _convert(tmp_path / "hf", tmp_path / "dcp", "--to", "dcp") == 0
    assert manifest.read(str(tmp_path / "dcp"))["model"]["adapter"] == "my-llama"
    assert _convert(tmp_path / "dcp", tmp_path / "back", "--to", "hf") == 0
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_an_hf_export_converts_as_it_is_without_reapplying_its_converters(
    tmp_path, codes_converter
):
    from ckpt_core import ConverterSet

    converters = ConverterSet.from_config(["sidecar"])
    model = build_model(ARGS)
    converters.convert(model)
    write_export(
        ModelWrapper(model, converters),
        str(tmp_path / "export"),
        fmt="hf",
        dtype=None,
        sd_adapter=LlamaStateDictAdapter(ARGS),
        converters=converters,
    )
    assert manifest.read(str(tmp_path / "export"))["converters"][0]["name"] == "sidecar"
    assert _convert(tmp_path / "export", tmp_path / "again", "--to", "hf") == 0
    assert not os.path.exists(tmp_path / "again" / "adapter")  # no fresh sidecar written
    a, b = _tensors(tmp_path / "export"), _tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_compressed_tensors_fp8_folder_converts_dequantized(tmp_path):
    import json

    from safetensors.torch import save_file

    hf = save_hf_llama(tmp_path / "hf")
    quantized, want = {}, {}
    for key, value in hf.state_dict().items():
        if key.endswith("_proj.weight"):
            scale = value.abs().amax(dim=1, keepdim=True) / 448.0  # per row
            bits = (value / scale).to(torch.float8_e4m3fn)
            quantized[key], quantized[key + "_scale"] = bits, scale
            want[key] = bits.float() * scale
        else:
            quantized[key] = want[key] = value
    save_file(quantized, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
    }
    config_file.write_text(json.dumps(config))
    assert _convert(tmp_path / "hf", tmp_path / "out", "--to", "hf") == 0
    got = _tensors(tmp_path / "out")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], value), key
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_an_hf_folder_in_an_unreadable_quantized_format_is_a_clear_error(tmp_path, capsys):
    import json

    save_hf_llama(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
    }
    config_file.write_text(json.dumps(config))
    assert _convert(tmp_path / "hf", tmp_path / "out", "--to", "dcp") == 2
    err = capsys.readouterr().err
    assert "'pack-quantized'" in err and "Convert the DCP checkpoint" in err


def test_convert_of_an_owned_only_lora_checkpoint_reads_its_base_from_the_manifest(
    tmp_path, capsys
):
    pytest.importorskip("ckpt_plugins_lora")
    from ckpt_core import CheckpointConfig, CheckpointManager, ConverterSet
    from ckpt_core.storage.safe_metadata import read_metadata

    base = str(tmp_path / "base")
    save_hf_llama(base)
    model = build_model(base)
    options = {"rank": 4, "alpha": 8, "trainable_only_checkpoints": True}
    converters = ConverterSet.from_config(["lora"], {"lora": options})
    converters.convert(model)
    config = CheckpointConfig(
        folder=str(tmp_path / "ckpt"),
        initial_load={"path": base, "format": "hf"},
        export={"enable": False},
    )
    adapter = LlamaStateDictAdapter(model.args)
    manager = CheckpointManager(config, model, converters=converters, sd_adapter=adapter)
    assert manager.load()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    manager.save(3, last_step=True)
    manager.close()
    saved = read_metadata(str(tmp_path / "ckpt" / "step-3")).state_dict_metadata
    assert "model.tok_embeddings.weight" not in saved  # only the factors were saved

    assert _convert(tmp_path / "ckpt", tmp_path / "out", "--to", "hf") == 0
    want = adapter.to_hf(ModelWrapper(model, converters).state_dict("export"))
    got = _tensors(tmp_path / "out")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key

    (tmp_path / "base" / "config.json").write_text("{}")  # not the base it was trained on
    assert _convert(tmp_path / "ckpt", tmp_path / "out2", "--to", "hf") == 2
    assert "checksum" in capsys.readouterr().err


def test_a_dcp_source_lacking_model_tensors_is_an_error_naming_them(tmp_path, capsys):
    import json

    import torch.distributed.checkpoint as dcp

    model = build_model(ARGS)
    partial = {k: v for k, v in model.state_dict().items() if k != "norm.weight"}
    dcp.save({"model": partial}, checkpoint_id=str(tmp_path / "raw"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LlamaStateDictAdapter(ARGS).hf_config()))
    declared = ("--from", "ckpt", "--model", config)  # no manifest: ckpt's layout, declared
    assert _convert(tmp_path / "raw", tmp_path / "out", "--to", "hf", *declared) == 2
    assert "lacks 1 model tensors: ['norm.weight']" in capsys.readouterr().err


def test_converters_named_for_an_export_take_their_options_from_its_manifest():
    pytest.importorskip("ckpt_plugins_lora")
    from ckpt_core.cli.convert_cmd import _converters

    recorded = [{"name": "lora", "options": {"rank": 4, "alpha": 8.0}}]
    assert _converters(None, recorded, is_export=True).names == []
    assert _converters(None, recorded).names == ["lora"]
    lora = _converters("lora", recorded, is_export=True)["lora"]
    assert (lora.config.rank, lora.config.alpha) == (4, 8.0)


def test_a_recorded_converter_that_is_not_installed_names_the_converters_flag(tmp_path, capsys):
    from ckpt_core import CheckpointConfig, CheckpointManager, ConverterSet
    from tests.core._export_converters import SidecarConverter

    model = build_model(ARGS)
    converters = ConverterSet([SidecarConverter()])  # registered by hand: not discoverable
    converters.convert(model)
    config = CheckpointConfig(folder=str(tmp_path / "ckpt"), export={"enable": False})
    manager = CheckpointManager(
        config, model, converters=converters, sd_adapter=LlamaStateDictAdapter(ARGS)
    )
    manager.save(1, last_step=True)
    manager.close()
    assert _convert(tmp_path / "ckpt", tmp_path / "out", "--to", "hf") == 2
    err = capsys.readouterr().err
    assert "['sidecar'] is not installed" in err and "--converters none" in err
    assert not (tmp_path / "out").exists()


def test_a_dcp_source_holding_float8_codes_is_refused_instead_of_widened(tmp_path, capsys):
    import json

    import torch.distributed.checkpoint as dcp

    model = build_model(ARGS)
    state = dict(model.state_dict())
    key = "layers.0.attention.wq.weight"
    scale = state[key].abs().max() / 448
    state[key] = (state[key] / scale).to(torch.float8_e4m3fn)  # what an fp8 export holds
    state[key + "_scale"] = scale.reshape(1)
    dcp.save({"model": state}, checkpoint_id=str(tmp_path / "raw"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LlamaStateDictAdapter(ARGS).hf_config()))
    declared = ("--from", "ckpt", "--model", config)  # no manifest: ckpt's layout, declared
    assert _convert(tmp_path / "raw", tmp_path / "out", "--to", "hf", *declared) == 2
    err = capsys.readouterr().err
    assert "1 model tensors as torch.float8_e4m3fn" in err and key in err
    assert "checkpoint.folder/step-N" in err
    assert not (tmp_path / "out").exists()
