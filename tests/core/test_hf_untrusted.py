"""Hugging Face folders from strangers: every file inside the folder, every malformed file one line.

Covers the safetensors reader (index, headers, dtypes, fp8 scales), ``config.json``
(types, bounds, sizes against the folder's weights) and the PEFT adapter's
``adapter_config.json``. One tiny transformers Llama is saved once per module;
each test copies it and damages the copy.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from ckpt_core import ModelWrapper
from ckpt_core.errors import CheckpointError, ConfigError, DamagedCheckpointError
from ckpt_core.policy.exporter import load_additional, load_hf
from ckpt_core.reference import LlamaStateDictAdapter, build_model, from_pretrained
from ckpt_core.storage.hf_reader import INDEX_NAME, index_folder, read_into
from tests.core.hf_helpers import save_hf_llama

SECRET = "/tmp/ckpt-test-secret.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf_llama(folder, layers=1, vocab=32)
    return folder


@pytest.fixture
def hf(pristine, tmp_path):
    """A fresh copy of the tiny HF folder."""
    folder = tmp_path / "hf"
    shutil.copytree(pristine, folder)
    return folder


def _load(folder, fmt="hf"):
    """``load_hf`` into a fresh model of the pristine architecture (as initial_load does)."""
    model = build_model({**json.loads((folder / "config.json").read_text()), "model_type": "llama"})
    load_hf(ModelWrapper(model), str(folder), fmt=fmt, sd_adapter=LlamaStateDictAdapter(model.args))
    return model


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def _index(folder, weight_map):
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _names(folder) -> list[str]:
    return list(index_folder(str(folder)))


# -- file names from the index ---------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A valid safetensors file outside the HF folder holding a model tensor's name."""
    path = tmp_path / "outside.safetensors"
    save_file({"model.norm.weight": torch.full((64,), 7.0)}, str(path))
    return path


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_an_index_naming_a_file_outside_the_folder_is_refused_before_any_read(hf, outside, how):
    names = _names(hf)
    if how == "absolute":
        target = str(outside)
    elif how == "dotdot":
        target = "../outside.safetensors"
    else:
        os.symlink(outside, hf / "norm.safetensors")
        target = "norm.safetensors"
    weight_map = dict.fromkeys(names, "model.safetensors")
    weight_map["model.norm.weight"] = target
    _index(hf, weight_map)
    with pytest.raises(DamagedCheckpointError) as err:
        _load(hf)
    message = _one_line(err.value)
    assert INDEX_NAME in message and "weight_map" in message
    assert (
        "absolute" if how == "absolute" else "'..'" if how == "dotdot" else "symlink"
    ) in message


def test_a_safetensors_symlink_out_of_a_folder_without_index_is_refused(hf, outside):
    os.symlink(outside, hf / "extra.safetensors")
    with pytest.raises(DamagedCheckpointError, match="extra.safetensors.*symlink"):
        index_folder(str(hf))


def test_an_index_naming_a_fifo_is_refused_without_opening_it(hf):
    weight_map = dict.fromkeys(_names(hf), "model.safetensors")
    os.mkfifo(hf / "pipe.safetensors")
    weight_map["model.norm.weight"] = "pipe.safetensors"
    _index(hf, weight_map)
    # A reader that opens the FIFO blocks (holding the GIL); this writer unblocks it so
    # such a reader fails the test instead of hanging it. The checked reader never opens it.
    writer = subprocess.Popen(["sh", "-c", f"sleep 3; echo x > {hf / 'pipe.safetensors'}"])
    try:
        with pytest.raises(DamagedCheckpointError) as err:
            _load(hf)
        assert "a FIFO" in _one_line(err.value)
    finally:
        writer.kill()
        writer.wait()


def test_the_managers_initial_load_refuses_an_index_naming_a_file_outside(hf, outside, tmp_path):
    from ckpt_core import CheckpointConfig, CheckpointManager

    weight_map = dict.fromkeys(_names(hf), "model.safetensors")
    weight_map["model.norm.weight"] = str(outside)
    _index(hf, weight_map)
    model = build_model({**json.loads((hf / "config.json").read_text()), "model_type": "llama"})
    config = CheckpointConfig(
        folder=str(tmp_path / "ckpt"),
        initial_load={"path": str(hf), "format": "hf"},
        export={"enable": False},
    )
    manager = CheckpointManager(config, model, sd_adapter=LlamaStateDictAdapter(model.args))
    try:
        with pytest.raises(DamagedCheckpointError, match="absolute path"):
            manager.load()
    finally:
        manager.close()
    assert not torch.equal(model.norm.weight, torch.full((64,), 7.0))


