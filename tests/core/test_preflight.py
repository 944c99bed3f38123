"""Pre-flight before step 1, and saves that fail mid-run, on real file systems.

Full disks and read-only mounts are real: a small tmpfs mounted for the test
(skipped where mounting is not permitted), or a file-size limit
(``RLIMIT_FSIZE``) in a child process, which needs no privileges.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from ckpt_core import CheckpointConfig
from ckpt_core.errors import CheckpointError, PreflightError, SaveError
from ckpt_core.policy.manager import CheckpointManager
from ckpt_core.policy.preflight import check_space, probe
from ckpt_core.storage import layout, manifest
from tests.core._manager_models import TinyNet, Trainable

DIM = 256  # TinyNet(256): ~0.5 MiB of weights, ~1.5 MiB with AdamW's state


@pytest.fixture
def small_fs(tmp_path):
    """``mount(size, name)``: a folder on a fresh tmpfs of ``size``; ``.ro(point, bool)``."""
    mounted: list[str] = []

    def mount(size: str = "1m", name: str = "fs") -> str:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root and mount(8)")
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")
        mounted.append(str(point))
        return str(point)

    def read_only(point: str, on: bool = True) -> None:
        option = "remount,ro" if on else "remount,rw"
        subprocess.run(["mount", "-o", option, point], check=True)

    mount.read_only = read_only
    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", point], capture_output=True)


def fill(folder: str) -> str:
    """Write a file until the file system is full; returns its path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return path


def trained(folder: str, **config) -> Trainable:
    run = Trainable(dim=DIM, folder=folder, interval=1, **config)
    run.step()
    return run


# -- pre-flight ---------------------------------------------------------------------


def test_a_folder_that_cannot_be_created_fails_the_probe_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(PreflightError) as info:
        probe(str(tmp_path / "a-file" / "export"), "checkpoint.export.folder")
    message = str(info.value)
    assert "\n" not in message
    assert "checkpoint.export.folder" in message and "Not a directory" in message
    assert "before step 1" in message


def test_a_read_only_checkpoint_folder_fails_before_step_1(small_fs):
    folder = small_fs("1m")
    small_fs.read_only(folder)
    run = Trainable(dim=DIM, folder=os.path.join(folder, "ckpt"))
    with pytest.raises(PreflightError, match="checkpoint.folder .*Read-only file system"):
        run.manager.acquire()


def test_a_read_only_export_folder_fails_the_preflight_not_the_final_export(tmp_path, small_fs):
    export = small_fs("1m")
    config = CheckpointConfig(folder=str(tmp_path / "ckpt"))
    config.export.folder = export
    config.export.format = "dcp"
    manager = CheckpointManager(config, TinyNet())
    manager.acquire()  # takes the lock while the folder is writable ...
    small_fs.read_only(export)  # ... which then turns read-only
    with pytest.raises(PreflightError, match="checkpoint.export.folder .*Read-only file system"):
        manager.preflight()
    manager.close()


def test_too_little_free_space_names_the_folder_and_the_bytes_needed_and_free(small_fs):
    folder = small_fs("1m")
    run = Trainable(dim=DIM, folder=folder)
    run.manager.acquire()
    with pytest.raises(PreflightError) as info:
        run.manager.preflight()
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint.folder {folder!r}" in message
    assert "needs about 2.6 MiB" in message and "is free there" in message  # 1.5 + overhead
    assert "checkpoint.preflight" in message  # the way out
    run.manager.close()


@pytest.mark.parametrize("mode", ["warn", "off"])
def test_the_space_check_can_warn_or_be_off(small_fs, mode, caplog):
    run = Trainable(dim=DIM, folder=small_fs("1m"), preflight=mode)
    with caplog.at_level(logging.WARNING, logger="ckpt_core.policy.preflight"):
        run.manager.acquire()
        run.manager.preflight()
    warned = [r.getMessage() for r in caplog.records if "needs about" in r.getMessage()]
    assert len(warned) == (1 if mode == "warn" else 0)
    run.manager.close()


