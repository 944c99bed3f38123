"""``ckpt convert``, ``inspect`` and ``verify`` on ``s3://`` URIs, through the loopback server.

Each command runs in this process (``ckpt_core.cli.main.main``) against moto's
HTTP server: s3fs finds it through ``AWS_ENDPOINT_URL`` as it would find AWS.
"""

from __future__ import annotations

import logging
import os

import boto3
import pytest
import torch
from safetensors.torch import load_file

from ckpt_core.cli.main import main
from ckpt_core.storage import layout
from tests.core.hf_helpers import save_hf_llama


@pytest.fixture(autouse=True)
def _quiet_server(monkeypatch):
    """The in-process server logs every request; keep stderr to the command's own lines."""
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)


def _tensors(folder) -> dict[str, torch.Tensor]:
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    return {k: v for f in files for k, v in load_file(os.path.join(folder, f)).items()}


def _convert(*argv) -> int:
    return main(["convert", *map(str, argv), "--no-progress"])


def _errors(captured) -> list[str]:
    """The command's own stderr lines (the in-process server logs each request there too)."""
    return [
        line
        for line in captured.err.splitlines()
        if line.startswith("ckpt ") or "Traceback" in line or line.startswith("  File")
    ]


def _download(uri: str, local) -> str:
    fs, inner = layout.filesystem(uri)
    fs.get(inner.rstrip("/") + "/", str(local) + "/", recursive=True)
    return str(local)


def test_convert_moves_a_model_between_local_folders_and_s3_bit_exactly(
    s3_bucket, tmp_path, capsys
):
    save_hf_llama(tmp_path / "hf")
    dcp, hf_on_s3 = f"{s3_bucket}/run/dcp", f"{s3_bucket}/run/hf"
    assert _convert(tmp_path / "hf", dcp, "--to", "dcp") == 0  # local HF -> DCP on S3
    assert layout.exists(f"{dcp}/.metadata") and layout.exists(f"{dcp}/manifest.json")
    assert _convert(dcp, tmp_path / "back", "--to", "hf") == 0  # DCP on S3 -> local HF
    assert _convert(dcp, hf_on_s3, "--to", "hf") == 0  # DCP on S3 -> HF on S3
    original = _tensors(tmp_path / "hf")
    for folder in (tmp_path / "back", _download(hf_on_s3, tmp_path / "fetched")):
        back = _tensors(folder)
        assert back.keys() == original.keys()
        for key, value in original.items():
            assert torch.equal(back[key], value), key
    capsys.readouterr()


def test_inspect_and_verify_read_s3_and_verify_catches_a_changed_object(
    s3_bucket, tmp_path, capsys
):
    save_hf_llama(tmp_path / "hf")
    step = f"{s3_bucket}/run/checkpoints/step-7"
    assert _convert(tmp_path / "hf", step, "--to", "dcp") == 0
    capsys.readouterr()
    assert main(["inspect", step]) == 0
    assert "model.layers.0.attention" in capsys.readouterr().out.replace("\n", "")
    assert main(["verify", f"{s3_bucket}/run/checkpoints"]) == 0
    assert "OK" in capsys.readouterr().out

    # Same size, one byte changed: only the checksum can tell.
    bucket, key = step[len("s3://") :].split("/", 1)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    data = bytearray(client.get_object(Bucket=bucket, Key=f"{key}/__0_0.distcp")["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=f"{key}/__0_0.distcp", Body=bytes(data))
    layout.filesystem(step)[0].invalidate_cache()
    assert main(["verify", step]) == 1  # as for a local folder
    assert "__0_0.distcp" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_a_missing_bucket_is_one_line_naming_the_uri_exit_2(s3_env, tmp_path, capsys, command):
    uri = "s3://ckpt-no-such-bucket/run/step-1"
    argv = [command, uri] + ([str(tmp_path / "out"), "--to", "hf"] if command == "convert" else [])
    assert main(argv) == 2
    (err,) = _errors(capsys.readouterr())
    assert err.startswith(f"ckpt {command}: error:") and uri in err


def test_missing_credentials_are_one_line_naming_the_uri_and_the_fix(
    s3_bucket, monkeypatch, capsys
):
    from tests.s3.conftest import clear_s3fs_caches

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    clear_s3fs_caches()
    uri = f"{s3_bucket}/run/checkpoints"
    assert main(["inspect", uri]) == 2
    (err,) = _errors(capsys.readouterr())
    assert uri in err and "AWS_ACCESS_KEY_ID" in err and "credentials" in err
