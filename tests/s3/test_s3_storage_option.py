"""``--storage-option KEY=VALUE`` gives ``convert``, ``inspect`` and ``verify`` their fsspec
options: here the credentials, with none in the environment. Values are never printed."""

from __future__ import annotations

import logging
import os

import pytest

from ckpt_core.cli.main import main
from ckpt_core.storage import layout
from tests.core.hf_helpers import save_hf_llama
from tests.s3.conftest import CREDENTIALS, clear_s3fs_caches

SECRET = CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
OPTIONS = [
    "--storage-option",
    f"key={CREDENTIALS['AWS_ACCESS_KEY_ID']}",
    f"--storage-option=secret={SECRET}",
    "--storage-option",
    'config_kwargs={"retries": {"max_attempts": 2}}',  # JSON values
]


@pytest.fixture(autouse=True)
def _quiet_server(monkeypatch):
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)


def test_storage_options_carry_the_credentials_and_are_never_printed(
    s3_bucket, tmp_path, monkeypatch, capsys
):
    save_hf_llama(tmp_path / "hf")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(layout, "_OPTIONS", {})  # this test's options stay in this test
    clear_s3fs_caches()
    step = f"{s3_bucket}/run/step-1"

    assert main(["inspect", step]) == 2  # no credentials anywhere
    assert "credentials" in capsys.readouterr().err
    argv = ["convert", str(tmp_path / "hf"), step, "--to", "dcp", "--no-progress", *OPTIONS]
    assert main(argv) == 0
    assert main(["verify", step, *OPTIONS]) == 0
    assert main(["inspect", step, *OPTIONS]) == 0
    assert "model.layers.0" in capsys.readouterr().out

    # A failure with the options set (no such bucket) and a malformed item: no value shown.
    missing = "s3://ckpt-no-such-bucket/run"
    assert main(["verify", missing, *OPTIONS]) == 2
    assert main(["inspect", step, "--storage-option", f"{SECRET}"]) == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert missing in captured.err and "KEY=VALUE" in captured.err


def test_a_spawned_convert_worker_gets_the_storage_options(monkeypatch):
    """``--workers N`` with spawned workers: the options travel on the worker's stdin."""
    from ckpt_core.convert.workers import decode_request, encode_request
    from ckpt_core.convert.write import Request

    monkeypatch.setattr(layout, "_OPTIONS", {})
    layout.set_storage_options("s3://b/run", {"secret": SECRET, "anon": False})
    request = Request("s3://b/run/step-1", "dcp", "llama", {}, [], "hf", None, "/tmp/x", 1 << 20)
    data = encode_request(request, [])
    monkeypatch.setattr(layout, "_OPTIONS", {})  # the fresh worker process
    assert decode_request(data)[0] == request
    assert layout.storage_options("s3://b/run/step-1/x") == {"secret": SECRET, "anon": False}