def test_a_hub_cache_snapshot_whose_files_link_into_its_blobs_loads(hf, tmp_path):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(hf))):
        os.replace(hf / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    model = from_pretrained(str(snapshot))
    assert model.norm.weight.shape == (64,)


@pytest.mark.parametrize(
    "index, fragment",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "'weight_map' must be an object"),
        ('{"weight_map": ["model.safetensors"]}', "got list"),
        ('{"weight_map": {"model.norm.weight": 3}}', "weight_map['model.norm.weight'] is 3"),
        ('{"weight_map": {"model.norm.weight": "nope.safetensors"}}', "does not exist"),
    ],
    ids=["not-json", "not-object", "list", "not-string", "missing-file"],
)
def test_a_malformed_index_is_one_line_naming_it(hf, index, fragment):
    (hf / INDEX_NAME).write_text(index)
    with pytest.raises(DamagedCheckpointError) as err:
        _load(hf)
    message = _one_line(err.value)
    assert INDEX_NAME in message and fragment in message


def test_an_index_mapping_a_tensor_to_a_file_that_lacks_it_names_both(hf):
    save_file({"other": torch.zeros(2)}, str(hf / "other.safetensors"))
    weight_map = dict.fromkeys(_names(hf), "model.safetensors")
    weight_map["model.norm.weight"] = "other.safetensors"
    _index(hf, weight_map)
    with pytest.raises(DamagedCheckpointError, match=r"'model.norm.weight'.*other.safetensors"):
        _load(hf)


# -- safetensors bytes -----------------------------------------------------------


def _header(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _damage(path, how: str) -> None:
    raw = path.read_bytes()
    header, data = _header(path)
    name = "model.norm.weight"
    if how == "truncated":
        path.write_bytes(raw[: len(raw) - 100])
    elif how == "header-length":
        path.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    elif how == "garbage":
        path.write_bytes(b"\x07")
    elif how == "bad-json":
        n = struct.unpack("<Q", raw[:8])[0]
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n :])
    elif how == "offsets":
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start + len(data), end + len(data)]
        _write(path, header, data)
    elif how == "dtype":
        header[name]["dtype"] = "Q7"
        _write(path, header, data)
    elif how == "shape-overflow":
        header[name]["shape"] = [2**62, 2**62]
        _write(path, header, data)


@pytest.mark.parametrize(
    "how",
    ["truncated", "header-length", "garbage", "bad-json", "offsets", "dtype", "shape-overflow"],
)
def test_a_malformed_safetensors_file_is_one_line_naming_it(hf, how):
    _damage(hf / "model.safetensors", how)
    with pytest.raises(DamagedCheckpointError) as err:
        _load(hf)
    message = _one_line(err.value)
    assert str(hf / "model.safetensors") in message and "not a readable safetensors" in message


def test_an_integer_tensor_for_a_floating_weight_is_refused(hf):
    header, data = _header(hf / "model.safetensors")
    header["model.norm.weight"]["dtype"] = "I32"
    _write(hf / "model.safetensors", header, data)
    with pytest.raises(DamagedCheckpointError, match="'model.norm.weight'.*stored as I32"):
        _load(hf)


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(hf):
    config = json.loads((hf / "config.json").read_text())
    model = build_model({**config, "intermediate_size": 64})
    with pytest.raises(CheckpointError) as err:
        load_hf(ModelWrapper(model), str(hf), sd_adapter=LlamaStateDictAdapter(model.args))
    message = _one_line(err.value)
    assert "mlp.gate_proj.weight" in message
    assert "[64, 64]" in message and "[128, 64]" in message


def test_fp8_scales_of_the_wrong_shape_or_dtype_are_refused(hf):
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weight = "model.layers.0.mlp.up_proj.weight"
    tensors[weight] = tensors[weight].to(torch.float8_e4m3fn)
    for scale, fragment in [
        (torch.ones(3, 3), r"has shape \[3, 3\].*\[1, 1\]"),
        (torch.ones(1, 1, dtype=torch.int32), "stored as I32"),
    ]:
        save_file({**tensors, weight + "_scale_inv": scale}, str(hf / "model.safetensors"))
        with pytest.raises(DamagedCheckpointError, match=fragment) as err:
            _load(hf, fmt="hf_quantized")
        _one_line(err.value)
    save_file({**tensors, weight + "_scale": torch.ones(5)}, str(hf / "model.safetensors"))
    with pytest.raises(DamagedCheckpointError, match="holds 5 values"):
        _load(hf, fmt="hf_quantized")


