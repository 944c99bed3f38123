"""``ckpt convert`` destinations: a file, a leftover ``.ckpt-convert-new``, a full or
read-only disk.

The full and read-only disks are real: a 64 KiB tmpfs (remounted read-only for
EROFS), skipped where this process may not mount.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

from ckpt_core.cli.main import main
from tests.core.hf_helpers import save_hf_llama


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "hf"
    save_hf_llama(folder, layers=1, vocab=32)  # ~160 kB of fp32 weights
    return folder


def _convert(capsys, *argv) -> tuple[int, str]:
    code = main(["convert", *map(str, argv), "--no-progress"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ckpt convert:")]
    assert len(lines) <= 1, err
    return code, lines[0] if lines else ""


def _snapshot(folder) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_overwrite_onto_a_file_is_one_line_and_leaves_the_file(source, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.write_text("not a folder")
    for extra in ([], ["--overwrite"]):
        code, line = _convert(capsys, source, dst, "--to", "hf", *extra)
        assert code == 2 and f"DST {dst} is a file" in line
    assert dst.read_text() == "not a folder"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_leftover_convert_new_folder_is_named_and_kept(source, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("previous")
    pending = tmp_path / "out.ckpt-convert-new"
    pending.mkdir()
    (pending / "partial").write_text("another convert's work")
    code, line = _convert(capsys, source, dst, "--to", "hf", "--overwrite")
    assert code == 2 and str(pending) in line and "remove it" in line
    assert (pending / "partial").read_text() == "another convert's work"
    assert (dst / "keep.txt").read_text() == "previous"


def test_overwrite_swaps_the_new_folder_in_and_leaves_no_sibling(source, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("previous")
    code, _ = _convert(capsys, source, dst, "--to", "dcp", "--overwrite")
    assert code == 0
    assert not (dst / "keep.txt").exists() and (dst / ".metadata").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


@contextlib.contextmanager
def _tmpfs(path, size="64k"):
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.mark.parametrize("to", ["hf", "dcp"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_a_full_disk_is_one_line_and_the_previous_destination_is_intact(
    source, tmp_path, capsys, to, overwrite
):
    with _tmpfs(tmp_path / "disk") as disk:
        dst = disk / "out"
        if overwrite:
            dst.mkdir()
            (dst / "keep.txt").write_text("previous")
        before = _snapshot(disk)
        extra = ["--overwrite"] if overwrite else []
        code, line = _convert(capsys, source, dst, "--to", to, *extra)
        assert code == 1, line
        assert f"{dst}: No space left on device (ENOSPC)" in line and "free space" in line
        assert _snapshot(disk) == before  # nothing half-written is left behind
        assert os.listdir(disk) == (["out"] if overwrite else [])


def test_a_read_only_destination_is_one_line_and_keeps_its_content(source, tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", size="1m") as mount:
        dst = mount / "out"
        shutil.copytree(source, dst)
        before = _snapshot(mount)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        code, line = _convert(capsys, source, dst, "--to", "hf", "--overwrite")
        assert code == 2 and "Read-only file system (EROFS)" in line and str(mount) in line
        assert _snapshot(mount) == before
