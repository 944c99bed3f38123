"""Names a checkpoint gives for its own files are checked before anything is opened."""

from __future__ import annotations

import os

import pytest

from ckpt_core.errors import CheckpointError
from ckpt_core.storage.paths import check_length, check_name, open_regular, resolve_inside


@pytest.fixture
def folder(tmp_path):
    step = tmp_path / "step-1"
    (step / "sub").mkdir(parents=True)
    (step / "data.distcp").write_bytes(b"x" * 100)
    (step / "sub" / "inner.bin").write_bytes(b"y" * 10)
    (tmp_path / "secret.txt").write_text("outside")
    return step


def _refused(folder, name, match, **kw):
    with pytest.raises(CheckpointError, match=match) as info:
        resolve_inside(str(folder), name, what="test entry", **kw)
    assert "\n" not in str(info.value)
    assert "test entry" in str(info.value)


def test_plain_names_resolve_to_the_file_inside(folder):
    assert resolve_inside(str(folder), "data.distcp", what="x") == str(folder / "data.distcp")
    assert resolve_inside(str(folder), "sub/inner.bin", what="x") == str(
        folder / "sub" / "inner.bin"
    )


@pytest.mark.parametrize("name", ["/etc/passwd", "\\x", "C:/x", "", None, 5, "a\x00b"])
def test_absolute_empty_and_non_string_names_are_refused(folder, name):
    with pytest.raises(CheckpointError):
        check_name(name, what="x")
    with pytest.raises(CheckpointError):
        resolve_inside(str(folder), name, what="x")


def test_dotdot_is_refused_even_when_it_lands_inside(folder):
    _refused(folder, "../secret.txt", "'\\.\\.'")
    _refused(folder, "sub/../data.distcp", "'\\.\\.'")


def test_symlink_out_of_the_folder_is_refused(folder, tmp_path):
    os.symlink(tmp_path / "secret.txt", folder / "link.distcp")
    _refused(folder, "link.distcp", "leads out")
    os.symlink("/dev/zero", folder / "zero.distcp")
    _refused(folder, "zero.distcp", "leads out")


def test_symlink_inside_is_allowed_unless_symlinks_are_off(folder):
    os.symlink("data.distcp", folder / "alias.distcp")
    os.symlink("sub", folder / "dirlink")
    assert resolve_inside(str(folder), "alias.distcp", what="x") == str(folder / "data.distcp")
    _refused(folder, "alias.distcp", "symlink", symlinks=False)
    _refused(folder, "dirlink/inner.bin", "symlink", symlinks=False)


def test_fifo_folder_and_missing_file_are_refused_without_blocking(folder):
    os.mkfifo(folder / "pipe.distcp")
    _refused(folder, "pipe.distcp", "a FIFO")
    _refused(folder, "sub", "a folder")
    _refused(folder, "nothing.distcp", "does not exist")


def test_a_folder_given_through_a_symlink_still_works(folder, tmp_path):
    os.symlink(folder, tmp_path / "alias")
    assert resolve_inside(str(tmp_path / "alias"), "data.distcp", what="x") == str(
        folder / "data.distcp"
    )


def test_lengths_beyond_the_file_or_of_wrong_type_are_refused(folder):
    path = str(folder / "data.distcp")
    check_length(path, 0, 100, what="x")
    check_length(path, 90, 10, what="x")
    for offset, length in [(0, 101), (99, 2), (0, 1 << 30), (-1, 1), (0, True), (0, 1.0)]:
        with pytest.raises(CheckpointError):
            check_length(path, offset, length, what="x")


def test_open_regular_refuses_symlinks_and_fifos(folder):
    with open_regular(str(folder / "data.distcp"), what="x") as f:
        assert f.read() == b"x" * 100
    os.symlink("data.distcp", folder / "alias.distcp")
    with pytest.raises(CheckpointError, match="symlink"):
        open_regular(str(folder / "alias.distcp"), what="x")
    os.mkfifo(folder / "pipe")
    with pytest.raises(CheckpointError, match="FIFO"):
        open_regular(str(folder / "pipe"), what="x")


def test_uri_names_follow_the_same_rules(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/paths-test/step-1/data.distcp", b"z" * 8)
    root = "memory://paths-test/step-1"
    assert resolve_inside(root, "data.distcp", what="x").endswith("/step-1/data.distcp")
    check_length(f"{root}/data.distcp", 0, 8, what="x")
    with pytest.raises(CheckpointError):
        check_length(f"{root}/data.distcp", 0, 9, what="x")
    for name in ("../x", "/paths-test/step-1/data.distcp", "missing"):
        with pytest.raises(CheckpointError):
            resolve_inside(root, name, what="x")