# -- config.json -------------------------------------------------------------------


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"hidden_size": "64"}, "hidden_size is '64'"),
        ({"hidden_size": None}, "lacks 'hidden_size'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers is 0"),
        ({"vocab_size": -5}, "vocab_size is -5"),
        ({"num_attention_heads": 3}, "not a multiple of num_key_value_heads"),
        (
            {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": None},
            "hidden_size (64) is not a multiple",
        ),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps is 'tiny'"),
        ({"rope_parameters": [1]}, "rope parameters are [1]"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings is 'no'"),
        ({"tie_word_embeddings": None, "intermediate_size": True}, "intermediate_size is True"),
    ],
    ids=[
        "string",
        "missing",
        "zero",
        "negative",
        "kv-heads",
        "heads",
        "eps",
        "rope",
        "tie",
        "bool",
    ],
)
def test_a_malformed_config_is_one_line_naming_the_file_and_field(hf, change, fragment):
    _edit_config(hf, **change)
    with pytest.raises(DamagedCheckpointError) as err:
        build_model(str(hf))
    message = _one_line(err.value)
    assert str(hf / "config.json") in message and fragment in message


@pytest.mark.parametrize("text", ["{oops", "[64]", '"llama"', "\xff\xfe"], ids=str)
def test_a_config_that_is_not_a_json_object_is_one_line(hf, text):
    (hf / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(DamagedCheckpointError) as err:
        build_model(str(hf))
    assert str(hf / "config.json") in _one_line(err.value)


def test_a_config_symlinked_out_of_the_folder_is_refused(hf, tmp_path):
    os.replace(hf / "config.json", tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", hf / "config.json")
    with pytest.raises(DamagedCheckpointError, match="config.json.*symlink"):
        build_model(str(hf))


def test_huge_config_sizes_are_refused_before_anything_is_allocated(hf):
    # Within each field's own bound, but ~4.4e12 parameters: the folder holds ~165 kB.
    _edit_config(hf, hidden_size=1 << 16, intermediate_size=1 << 20, vocab_size=1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DamagedCheckpointError) as err:
        build_model(str(hf))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    message = _one_line(err.value)
    assert "parameters" in message and "hold only" in message
    assert grown_mib < 200
    _edit_config(hf, hidden_size=1 << 30)
    with pytest.raises(DamagedCheckpointError, match="hidden_size is 1073741824"):
        build_model(str(hf))


def test_an_unsupported_but_valid_config_stays_a_config_error(hf):
    _edit_config(hf, hidden_act="gelu")
    with pytest.raises(ConfigError, match="hidden_act"):
        build_model(str(hf))


# -- PEFT adapters and converter subfolders ---------------------------------------------


def _peft_adapter():
    from ckpt_plugins_lora import PeftLoraAdapter

    return PeftLoraAdapter([], rank=4, alpha=8.0, dropout=0.0, model_adapter=None)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{", "is not valid JSON"),
        ("[4]", "holds a JSON list"),
        ('{"r": "four"}', "r = 'four'"),
        ('{"r": 4, "lora_alpha": {"x": 1}}', "lora_alpha = {'x': 1}"),
    ],
    ids=["not-json", "list", "string-rank", "dict-alpha"],
)
def test_a_malformed_adapter_config_is_one_line(tmp_path, text, fragment):
    pytest.importorskip("ckpt_plugins_lora")
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(DamagedCheckpointError) as err:
        _peft_adapter().check_source(str(tmp_path))
    message = _one_line(err.value)
    assert "adapter_config.json" in message and fragment in message


def test_an_adapter_config_symlinked_out_is_refused(tmp_path):
    pytest.importorskip("ckpt_plugins_lora")
    (tmp_path / "peft").mkdir()
    (tmp_path / "cfg.json").write_text('{"r": 4, "lora_alpha": 8}')
    os.symlink(tmp_path / "cfg.json", tmp_path / "peft" / "adapter_config.json")
    with pytest.raises(DamagedCheckpointError, match="symlink"):
        _peft_adapter().check_source(str(tmp_path / "peft"))


def test_a_converter_subfolder_symlinked_out_of_the_export_is_refused(tmp_path):
    from ckpt_core import ConverterSet
    from ckpt_core.reference import ModelArgs
    from tests.core._export_converters import SidecarConverter

    model = build_model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, ffn_hidden_dim=64))
    converters = ConverterSet([SidecarConverter()])
    converters.convert(model)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "export").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "export" / "adapter")
    with pytest.raises(DamagedCheckpointError, match="not a folder inside"):
        load_additional(
            ModelWrapper(model, converters),
            str(tmp_path / "export"),
            converter="sidecar",
            sd_adapter=LlamaStateDictAdapter(model.args),
            converters=converters,
        )


def test_the_fifo_free_reader_still_loads_a_pristine_folder_exactly(hf):
    from safetensors import safe_open

    model = _load(hf)
    with safe_open(str(hf / "model.safetensors"), framework="pt") as f:
        want = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(model.layers["0"].feed_forward.w3.weight, want)
    containers = {"model.norm.weight": torch.empty(64)}
    assert read_into(containers, str(hf), strict=False) == []
