"""Crafted ``manifest.json``: verify, inspect, resume and convert read nothing outside the
step and answer malformed fields with one line, never a traceback."""

from __future__ import annotations

import json
import os
import zlib

import pytest

from ckpt_core import CheckpointError
from ckpt_core.cli.main import main
from tests.core._manager_models import Trainable

SECRET = b"outside the checkpoint: must never be measured\n"


@pytest.fixture
def step(tmp_path):
    run = Trainable(folder=str(tmp_path / "ckpt"), interval=1)
    run.manager.save(1)
    run.manager.close()
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return tmp_path / "ckpt" / "step-1"


def _edit(step, change) -> None:
    path = step / "manifest.json"
    data = json.loads(path.read_text())
    data = change(data)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def _add_entry(name: str):
    def change(data):
        data["files"][name] = {"size": len(SECRET), "checksum": "crc32:00000000"}
        return data

    return change


def _leaks(text: str) -> bool:
    crc = f"{zlib.crc32(SECRET):08x}"
    return crc in text or f"{len(SECRET)} bytes, manifest" in text


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_verify_never_measures_a_file_a_manifest_names_outside_the_step(
    step, tmp_path, capsys, where
):
    name = str(tmp_path / "secret.txt") if where == "absolute" else "../../secret.txt"
    _edit(step, _add_entry(name))
    code, out, err = _run(capsys, "verify", str(step))
    assert code == 1, out + err
    assert name in out + err
    assert not _leaks(out + err)
    assert len((out + err).strip().splitlines()) <= 2  # FAILED + the one named entry


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_verify_refuses_symlinked_data_files_and_directories(step, tmp_path, capsys, kind):
    if kind == "file":
        os.symlink(tmp_path / "secret.txt", step / "link.distcp")
        name = "link.distcp"
    else:
        os.symlink(tmp_path, step / "sub")
        name = "sub/secret.txt"
    _edit(step, _add_entry(name))
    code, out, err = _run(capsys, "verify", str(step))
    assert code == 1
    assert f"{name}: unsafe" in out and "symlink" in out
    assert not _leaks(out + err)


def test_verify_refuses_a_fifo_entry_without_blocking(step, capsys):
    os.mkfifo(step / "pipe.distcp")
    keep = os.open(step / "pipe.distcp", os.O_RDWR | os.O_NONBLOCK)
    try:
        _edit(step, _add_entry("pipe.distcp"))
        code, out, _err = _run(capsys, "verify", str(step))
    finally:
        os.close(keep)
    assert code == 1 and "pipe.distcp: unsafe" in out and "FIFO" in out


def test_a_symlinked_manifest_is_not_followed(step, tmp_path, capsys):
    real = tmp_path / "elsewhere.json"
    real.write_text((step / "manifest.json").read_text())
    os.remove(step / "manifest.json")
    os.symlink(real, step / "manifest.json")
    code, _out, err = _run(capsys, "inspect", str(step))
    assert code == 1 and "symlink" in err and len(err.strip().splitlines()) == 1


MALFORMED = {
    "non-dict": lambda d: [1, 2],
    "not-json": lambda d: "{not json",
    "no-files": lambda d: {k: v for k, v in d.items() if k != "files"},
    "files-list": lambda d: {**d, "files": ["a"]},
    "size-string": lambda d: {**d, "files": {".metadata": {"size": "12", "checksum": "x"}}},
    "size-huge": lambda d: {**d, "files": {".metadata": {"size": 10**30, "checksum": "x"}}},
    "size-negative": lambda d: {**d, "files": {".metadata": {"size": -1, "checksum": "x"}}},
    "checksum-int": lambda d: {**d, "files": {".metadata": {"size": 1, "checksum": 5}}},
    "entry-null": lambda d: {**d, "files": {".metadata": None}},
    "step-string": lambda d: {**d, "step": "1"},
    "model-list": lambda d: {**d, "model": ["llama"]},
    "model-no-adapter": lambda d: {**d, "model": {"config": {}}},
    "converters-dict": lambda d: {**d, "converters": {}},
    "base-path-int": lambda d: {**d, "base": {"path": 3, "format": "dcp", "checksum": "c"}},
}


@pytest.mark.parametrize("change", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_manifests_are_one_line_in_verify_inspect_resume_and_convert(
    step, tmp_path, capsys, change
):
    _edit(step, change)
    code, out, err = _run(capsys, "verify", str(step))
    assert code == 1 and "manifest.json" in out + err
    code, out, err = _run(capsys, "inspect", str(step))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    code, out, err = _run(capsys, "convert", str(step), str(tmp_path / "out"), "--to", "hf")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    with pytest.raises(CheckpointError) as info:
        Trainable(folder=str(step.parent)).manager.load(step=1)
    assert "\n" not in str(info.value) and "manifest.json" in str(info.value)


def test_discovery_passes_over_a_step_with_a_malformed_manifest(step, caplog):
    first = Trainable(folder=str(step.parent), interval=1)
    first.manager.load()
    first.manager.save(2)
    first.manager.close()
    _edit(step.parent / "step-2", lambda d: {**d, "files": "nope"})
    resumed = Trainable(folder=str(step.parent))
    assert resumed.manager.load() is True
    assert resumed.manager.train_state.step == 1  # step 2 is passed over, with a warning
    assert "step-2" in caplog.text
