"""HF exports: what the files hold, and that transformers loads them as the same model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from ckpt_core import CheckpointError, ConverterSet, ModelWrapper
from ckpt_core.policy.exporter import load_additional, write_export
from ckpt_core.reference import LlamaStateDictAdapter, ModelArgs, build_model
from ckpt_core.storage import manifest
from tests.core._export_converters import IntCodesConverter, SidecarConverter
from tests.core.hf_helpers import hf_logits

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=128)


def _model(tied=False, seed=0, **extra):
    torch.manual_seed(seed)
    return build_model(ModelArgs(**ARGS, tie_word_embeddings=tied, **extra)).eval()


def _read_folder(folder):
    """Every tensor of the model*.safetensors files in ``folder``."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                assert f.metadata() == {"format": "pt"}
                for key in f.keys():
                    assert key not in out, f"{key} written twice"
                    out[key] = f.get_tensor(key)
    return out


def _export(model, path, converters=None, **kwargs):
    kwargs.setdefault("dtype", "bfloat16")
    write_export(
        ModelWrapper(model, converters),
        str(path),
        fmt=kwargs.pop("fmt", "hf"),
        sd_adapter=LlamaStateDictAdapter(model.args),
        converters=converters,
        step=kwargs.pop("step", 3),
        **kwargs,
    )


def test_bf16_export_casts_every_floating_tensor_and_no_integer_one(tmp_path):
    model = _model()
    converters = ConverterSet([IntCodesConverter()])
    converters.convert(model)
    _export(model, tmp_path / "step-3", converters)
    tensors = _read_folder(tmp_path / "step-3")
    codes = {k: v for k, v in tensors.items() if k.endswith(".codes")}
    assert sorted(codes) == [f"model.layers.{i}.self_attn.q_proj.codes" for i in (0, 1)]
    for i in (0, 1):
        live = model.layers[str(i)].attention.wq.codes
        assert codes[f"model.layers.{i}.self_attn.q_proj.codes"].dtype == torch.int8
        assert torch.equal(codes[f"model.layers.{i}.self_attn.q_proj.codes"], live)
    floats = {k: v for k, v in tensors.items() if k not in codes}
    assert len(floats) == len(model.state_dict()) - len(codes)
    assert {v.dtype for v in floats.values()} == {torch.bfloat16}
    native = LlamaStateDictAdapter(model.args).to_hf(model.state_dict())
    for key, value in floats.items():
        assert torch.equal(value, native[key].bfloat16()), key
    config = json.loads((tmp_path / "step-3" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["codes_config"] == {"bits": 8}


def test_float32_export_of_a_bfloat16_model_is_float32(tmp_path):
    model = _model().to(torch.bfloat16)
    _export(model, tmp_path / "out", dtype="float32")
    tensors = _read_folder(tmp_path / "out")
    assert {v.dtype for v in tensors.values()} == {torch.float32}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_loads_with_transformers_and_gives_the_same_logits(tmp_path, tied):
    import transformers

    model = _model(tied=tied)
    _export(model, tmp_path / "step-3", dtype="float32", max_shard_bytes=40_000)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "step-3")).eval()
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
    assert (hf_logits(hf, tokens) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sharded_export_index_lists_exactly_the_keys_written(tmp_path, tied):
    model = _model(tied=tied)
    _export(model, tmp_path / "out", max_shard_bytes=20_000)
    folder = tmp_path / "out"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    tensors = _read_folder(folder)
    assert set(index["weight_map"]) == set(tensors)
    assert ("lm_head.weight" in tensors) is not tied
    for name, file in index["weight_map"].items():
        with safe_open(str(folder / file), framework="pt") as f:
            assert name in f.keys()
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in tensors.values())


def test_tensors_sharing_memory_are_each_written_and_the_export_loads(tmp_path):
    import transformers

    model = _model()
    model.output.weight = model.tok_embeddings.weight  # tied by hand; config says untied
    _export(model, tmp_path / "out", dtype="float32")
    tensors = _read_folder(tmp_path / "out")
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    hf, info = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True
    )
    assert not any(info.values()), info  # nothing left to random initialization
    tokens = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf_logits(hf.eval(), tokens) - model(tokens)).abs().max().item() < 1e-4


def test_subfolder_adapter_writes_its_keys_from_the_full_view_and_loads_back(tmp_path):
    model = _model()
    converters = ConverterSet([SidecarConverter()])
    converters.convert(model)
    _export(model, tmp_path / "exp", converters, dtype="float32")
    main = _read_folder(tmp_path / "exp")
    assert not any("sidecar" in k for k in main)
    side = _read_folder(tmp_path / "exp" / "adapter")
    assert set(side) == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.sidecar.weight" for i in (0, 1)
    }
    extra = json.loads((tmp_path / "exp" / "adapter" / "adapter_config.json").read_text())
    assert extra == {"peft_type": "SIDECAR"}
    # DCP's HuggingFaceStorageReader reads every *.safetensors of a folder: the subfolder
    # keeps the adapter out of the model's tensors.
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dcp_keys = HuggingFaceStorageReader(str(tmp_path / "exp")).read_metadata().state_dict_metadata
    assert set(dcp_keys) == set(main)

    fresh = _model(seed=1)
    fresh_convs = ConverterSet([SidecarConverter()])
    fresh_convs.convert(fresh)
    wrapper = ModelWrapper(fresh, fresh_convs)
    adapter = LlamaStateDictAdapter(fresh.args)
    missing = load_additional(
        wrapper,
        str(tmp_path / "exp"),
        converter="sidecar",
        sd_adapter=adapter,
        converters=fresh_convs,
    )
    assert missing == []
    for i in ("0", "1"):
        want = model.layers[i].attention.wq.sidecar.weight
        assert torch.equal(fresh.layers[i].attention.wq.sidecar.weight, want)
    # only the converter's keys were loaded: the base weights are still fresh's own
    assert not torch.equal(fresh.tok_embeddings.weight, model.tok_embeddings.weight)

    os.remove(tmp_path / "exp" / "adapter" / "adapter_model.safetensors")
    from safetensors.torch import save_file

    key = "base_model.model.model.layers.0.self_attn.q_proj.sidecar.weight"
    save_file({key: side[key]}, str(tmp_path / "exp" / "adapter" / "adapter_model.safetensors"))
    missing = load_additional(
        wrapper,
        str(tmp_path / "exp"),
        converter="sidecar",
        sd_adapter=adapter,
        converters=fresh_convs,
    )
    assert missing == ["layers.1.attention.wq.sidecar.weight"]


