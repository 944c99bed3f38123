"""Hugging Face folders read from ``s3://`` by ranged requests, under the local rules.

The folder is written locally by transformers, uploaded to the loopback server,
and read back: the manager's ``initial_load``, ``ckpt convert`` from it, and
hostile files refused with the same line as the local copy (the path aside).
"""

from __future__ import annotations

import json
import logging
import os
import struct

import pytest
import torch
from safetensors import safe_open

from ckpt_core import CheckpointConfig, CheckpointManager
from ckpt_core.cli.main import main
from ckpt_core.errors import DamagedCheckpointError
from ckpt_core.reference import LlamaStateDictAdapter, build_model
from ckpt_core.storage import layout
from ckpt_core.storage.hf_reader import INDEX_NAME, index_folder, open_safetensors
from tests.core.hf_helpers import save_hf_llama


@pytest.fixture(autouse=True)
def _quiet_server(monkeypatch):
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)


def _upload(local, uri: str) -> str:
    fs, inner = layout.filesystem(uri)
    for name in os.listdir(local):
        fs.put_file(os.path.join(local, name), f"{inner}/{name}")
    fs.invalidate_cache()
    return uri


def _initial_load(path: str, tmp_path, name: str) -> dict[str, torch.Tensor]:
    config = json.loads(open(os.path.join(tmp_path, "hf", "config.json")).read())
    model = build_model({**config, "model_type": "llama"})
    manager = CheckpointManager(
        CheckpointConfig(
            folder=str(tmp_path / name),
            initial_load={"path": path, "format": "hf"},
            export={"enable": False},
        ),
        model,
        sd_adapter=LlamaStateDictAdapter(model.args),
    )
    try:
        manager.load()
    finally:
        manager.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_initial_load_and_convert_from_an_hf_folder_on_s3_equal_the_local_ones(
    s3_bucket, tmp_path, capsys
):
    # Two shards and an index: the index's names and every header are read remotely.
    model = save_hf_llama(tmp_path / "hf0")
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="60KB")
    assert os.path.exists(tmp_path / "hf" / INDEX_NAME)
    uri = _upload(tmp_path / "hf", f"{s3_bucket}/models/tiny")
    local_names = index_folder(str(tmp_path / "hf"))

    local = _initial_load(str(tmp_path / "hf"), tmp_path, "a")
    remote = _initial_load(uri, tmp_path, "b")
    assert local.keys() == remote.keys()
    for key, value in local.items():
        assert torch.equal(remote[key], value), key

    # Sliced reads (a sharded rank's region) fetch rows and equal safetensors' own.
    file = sorted(set(index_folder(str(tmp_path / "hf")).values()))[0]
    with (
        safe_open(file, framework="pt") as mine,
        open_safetensors(f"{uri}/{os.path.basename(file)}") as theirs,
    ):
        assert list(theirs.keys()) == list(mine.keys())
        for name in mine.keys():
            shape = mine.get_slice(name).get_shape()
            for index in [(), (slice(1, 3),), (slice(0, shape[0]), slice(2, 5))][: len(shape) + 1]:
                assert torch.equal(theirs.get_slice(name)[index], mine.get_slice(name)[index])

    # ckpt inspect lists the tensors of every file from its header alone.
    capsys.readouterr()
    assert main(["inspect", uri, "--json", "--limit", "0"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {t["key"].split(":", 1)[1] for t in shown["tensors"]} == set(local_names)

    # ckpt convert: HF on S3 -> local DCP -> local HF equals the original tensors.
    dcp, back = str(tmp_path / "dcp"), str(tmp_path / "back")
    assert main(["convert", uri, dcp, "--to", "dcp", "--no-progress"]) == 0
    assert main(["convert", dcp, back, "--to", "hf", "--no-progress"]) == 0
    with open_safetensors(str(tmp_path / "back" / "model.safetensors")) as back:
        for name, path in index_folder(str(tmp_path / "hf")).items():
            with safe_open(path, framework="pt") as f:
                assert torch.equal(back.get_tensor(name), f.get_tensor(name)), name


def _hostile(raw: bytes, how: str) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    if how == "length beyond the object":
        return struct.pack("<Q", len(raw)) + raw[8:]
    if how == "header too large":
        return struct.pack("<Q", 1 << 40) + raw[8:]
    name = next(k for k in header if k != "__metadata__")
    if how == "offsets out of range":
        header[name]["data_offsets"] = [0, 1 << 30]
    elif how == "shape x dtype beyond its bytes":
        header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :]


@pytest.mark.parametrize(
    "how",
    [
        "length beyond the object",
        "header too large",
        "offsets out of range",
        "shape x dtype beyond its bytes",
        "truncated",
    ],
)
def test_a_hostile_safetensors_on_s3_is_refused_with_the_local_line(s3_bucket, tmp_path, how):
    save_hf_llama(tmp_path / "hf")
    raw = (tmp_path / "hf" / "model.safetensors").read_bytes()
    bad = raw[:-4] if how == "truncated" else _hostile(raw, how)
    (tmp_path / "hf" / "model.safetensors").write_bytes(bad)
    uri = _upload(tmp_path / "hf", f"{s3_bucket}/bad")
    errors = []
    for folder in (str(tmp_path / "hf"), uri):
        with pytest.raises(DamagedCheckpointError) as err:
            index_folder(folder)
        text = str(err.value)
        assert "\n" not in text and f"{folder}/model.safetensors" in text
        errors.append(text.replace(folder, "<folder>"))
    assert errors[0] == errors[1]


def test_an_index_on_s3_naming_a_file_outside_the_folder_is_refused(s3_bucket, tmp_path):
    save_hf_llama(tmp_path / "hf")
    names = list(index_folder(str(tmp_path / "hf")))
    weight_map = dict.fromkeys(names, "model.safetensors")
    weight_map[names[0]] = "../other/model.safetensors"
    (tmp_path / "hf" / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    uri = _upload(tmp_path / "hf", f"{s3_bucket}/models/m")
    _upload(tmp_path / "hf", f"{s3_bucket}/models/other")
    with pytest.raises(DamagedCheckpointError, match=r"'\.\./other/model\.safetensors'"):
        index_folder(uri)


def test_an_additional_load_reads_a_converter_subfolder_of_an_export_on_s3(s3_bucket):
    from ckpt_core import ConverterSet, ModelWrapper
    from ckpt_core.policy.exporter import load_additional, write_export
    from ckpt_core.reference import ModelArgs
    from tests.core._export_converters import SidecarConverter

    def model(seed):
        torch.manual_seed(seed)
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, ffn_hidden_dim=128)
        built, convs = build_model(args), ConverterSet([SidecarConverter()])
        convs.convert(built)
        return built, convs, LlamaStateDictAdapter(args)

    trained, convs, adapter = model(0)
    export = f"{s3_bucket}/exports/step-3"
    write_export(ModelWrapper(trained, convs), export, fmt="hf", dtype=None, sd_adapter=adapter,
                 converters=convs, step=3)  # fmt: skip
    fresh, fresh_convs, fresh_adapter = model(1)
    missing = load_additional(
        ModelWrapper(fresh, fresh_convs), export, converter="sidecar",
        sd_adapter=fresh_adapter, converters=fresh_convs,
    )  # fmt: skip
    assert missing == []
    for i in ("0", "1"):
        want = trained.layers[i].attention.wq.sidecar.weight
        assert torch.equal(fresh.layers[i].attention.wq.sidecar.weight, want)
    assert not torch.equal(fresh.tok_embeddings.weight, trained.tok_embeddings.weight)


def test_ckpt_train_starts_from_an_hf_folder_on_s3(s3_bucket, tmp_path):
    import subprocess
    import sys

    save_hf_llama(tmp_path / "hf")
    uri = _upload(tmp_path / "hf", f"{s3_bucket}/models/tiny")
    cmd = [sys.executable, "-m", "ckpt_core.cli.main", "train", "--model.name", uri]
    cmd += ["--training.seq_len", "32", "--training.batch_size", "2", "--training.steps", "1"]
    cmd += ["--job.folder", str(tmp_path / "run"), "--checkpoint.export.enable", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Initial load from {uri} (format hf" in proc.stderr
