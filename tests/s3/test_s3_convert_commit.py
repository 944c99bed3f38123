"""``ckpt convert`` to ``s3://`` writes in place and commits with the manifest, written last.

A convert cut off before its manifest (here: the manifest's PUT fails and the
cleanup never runs, as when the process is killed there) leaves objects that no
command takes for a complete folder; the next convert removes them and succeeds.
"""

from __future__ import annotations

import logging

import pytest

from ckpt_core.cli import convert_dest
from ckpt_core.cli.main import main
from ckpt_core.storage import layout, manifest
from tests.core.hf_helpers import save_hf_llama


@pytest.fixture(autouse=True)
def _quiet_server(monkeypatch):
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)


def _convert(*argv) -> int:
    return main(["convert", *map(str, argv), "--no-progress"])


def _keys(uri: str) -> list[str]:
    fs, inner = layout.filesystem(uri)
    fs.invalidate_cache()
    return sorted(p[len(inner.rstrip("/")) + 1 :] for p in fs.find(inner))


def test_a_cut_off_convert_to_s3_never_looks_complete_and_a_rerun_succeeds(
    s3_bucket, tmp_path, monkeypatch, capsys
):
    save_hf_llama(tmp_path / "hf")
    run = f"{s3_bucket}/run"
    dst = f"{run}/step-3"

    def killed(*args, **kwargs):  # the process dies right before the committing PUT
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(manifest, "write_bytes", killed)
        m.setattr(convert_dest, "discard", lambda *a, **k: None)
        assert _convert(tmp_path / "hf", dst, "--to", "dcp") != 0
    left = _keys(dst)
    # Written in place (no .tmp-* folder moved afterwards), data and .metadata, no manifest.
    assert ".metadata" in left and manifest.MANIFEST_NAME not in left
    assert not [k for k in _keys(run) if ".tmp" in k]
    capsys.readouterr()

    assert layout.committed_steps(run) == []
    assert main(["verify", run]) != 0  # no committed step to vouch for
    assert _convert(run, tmp_path / "out", "--to", "hf") == 2  # nothing to read
    assert "step" in capsys.readouterr().err

    # The rerun removes what the cut-off one left and commits; the manifest is last.
    assert _convert(tmp_path / "hf", dst, "--to", "dcp") == 0
    assert layout.committed_steps(run) == [3]
    assert main(["verify", run]) == 0
    listed = manifest.read(dst)["files"]
    assert set(listed) == set(_keys(dst)) - {manifest.MANIFEST_NAME}
    capsys.readouterr()

    # A complete destination is never overwritten without --overwrite ...
    assert _convert(tmp_path / "hf", dst, "--to", "dcp") == 2
    assert "already exists" in capsys.readouterr().err
    # ... and --overwrite replaces it in place (no sibling folders on the store).
    assert _convert(tmp_path / "hf", dst, "--to", "dcp", "--overwrite") == 0
    assert main(["verify", dst]) == 0
    assert [k.split("/")[0] for k in _keys(run)] == ["step-3"] * len(_keys(run))