def test_additional_load_that_matches_no_key_is_an_error_not_a_silent_no_op(tmp_path):
    from safetensors.torch import save_file

    model = _model()
    converters = ConverterSet([SidecarConverter()])
    converters.convert(model)
    before = model.layers["0"].attention.wq.sidecar.weight.detach().clone()
    folder = tmp_path / "adapter"
    folder.mkdir()
    # PEFT names under a wrong prefix: PEFT itself would only warn and load nothing.
    save_file(
        {"base_model.model.layers.0.self_attn.q_proj.sidecar.weight": torch.ones_like(before)},
        str(folder / "adapter_model.safetensors"),
    )
    with pytest.raises(CheckpointError, match="none of its 1 tensors matches") as err:
        load_additional(
            ModelWrapper(model, converters),
            str(folder),
            converter="sidecar",
            sd_adapter=LlamaStateDictAdapter(model.args),
            converters=converters,
        )
    assert "base_model.model.layers.0.self_attn.q_proj.sidecar.weight" in str(err.value)
    assert torch.equal(model.layers["0"].attention.wq.sidecar.weight, before)


def test_export_writes_an_export_manifest_that_matches_its_files(tmp_path):
    model = _model()
    _export(model, tmp_path / "step-3", step=3)
    data = manifest.read(str(tmp_path / "step-3"))
    assert data["kind"] == "export" and data["step"] == 3
    assert data["model"]["adapter"] == "llama"
    assert set(data["files"]) == {"config.json", "model.safetensors"}
    assert manifest.verify(str(tmp_path / "step-3")) == []


def test_export_refuses_an_existing_folder_and_leaves_no_temporary_one(tmp_path):
    model = _model()
    _export(model, tmp_path / "step-3")
    with pytest.raises(FileExistsError, match="step-3"):
        _export(model, tmp_path / "step-3")
    assert sorted(os.listdir(tmp_path)) == ["step-3"]


def test_leftovers_of_a_crashed_export_are_replaced_by_a_complete_one(tmp_path):
    from ckpt_core.storage import layout

    crashed = tmp_path / ".tmp-step-3"
    crashed.mkdir()
    (crashed / "model-00001-of-00002.safetensors").write_bytes(b"torn")
    assert layout.committed_steps(str(tmp_path)) == []  # never seen as an export
    _export(_model(), tmp_path / "step-3")
    assert sorted(os.listdir(tmp_path)) == ["step-3"]
    assert sorted(os.listdir(tmp_path / "step-3")) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
    ]
    assert manifest.verify(str(tmp_path / "step-3")) == []


def test_dcp_export_is_model_only_in_the_model_layout(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = _model()
    converters = ConverterSet([IntCodesConverter()])
    converters.convert(model)
    _export(model, tmp_path / "step-3", converters, fmt="dcp")
    meta = dcp.FileSystemReader(str(tmp_path / "step-3")).read_metadata()
    keys = set(meta.state_dict_metadata)
    assert keys == {f"model.{k}" for k in model.state_dict()}
    assert meta.state_dict_metadata["model.norm.weight"].properties.dtype == torch.bfloat16
    codes = meta.state_dict_metadata["model.layers.0.attention.wq.codes"]
    assert codes.properties.dtype == torch.int8


def test_an_export_leaves_the_model_state_bit_identical(tmp_path):
    model = _model()
    converters = ConverterSet([IntCodesConverter(), SidecarConverter()])
    converters.convert(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _export(model, tmp_path / "a", converters)
    _export(model, tmp_path / "b", converters, fmt="dcp")
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


@pytest.mark.parametrize("direct", ["1", "0"], ids=["o_direct", "page_cache"])
def test_writer_streams_odd_sized_tensors_through_a_small_buffer(tmp_path, monkeypatch, direct):
    import zlib

    from ckpt_core.content.transforms import HFGroup
    from ckpt_core.storage.hf_writer import write_hf_folder

    monkeypatch.setenv("CKPT_HF_DIRECT_IO", direct)
    tensors = {
        "odd": torch.arange(7, dtype=torch.int8),
        "big": torch.randn(700, 333),
        "flag": torch.tensor(True),
        "f64": torch.randn(5).double(),
        "empty": torch.empty(0, 3),
        "fp8": torch.randn(9).to(torch.float8_e4m3fn),
    }
    written = write_hf_folder(
        str(tmp_path),
        [HFGroup(None, None, dict(tensors))],
        dtype=torch.bfloat16,
        config=None,
        is_writer=True,
        buffer_bytes=8192,
    )
    got = _read_folder(tmp_path)
    assert got.keys() == tensors.keys()
    for key, value in tensors.items():
        want = value.to(torch.bfloat16) if value.dtype in (torch.float32, torch.float64) else value
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    data = (tmp_path / "model.safetensors").read_bytes()
    assert written["model.safetensors"] == (len(data), f"crc32:{zlib.crc32(data):08x}")
