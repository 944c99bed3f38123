"""Signed checkpoints and exports: an attacker who rewrites data *and* manifest is caught."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from ckpt_core import CheckpointConfig, CheckpointError, ModelWrapper
from ckpt_core.cli.main import main
from ckpt_core.errors import ConfigError
from ckpt_core.policy.exporter import write_export
from ckpt_core.policy.manager import CheckpointManager
from ckpt_core.reference import LlamaStateDictAdapter, ModelArgs, build_model
from ckpt_core.storage import manifest, signing
from tests.conftest import REPO_ROOT
from tests.core._manager_models import Trainable, assert_same, snapshot


@pytest.fixture
def keys(tmp_path):
    """A key pair made by ``ckpt keygen``: (private, public)."""
    private = str(tmp_path / "keys" / "signer")
    os.makedirs(os.path.dirname(private))
    assert main(["keygen", private]) == 0
    return private, private + ".pub"


def _two_steps(folder, **config) -> Trainable:
    run = Trainable(folder=str(folder), interval=1, **config)
    for step in (1, 2):
        run.step()
        run.manager.save(step)
    return run


def _forge(step_folder) -> None:
    """What a folder writer without the key can do: change data, then fix the manifest."""
    step_folder = str(step_folder)
    data = os.path.join(step_folder, "__0_0.distcp")
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) - 8)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    found = manifest.read(step_folder)
    found["files"] = manifest.file_entries(step_folder)
    manifest.write(step_folder, found)


def _resume(folder, **config) -> Trainable:
    run = Trainable(seed=1, folder=str(folder), interval=1, **config)
    run.before = snapshot(run.model)
    return run


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys):
    private, public = keys
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"PUBLIC KEY" in open(public, "rb").read()
    with pytest.raises(ConfigError, match="already exists"):
        signing.generate_key(private)
    with pytest.raises(ConfigError, match=r"signer\.pub is not a PEM private key"):
        signing.load_private_key(public)
    assert signing.key_id(signing.load_public_key(private)) == signing.key_id(
        signing.load_public_key(public)
    )


def test_a_forged_step_passes_the_crc_manifest_but_fails_the_signature_and_resume(
    tmp_path, keys, capsys
):
    private, public = keys
    ckpt = tmp_path / "ckpt"
    _two_steps(ckpt)
    assert main(["sign", str(ckpt), "--key", private]) == 0
    assert main(["verify", str(ckpt), "--key", public]) == 0
    out = capsys.readouterr().out
    assert out.count("SIGNED") == 2 and out.count("(signature checked)") == 2

    _forge(ckpt / "step-2")
    assert main(["verify", str(ckpt)]) == 0  # CRC-32 in the manifest is forgeable
    assert "signature not checked" in capsys.readouterr().out
    assert main(["verify", str(ckpt), "--key", public]) == 1
    out = capsys.readouterr().out
    assert "OK     " in out and f"FAILED {ckpt / 'step-2'}" in out
    assert "__0_0.distcp: sha256" in out

    run = _resume(ckpt, verify_key=public)
    with pytest.raises(CheckpointError, match=r"step-2 failed signature.*__0_0\.distcp: sha256"):
        run.manager.load()
    assert_same(snapshot(run.model), run.before)  # refused before any tensor was read
    # The intact older step still resumes under the same key.
    run = _resume(ckpt, verify_key=public, load_step=1)
    assert run.manager.load()


def test_a_key_that_did_not_sign_the_folder_is_refused(tmp_path, keys, capsys):
    private, _ = keys
    _two_steps(tmp_path / "ckpt")
    main(["sign", str(tmp_path / "ckpt"), "--key", private])
    other = str(tmp_path / "other")
    signing.generate_key(other)
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "ckpt" / "step-1"), "--key", other + ".pub"]) == 1
    assert "signature.json: signature (signed by ed25519:" in capsys.readouterr().out
    run = _resume(tmp_path / "ckpt", verify_key=other + ".pub")
    with pytest.raises(CheckpointError, match="not by key"):
        run.manager.load()


def test_unsigned_or_stripped_or_edited_or_extended_folders_are_refused(tmp_path, keys, capsys):
    private, public = keys
    ckpt = tmp_path / "ckpt"
    _two_steps(ckpt)
    with pytest.raises(CheckpointError, match="signature.json: unsigned"):
        _resume(ckpt, verify_key=public).manager.load()

    main(["sign", str(ckpt), "--key", private])
    os.remove(ckpt / "step-2" / "signature.json")  # removing the signature
    assert main(["verify", str(ckpt / "step-2"), "--key", public]) == 1
    assert "signature.json: unsigned" in capsys.readouterr().out

    sig = ckpt / "step-1" / "signature.json"  # editing a digest inside it
    doc = json.loads(sig.read_text())
    doc["files"]["__0_0.distcp"]["sha256"] = "0" * 64
    sig.write_text(json.dumps(doc))
    assert main(["verify", str(ckpt / "step-1"), "--key", public]) == 1
    assert "does not match its contents" in capsys.readouterr().out

    main(["sign", str(ckpt / "step-1"), "--key", private])  # an extra shard DCP would not
    shutil.copy(ckpt / "step-1" / "__0_0.distcp", ckpt / "step-1" / "__1_0.distcp")  # list,
    assert main(["verify", str(ckpt / "step-1"), "--key", public]) == 1  # but a loader may read
    assert "__1_0.distcp: unsigned" in capsys.readouterr().out


def test_a_signed_file_swapped_for_a_symlink_or_a_fifo_is_refused_without_reading_it(
    tmp_path, keys, capsys
):
    private, public = keys
    ckpt = tmp_path / "ckpt"
    _two_steps(ckpt)
    main(["sign", str(ckpt), "--key", private])
    data = ckpt / "step-1" / "__0_0.distcp"
    outside = tmp_path / "outside.distcp"
    shutil.move(data, outside)
    os.symlink(outside, data)  # the very same bytes, through a link
    meta = ckpt / "step-2" / ".metadata"
    os.remove(meta)
    os.mkfifo(meta)  # opening it for reading would block forever
    capsys.readouterr()
    assert main(["verify", str(ckpt), "--key", public]) == 1
    out = capsys.readouterr().out
    assert "__0_0.distcp: unreadable" in out and "symlink" in out
    assert ".metadata: unreadable" in out and "FIFO" in out


def test_an_old_signed_step_replayed_under_a_newer_name_is_refused(tmp_path, keys):
    private, public = keys
    ckpt = tmp_path / "ckpt"
    _two_steps(ckpt)
    main(["sign", str(ckpt), "--key", private])
    shutil.copytree(ckpt / "step-1", ckpt / "step-3")
    with pytest.raises(CheckpointError, match="signed as step 1, stored as step-3"):
        _resume(ckpt, verify_key=public).manager.load()


def test_sign_key_in_the_config_signs_every_step_and_the_export_on_save(tmp_path, keys, capsys):
    private, public = keys
    ckpt, export = tmp_path / "ckpt", tmp_path / "export"
    cfg = {"export": {"folder": str(export), "format": "dcp", "dtype": "float32"}}
    run = Trainable(folder=str(ckpt), interval=1, sign_key=private, async_mode="async", **cfg)
    for step in (1, 2, 3):
        run.step()
        run.manager.save(step, last_step=step == 3)
    run.manager.close()
    assert all(signing.has_signature(str(ckpt / f"step-{s}")) for s in (1, 2, 3))
    assert main(["verify", str(ckpt), "--key", public]) == 0
    assert main(["verify", str(export), "--key", public]) == 0
    assert capsys.readouterr().out.count("(signature checked)") == 4

    resumed = _resume(ckpt, verify_key=public)  # a signed resume is bit-exact
    assert resumed.manager.load() and resumed.manager.train_state.step == 3
    assert_same(snapshot(resumed.model), snapshot(run.model))
    # An initial load from the signed export passes the same check; a forged one does not.
    fresh = _resume(
        tmp_path / "empty", verify_key=public, initial_load={"path": str(export / "step-3")}
    )
    assert fresh.manager.load()
    assert_same(snapshot(fresh.model), snapshot(run.model))
    _forge(export / "step-3")
    fresh = _resume(
        tmp_path / "empty2", verify_key=public, initial_load={"path": str(export / "step-3")}
    )
    with pytest.raises(CheckpointError, match="sha256"):
        fresh.manager.load()


def _llama():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96)
    return build_model(args).eval()


def test_a_signed_hf_export_verifies_and_a_forged_one_is_refused_by_initial_load(
    tmp_path, keys, capsys
):
    private, public = keys
    model = _llama()
    folder = tmp_path / "export" / "step-5"
    adapter = LlamaStateDictAdapter(model.args)
    write_export(
        ModelWrapper(model), str(folder), fmt="hf", dtype="float32", sd_adapter=adapter, step=5
    )
    assert main(["sign", str(folder), "--key", private]) == 0
    assert main(["verify", str(folder), "--key", public]) == 0

    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 0.5  # a small, plausible change, with its manifest entry redone
    (folder / "config.json").write_text(json.dumps(config))
    found = manifest.read(str(folder))
    found["files"] = manifest.file_entries(str(folder))
    manifest.write(str(folder), found)
    assert main(["verify", str(folder)]) == 0
    assert main(["verify", str(folder), "--key", public]) == 1
    assert "config.json: s" in capsys.readouterr().out  # size or sha256

    target = _llama()
    manager = CheckpointManager(
        CheckpointConfig(
            folder=str(tmp_path / "run"),
            verify_key=public,
            initial_load={"path": str(folder), "format": "hf"},
        ),
        target,
        sd_adapter=adapter,
    )
    with pytest.raises(CheckpointError, match="config.json"):
        manager.load()


def test_without_cryptography_core_works_and_signing_names_the_extra(tmp_path):
    _two_steps(tmp_path / "ckpt")
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from ckpt_core.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )

    def ckpt(*args):
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=120,
        )

    plain = ckpt("verify", str(tmp_path / "ckpt"))
    assert plain.returncode == 0 and plain.stdout.count("OK") == 2, plain.stderr
    for args in (["sign", str(tmp_path / "ckpt"), "--key", "k"], ["keygen", str(tmp_path / "k")]):
        done = ckpt(*args)
        assert done.returncode == 2
        assert "pip install 'ckpt-core[sign]'" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