def test_needs_of_folders_on_one_file_system_add_up(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    half = free // 2 + 1
    check_space([(str(tmp_path / "a"), "checkpoint.folder", half)])  # fits alone
    with pytest.raises(PreflightError, match="checkpoint.folder .* and checkpoint.export.folder"):
        check_space(
            [
                (str(tmp_path / "a"), "checkpoint.folder", half),
                (str(tmp_path / "b"), "checkpoint.export.folder", half),
            ]
        )


# -- saves failing mid-run ------------------------------------------------------------


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_step(small_fs):
    folder = small_fs("4m")
    run = trained(folder)
    run.manager.save(1)
    filler = fill(folder)
    run.step()
    with pytest.raises(SaveError) as info:
        run.manager.save(2)
    message = str(info.value)
    assert "\n" not in message
    assert "saving step 2" in message and "No space left on device (ENOSPC)" in message
    assert "last committed checkpoint (step 1) is intact" in message
    assert info.value.errno == errno.ENOSPC
    assert layout.committed_steps(folder) == [1]
    assert not os.path.exists(os.path.join(folder, ".tmp-step-2"))  # cleaned up
    os.unlink(filler)
    assert manifest.verify(layout.step_dir(folder, 1)) == []
    run.manager.close()


def test_retry_logs_one_warning_and_saves_at_the_next_interval_but_not_at_the_end(small_fs, caplog):
    folder = small_fs("4m")
    run = trained(folder, on_save_error="retry")
    run.manager.save(1)
    filler = fill(folder)
    run.step()
    with caplog.at_level(logging.WARNING, logger="ckpt_core.policy.save_errors"):
        assert run.manager.save(2) is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ENOSPC" in warnings[0] and "Retrying" in warnings[0]
    os.unlink(filler)
    run.step()
    assert run.manager.save(3)
    assert layout.committed_steps(folder) == [1, 3]
    filler = fill(folder)
    run.step()
    with pytest.raises(SaveError, match="does not apply to the last step"):
        run.manager.save(4, last_step=True)
    os.unlink(filler)
    run.manager.close()


def test_a_background_save_failing_surfaces_at_the_next_save(small_fs):
    folder = small_fs("4m")
    run = trained(folder, async_mode="async")
    run.manager.save(1)
    run.manager._wait_for_previous()
    filler = fill(folder)
    run.step()
    assert run.manager.save(2)  # staged; the write fails in the background
    run.step()
    with pytest.raises(SaveError, match="saving step 2 .*ENOSPC"):
        run.manager.save(3)
    os.unlink(filler)
    assert layout.committed_steps(folder) == [1]
    run.manager.close()


def test_a_background_failure_with_retry_lets_the_next_save_go_on(small_fs, caplog):
    folder = small_fs("4m")
    run = trained(folder, async_mode="async", on_save_error="retry")
    run.manager.save(1)
    run.manager._wait_for_previous()
    filler = fill(folder)
    run.step()
    run.manager.save(2)  # fails in the background
    run.manager._async._future.exception()  # wait for it to fail
    os.unlink(filler)
    run.step()
    with caplog.at_level(logging.WARNING, logger="ckpt_core.policy.save_errors"):
        assert run.manager.save(3)  # reports step 2's failure, then saves step 3
    assert [r.getMessage() for r in caplog.records if "saving step 2" in r.getMessage()]
    run.manager.close()
    assert layout.committed_steps(folder) == [1, 3]


def test_a_mount_turning_read_only_mid_run_is_one_line_and_keeps_the_last_step(small_fs):
    folder = small_fs("4m")
    run = trained(folder)
    run.manager.save(1)
    small_fs.read_only(folder)
    run.step()
    try:
        with pytest.raises(SaveError, match="Read-only file system \\(EROFS\\)"):
            run.manager.save(2)
        assert layout.committed_steps(folder) == [1]
        assert manifest.verify(layout.step_dir(folder, 1)) == []
    finally:
        small_fs.read_only(folder, on=False)
        run.manager.close()


FSIZE_CHILD = """
import json, resource, signal, sys
from ckpt_core.errors import SaveError
from tests.core._manager_models import Trainable

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
run = Trainable(dim=256, folder=sys.argv[1], interval=1)
run.step()
run.manager.save(1)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
run.step()
try:
    run.manager.save(2)
    print(json.dumps({"error": None}))
except SaveError as exc:
    print(json.dumps({"error": str(exc), "errno": exc.errno}))
"""


def test_a_file_size_limit_mid_save_is_one_line_without_privileges(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FSIZE_CHILD), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errno"] == errno.EFBIG, result
    assert "File too large (EFBIG)" in result["error"]
    assert "(step 1) is intact" in result["error"]
    assert layout.committed_steps(str(tmp_path)) == [1]
    assert not (tmp_path / ".tmp-step-2").exists()
    assert manifest.verify(layout.step_dir(str(tmp_path), 1)) == []


# -- symbolic links where ckpt writes -------------------------------------------------


def test_a_symlinked_temporary_folder_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    folder = tmp_path / "ckpt"
    run = trained(str(folder))
    run.manager.save(1)
    (folder / ".tmp-step-2").symlink_to(outside, target_is_directory=True)
    run.step()
    with pytest.raises(CheckpointError, match="never deletes through a link") as info:
        run.manager.save(2)
    assert "\n" not in str(info.value)
    assert (outside / "precious.txt").read_text() == "keep me"
    assert layout.committed_steps(str(folder)) == [1]
    run.manager.close()


def test_remove_tree_refuses_a_link_and_a_file_and_deletes_nothing(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "data").write_text("x")
    (tmp_path / "step-3").symlink_to(target, target_is_directory=True)
    (tmp_path / "step-4").write_text("a file")
    with pytest.raises(CheckpointError, match="never deletes through a link"):
        layout.remove_tree(str(tmp_path / "step-3"))
    with pytest.raises(CheckpointError, match="is a file"):
        layout.remove_tree(str(tmp_path / "step-4"))
    assert (target / "data").exists() and (tmp_path / "step-4").exists()


def _save_then_fail_on_two_ranks(rank: int, world_size: int, folder: str) -> str:
    import torch.distributed as dist

    run = Trainable(dim=32, folder=folder, interval=1)
    run.step()
    run.manager.save(1)
    dist.barrier()
    if rank == 0:
        subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
    dist.barrier()
    run.step()
    try:
        run.manager.save(2)
    except SaveError as exc:
        return str(exc)
    finally:
        run.manager.close()
    return "saved"


def test_a_failed_save_on_two_ranks_raises_the_same_line_on_both(small_fs):
    from tests.core._dist import run_on_ranks

    folder = small_fs("4m")
    try:
        messages = run_on_ranks(_save_then_fail_on_two_ranks, 2, folder, timeout=120)
    finally:
        small_fs.read_only(folder, on=False)
    assert messages[0] == messages[1]
    assert all("saving step 2" in m and "EROFS" in m for m in messages), messages
    assert all("(step 1) is intact" in m for m in messages), messages
    assert layout.committed_steps(folder) == [1]
