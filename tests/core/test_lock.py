"""One writer per folder: real processes hold real locks (``flock``; leases on ``memory://``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ckpt_core import CheckpointConfig
from ckpt_core.errors import FolderLockedError
from ckpt_core.policy.manager import CheckpointManager
from ckpt_core.storage import layout, lock
from tests.core._dist import run_on_ranks
from tests.core._manager_models import TinyNet, Trainable

HOLDER = """
import sys
from ckpt_core.storage import lock
held = {}
for line in sys.stdin:
    command, folder = line.split(maxsplit=1)
    folder = folder.strip()
    if command == "lock":
        held[folder] = lock.acquire(folder, "checkpoint.folder")
    else:
        held.pop(folder).release()
    print("done", flush=True)
"""


class Holder:
    """Another process (``holder-of-the-lock``) that locks and releases folders on request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, "holder-of-the-lock"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def _ask(self, command: str, folder) -> None:
        self.proc.stdin.write(f"{command} {folder}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"

    def lock(self, folder) -> Holder:
        self._ask("lock", folder)
        return self

    def release(self, folder) -> None:
        self._ask("release", folder)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def shared_holder():
    holder = Holder()
    yield holder
    holder.kill()


@pytest.fixture
def holder(shared_holder, tmp_path):
    """``holder(folder)``: the module's holder process, locking ``folder`` for this test."""
    locked = []

    def lock_it(folder) -> Holder:
        locked.append(folder)
        return shared_holder.lock(folder)

    yield lock_it
    for folder in locked:
        shared_holder.release(folder)


def test_a_second_process_is_refused_with_one_line_naming_the_holder(tmp_path, holder):
    proc = holder(tmp_path)
    with pytest.raises(FolderLockedError) as info:
        lock.acquire(str(tmp_path), "checkpoint.folder")
    message = str(info.value)
    assert "\n" not in message
    assert f"pid {proc.pid} on " in message
    assert "holder-of-the-lock" in message  # its command line
    assert "checkpoint.folder" in message and str(tmp_path) in message


def test_a_lock_held_by_a_killed_process_does_not_block_a_restart(tmp_path):
    proc = Holder().lock(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.kill()
    assert (tmp_path / lock.LOCK_NAME).exists()  # left behind by the killed holder ...
    held = lock.acquire(str(tmp_path))  # ... and taken over, since nobody holds it
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    held.release()
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_released_lock_file_is_gone_and_another_process_may_take_it(tmp_path, holder):
    held = lock.acquire(str(tmp_path))
    again = lock.acquire(str(tmp_path))  # a second user in this process shares it
    held.release()
    assert (tmp_path / lock.LOCK_NAME).exists()  # still held for `again`
    again.release()
    assert not (tmp_path / lock.LOCK_NAME).exists()
    holder(tmp_path)  # would fail if this process still held it


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / lock.LOCK_NAME).symlink_to(target)
    with pytest.raises(FolderLockedError, match="symbolic link"):
        lock.acquire(str(folder))
    assert target.read_text() == "keep me"


def test_the_manager_refuses_a_held_folder_before_writing_anything(tmp_path, holder):
    proc = holder(tmp_path)
    run = Trainable(folder=str(tmp_path), interval=1)
    with pytest.raises(FolderLockedError, match=f"pid {proc.pid} "):
        run.manager.acquire()
    run.step()
    with pytest.raises(FolderLockedError):  # a save without acquire() takes it first
        run.manager.save(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.LOCK_NAME]
    run.manager.close()


def test_readers_and_load_only_managers_take_no_lock(tmp_path, holder):
    saved = Trainable(folder=str(tmp_path), interval=1)
    saved.step()
    saved.manager.save(1)
    saved.manager.close()
    holder(tmp_path)
    reader = Trainable(seed=3, folder=str(tmp_path), load_only=True)
    reader.manager.acquire()
    assert reader.manager.load()
    reader.manager.close()


def test_the_export_and_extra_folders_are_locked_and_released_on_close(tmp_path, holder):
    holder(tmp_path / "metrics")
    config = CheckpointConfig(folder=str(tmp_path / "ckpt"))
    config.export.folder = str(tmp_path / "export")
    config.export.format = "dcp"
    manager = CheckpointManager(config, TinyNet())
    with pytest.raises(FolderLockedError, match="metrics.path"):
        manager.acquire(also={"metrics.path": str(tmp_path / "metrics")})
    # The refusal released what it had taken: both folders are free again.
    assert not (tmp_path / "ckpt" / lock.LOCK_NAME).exists()
    manager = CheckpointManager(config, TinyNet())
    manager.acquire()
    assert (tmp_path / "ckpt" / lock.LOCK_NAME).exists()
    assert (tmp_path / "export" / lock.LOCK_NAME).exists()
    manager.close()
    assert not (tmp_path / "ckpt" / lock.LOCK_NAME).exists()
    assert not (tmp_path / "export" / lock.LOCK_NAME).exists()


def _acquire_on_ranks(rank: int, world_size: int, folder: str) -> str:
    torch.manual_seed(0)
    manager = CheckpointManager(CheckpointConfig(folder=folder), TinyNet())
    try:
        manager.acquire()
    except FolderLockedError as exc:
        return str(exc)
    finally:
        manager.close()
    return "acquired"


def test_every_rank_fails_together_with_rank_zeros_message(tmp_path, holder):
    proc = holder(tmp_path)
    messages = run_on_ranks(_acquire_on_ranks, 2, str(tmp_path))
    assert messages[0] == messages[1]
    assert f"pid {proc.pid} " in messages[0]


# -- object stores: a lease object -------------------------------------------------


@pytest.fixture
def bucket():
    folder = "memory://ckpt-lock-tests/run"
    yield folder
    lock.release_all()
    layout.remove_tree("memory://ckpt-lock-tests")


def _write_lease(folder: str, **fields) -> None:
    fs, inner = layout.filesystem(layout.join(folder, lock.LEASE_NAME))
    fs.makedirs(layout.filesystem(folder)[1], exist_ok=True)
    record = {"owner": "someone-else", "host": "node-7", "pid": 4242, "since": time.time()}
    fs.pipe_file(inner, json.dumps({**record, **fields}).encode())


def test_a_live_lease_of_another_owner_is_refused_naming_it(bucket):
    _write_lease(bucket, expires=time.time() + 60)
    with pytest.raises(FolderLockedError) as info:
        lock.acquire(bucket, "checkpoint.folder")
    assert "pid 4242 on node-7" in str(info.value)
    assert "expires in" in str(info.value)


def test_an_expired_lease_is_taken_over_renewed_and_deleted_on_release(bucket):
    _write_lease(bucket, expires=time.time() - 1)
    held = lock.acquire(bucket, ttl=0.4)
    fs, inner = layout.filesystem(held.path)
    first = json.loads(fs.cat_file(inner))
    assert first["pid"] == os.getpid()
    time.sleep(0.5)  # the renewal thread runs every ttl / 4
    assert json.loads(fs.cat_file(inner))["expires"] > first["expires"]
    held.release()
    assert not fs.exists(inner)


def test_a_lease_taken_over_after_expiry_stops_the_next_save(bucket):
    run = Trainable(folder=bucket, interval=1)
    run.manager.acquire()
    _write_lease(bucket, expires=time.time() + 60)  # another run took it (we stalled)
    for held in run.manager._locks:
        held._impl._renew_once()
    run.step()
    with pytest.raises(FolderLockedError, match="taken over by pid 4242"):
        run.manager.save(1)
    assert layout.committed_steps(bucket) == []
