"""`ckpt inspect` and `ckpt verify` on real checkpoints, intact and damaged."""

from __future__ import annotations

import json
import os
import pickle

from ckpt_core.cli.main import main
from tests.core._manager_models import Trainable


def _two_steps(folder) -> None:
    run = Trainable(folder=str(folder), interval=1)
    for step in (1, 2):
        run.step()
        run.manager.save(step)


def test_verify_passes_an_intact_checkpoint_and_names_a_flipped_byte_and_a_truncated_file(
    tmp_path, capsys
):
    _two_steps(tmp_path)
    assert main(["verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("OK") == 2

    data = tmp_path / "step-1" / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    meta = tmp_path / "step-2" / ".metadata"
    with open(meta, "r+b") as f:
        f.truncate(meta.stat().st_size - 10)

    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "step-1" in out and "__0_0.distcp: checksum" in out
    assert ".metadata: truncated" in out
    # One step at a time, and a step folder directly; progress forced on works too.
    assert main(["verify", str(tmp_path), "--step", "2"]) == 1
    assert main(["verify", str(tmp_path / "step-1"), "--progress", "always"]) == 1


def test_verify_reports_missing_and_unlisted_files(tmp_path, capsys):
    _two_steps(tmp_path)
    os.remove(tmp_path / "step-2" / "__0_0.distcp")
    (tmp_path / "step-2" / "stray.bin").write_bytes(b"x")
    assert main(["verify", str(tmp_path / "step-2")]) == 1
    out = capsys.readouterr().out
    assert "__0_0.distcp: missing" in out and "stray.bin: unlisted" in out


def test_verify_exit_codes_name_a_missing_path_a_missing_step_and_a_manifestless_step(
    tmp_path, capsys
):
    _two_steps(tmp_path)
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main(["verify", str(tmp_path), "--step", "9"]) == 2
    assert "has no committed step 9; it has [1, 2]" in capsys.readouterr().err
    os.remove(tmp_path / "step-2" / "manifest.json")
    assert main(["verify", str(tmp_path / "step-2")]) == 1
    assert "manifest.json: missing" in capsys.readouterr().out


def test_inspect_lists_steps_states_tensors_and_the_manifest(tmp_path, capsys):
    _two_steps(tmp_path)
    os.makedirs(tmp_path / ".tmp-step-3")
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [row["step"] for row in info["steps"]] == [1, 2, ".tmp-step-3"]
    assert info["shown"].endswith("step-2") and info["manifest"]["step"] == 2
    tensors = {t["key"]: t for t in info["tensors"]}
    assert tensors["model.inp.weight"]["shape"] == [16, 16]
    assert tensors["model.inp.weight"]["dtype"] == "float32"
    assert tensors["model.inp.weight"]["bytes"] == 16 * 16 * 4
    assert "optimizer.state.inp.weight.exp_avg" in tensors
    assert set(info["states"]) == {"model", "optimizer", "lr_scheduler", "train_state"}
    assert main(["inspect", str(tmp_path), "--step", "1"]) == 0
    out = capsys.readouterr().out
    assert "model.inp.weight" in out and "step-1" in out


def test_inspect_refuses_a_metadata_file_with_a_code_payload(tmp_path, capsys):
    _two_steps(tmp_path)
    marker = tmp_path / "ran"
    payload = pickle.dumps(
        type("P", (), {"__reduce__": lambda s: (os.system, (f"touch {marker}",))})()
    )
    (tmp_path / "step-2" / ".metadata").write_bytes(payload)
    assert main(["inspect", str(tmp_path / "step-2")]) == 1  # hostile data: exit 1
    assert "not a DCP metadata type" in capsys.readouterr().err
    assert not marker.exists()


def test_inspect_of_a_folder_whose_newest_step_is_damaged_still_lists_the_steps(tmp_path, capsys):
    _two_steps(tmp_path)
    meta = tmp_path / "step-2" / ".metadata"
    with open(meta, "r+b") as f:
        f.truncate(100)
    assert main(["inspect", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "damaged" in captured.out and "ok" in captured.out  # step-2 and step-1 rows
    assert "step-2/.metadata is not readable DCP metadata" in captured.err
    assert main(["inspect", str(tmp_path), "--step", "1"]) == 0


def test_inspect_reads_safetensors_headers_and_refuses_a_missing_path(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    save_file(
        {"w": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)},
        str(tmp_path / "model.safetensors"),
    )
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    tensors = {t["key"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert tensors["model.safetensors:w"] == {
        "key": "model.safetensors:w",
        "shape": [3, 4],
        "dtype": "F32",
        "bytes": 48,
    }
    assert tensors["model.safetensors:b"]["bytes"] == 4
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
