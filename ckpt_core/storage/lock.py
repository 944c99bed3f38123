"""One writer per folder: a lock that a second run on the same folder cannot take.

Two jobs saving into one checkpoint folder destroy each other's work (one
deletes the other's ``.tmp-step-N``; the later one skips every step the
earlier one committed). A writer therefore holds a lock on each folder it
writes, from before step 1 until it closes:

* **Local folders** (and NFS, which forwards ``flock`` as a POSIX lock):
  ``<folder>/.ckpt-lock`` locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``. The
  kernel drops the lock when the process dies, even by SIGKILL, so a killed job
  never blocks its restart. The holder writes who it is into the file (host,
  pid, start time, command line) for the refusal message, and deletes the file
  when it releases the lock (after checking that the path still names the
  inode it locked, the standard way to make a deletable lock file race-free).
* **Object stores** (fsspec URIs): ``<folder>/.ckpt-lease.json`` names the
  owner and an expiry; a background thread renews it every ``ttl / 4``
  seconds. Another writer takes it over only after it expired. On S3 (s3fs)
  every write of the lease is conditional, a compare-and-swap: the first take
  is ``PutObject`` with ``If-None-Match: *`` (fails when any lease exists), a
  take-over of an expired lease and every renewal are ``PutObject`` with
  ``If-Match: <ETag read>`` (fails when someone wrote it since). Of two writers
  racing, exactly one wins; the other is refused at once, no waiting. Other
  fsspec stores (and S3-compatible servers that answer ``NotImplemented`` to
  those headers) have no compare-and-swap, so taking a lease there is *write,
  wait, read back*: two writers that both saw no live lease both write, and the
  one whose write landed first sees the other's owner id when it reads back and
  gives up. The remaining window is a store that shows a write to other readers
  later than ``settle_s`` seconds after it returned.

A process holds one lock per folder: managers in one process that write the
same folder share it (it is released when the last of them releases it).
Readers take no lock.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from ckpt_core.errors import FolderLockedError, PreflightError
from ckpt_core.storage import layout, object_errors, object_io

logger = logging.getLogger(__name__)

LOCK_NAME = ".ckpt-lock"
LEASE_NAME = ".ckpt-lease.json"
#: Seconds a lease stays valid without renewal (a killed job's lease blocks this long).
LEASE_TTL_S = 180.0
#: Seconds between writing a lease and reading it back (see the module docstring).
LEASE_SETTLE_S = 1.0

_OWNER_ID = uuid.uuid4().hex  # this process
_registry: dict[str, tuple[Any, int]] = {}  # key -> (held lock, users)
_registry_lock = threading.Lock()


def owner_info() -> dict[str, Any]:
    """Who this process is: recorded in the lock for a refusal message."""
    return {
        "owner": _OWNER_ID,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.time(),
        "command": " ".join(sys.argv)[:300],
    }


def describe_holder(info: dict[str, Any] | None) -> str:
    """``pid 123 on host-a since 2025-01-01 10:00:00 (ckpt train ...)``."""
    if not info:
        return "another process (it has not written its details yet)"
    since = info.get("since")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        if isinstance(since, (int, float))
        else "?"
    )
    text = f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {when}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


class FolderLock:
    """One held lock; :meth:`release` gives it back (idempotent)."""

    def __init__(self, key: str, impl: Any) -> None:
        self.key = key
        self._impl = impl
        self._released = False

    @property
    def path(self) -> str:
        """The lock file or lease object."""
        return self._impl.path

    def check(self) -> None:
        """Raise :class:`FolderLockedError` if the lock was lost (an expired lease taken over)."""
        self._impl.check()

    def release(self) -> None:
        """Give the lock back when no other user in this process holds it."""
        if self._released:
            return
        self._released = True
        with _registry_lock:
            impl, users = _registry.get(self.key, (None, 0))
            if impl is not self._impl:
                return
            if users > 1:
                _registry[self.key] = (impl, users - 1)
                return
            del _registry[self.key]
        self._impl.release()


def acquire(
    folder: str,
    what: str = "folder",
    *,
    ttl: float = LEASE_TTL_S,
    settle_s: float | None = None,
) -> FolderLock:
    """Lock ``folder`` for writing (creating it); :class:`FolderLockedError` if taken.

    ``what`` names the folder in messages (``"checkpoint.folder"``). Object-store
    leases last ``ttl`` seconds and are renewed in the background.
    """
    key = _key(folder)
    with _registry_lock:
        held = _registry.get(key)
        if held is not None:
            _registry[key] = (held[0], held[1] + 1)
            return FolderLock(key, held[0])
        if layout.is_uri(folder):
            impl: Any = _Lease(folder, what, ttl, settle_s)
        else:
            impl = _LocalLock(folder, what)
        impl.acquire()
        _registry[key] = (impl, 1)
        return FolderLock(key, impl)


def acquire_all(folders: list[tuple[str, str]]) -> list[FolderLock]:
    """Lock every ``(what, folder)``; on a refusal, release the ones taken and raise."""
    held: list[FolderLock] = []
    try:
        for what, folder in folders:
            held.append(acquire(folder, what))
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held


def _key(folder: str) -> str:
    if layout.is_uri(folder):
        return folder.rstrip("/")
    return os.path.realpath(layout.filesystem(folder)[1])


def _unwritable(what: str, folder: str, exc: OSError) -> PreflightError:
    reason = exc.strerror or str(exc)
    return PreflightError(
        f"{what} {folder!r} is not writable ({reason}); the run could not lock it. "
        f"Fix its permissions or mount, or point {what} at a writable folder."
    )


class _LocalLock:
    """``flock`` on ``<folder>/.ckpt-lock``."""

    def __init__(self, folder: str, what: str) -> None:
        self.folder = layout.filesystem(folder)[1]
        self.what = what
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise _unwritable(self.what, self.folder, exc) from exc
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json(lambda fd=fd: os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise FolderLockedError(
                    f"{self.what} {self.folder!r} is in use by another run: "
                    f"{describe_holder(holder)}. Wait for it to end or stop it, or give "
                    f"this run another folder (lock file {self.path})."
                ) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                logger.warning(
                    "%s %s: this file system does not support flock (%s); running without "
                    "the one-writer lock, so make sure no other run writes here.",
                    self.what,
                    self.folder,
                    exc.strerror,
                )
            if self._still_named(fd):
                break
            os.close(fd)  # a releasing holder deleted the file under us: lock the new one
        self.fd = fd
        # The held descriptor is read-only (a file open for writing would keep an admin
        # from remounting the file system read-only); the owner goes in through another.
        flags = os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        try:
            out = os.open(self.path, flags)
            try:
                os.write(out, json.dumps(owner_info()).encode())
            finally:
                os.close(out)
        except OSError as exc:
            self.release()
            raise _unwritable(self.what, self.folder, exc) from exc

    def _open(self) -> int:
        flags = os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FolderLockedError(
                    f"{self.what}: the lock file {self.path} is a symbolic link; ckpt never "
                    "writes through a link. Remove it (and find out who made it)."
                ) from None
            raise _unwritable(self.what, self.folder, exc) from exc

    def _still_named(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def check(self) -> None:
        return None

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if self._still_named(fd):
                os.unlink(self.path)  # while still locked: a waiter re-checks the inode
        except OSError as exc:
            logger.debug("could not delete %s: %s", self.path, exc)
        finally:
            os.close(fd)  # drops the flock


class _Lease:
    """An expiring lease object in an fsspec folder, renewed by a daemon thread."""

    def __init__(self, folder: str, what: str, ttl: float, settle_s: float | None) -> None:
        self.folder = folder
        self.what = what
        self.ttl = ttl
        self.path = layout.join(folder, LEASE_NAME)
        self.fs, self.inner = layout.filesystem(self.path)
        if settle_s is None:
            # An in-memory store lives in this process only: no other writer can race.
            settle_s = 0.0 if self.folder.startswith("memory://") else LEASE_SETTLE_S
        self.settle_s = settle_s
        self.record: dict[str, Any] = {}
        #: S3 compare-and-swap (see the module docstring); ``etag`` of our last write.
        self.conditional = object_io.supports_multipart(self.fs)
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        def read() -> bytes:
            return self.fs.cat_file(self.inner)

        try:
            return _read_json(read, missing_ok=True)
        except Exception as exc:
            raise self._storage_error(exc) from exc

    def _storage_error(self, exc: BaseException) -> BaseException:
        """A one-line :class:`PreflightError` for a storage failure; else ``exc`` itself."""
        explained = object_errors.explain(exc, self.folder)
        if explained is not None:
            return PreflightError(f"{self.what}: {explained} The run could not lock it.")
        if isinstance(exc, OSError):
            return _unwritable(self.what, self.folder, exc)
        return exc

    def _current_etag(self) -> str | None:
        try:
            return self.fs.info(self.inner).get("ETag")
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._storage_error(exc) from exc

    def _put_if(self, *, if_match: str | None) -> bool:
        """Write the record only if the lease is still ``if_match`` (None: absent).

        True when written; False when the condition failed (someone else wrote).
        """
        self.record["expires"] = time.time() + self.ttl
        bucket, key, _ = self.fs.split_path(self.inner)
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        body = json.dumps(self.record).encode()
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
        except Exception as exc:
            if object_errors.is_precondition_failure(exc):
                return False
            if "NotImplemented" in str(exc):  # a server without conditional writes
                logger.info("%s: no conditional writes; lease by write-wait-read", self.folder)
                self.conditional = False  # the caller writes the plain way
                return True
            raise self._storage_error(exc) from exc
        self.etag = out.get("ETag")
        return True

    def _refusal(self, holder: dict[str, Any]) -> FolderLockedError:
        expires = holder.get("expires", 0)
        left = max(0, int(expires - time.time()))
        return FolderLockedError(
            f"{self.what} {self.folder!r} is in use by another run: {describe_holder(holder)}; "
            f"its lease expires in {left} s. Wait for it to end or stop it (a dead run's "
            f"lease may be taken over once expired, or delete {self.path}), or give this run "
            "another folder."
        )

    def acquire(self) -> None:
        # The ETag before the content: a write in between makes the conditional put fail.
        etag = self._current_etag() if self.conditional else None
        holder = self._read()
        if holder and holder.get("owner") != _OWNER_ID and holder.get("expires", 0) > time.time():
            raise self._refusal(holder)
        if holder:
            logger.warning(
                "%s %s: taking over an expired lease of %s",
                self.what,
                self.folder,
                describe_holder(holder),
            )
        self.record = owner_info()
        if self.conditional:
            if not self._put_if(if_match=etag):
                raise self._refusal(self._read() or {})
        if not self.conditional:
            self._write()
            if self.settle_s:
                time.sleep(self.settle_s)
            seen = self._read()
            if not seen or seen.get("owner") != _OWNER_ID:
                raise self._refusal(seen or {})
        self._thread = threading.Thread(target=self._renew, name="ckpt-lease", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.record["expires"] = time.time() + self.ttl
        try:
            self.fs.makedirs(layout.filesystem(self.folder)[1], exist_ok=True)
            self.fs.pipe_file(self.inner, json.dumps(self.record).encode())
        except Exception as exc:
            raise self._storage_error(exc) from exc

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4) and self.lost is None:
            try:
                self._renew_once()
            except Exception as exc:  # noqa: BLE001 - retried at the next tick
                logger.warning("%s %s: could not renew the lease (%s)", self.what, self.folder, exc)

    def _renew_once(self) -> None:
        """Extend the lease, or record that another owner has it now."""
        if self.conditional:
            if not self._put_if(if_match=self.etag):
                self.lost = describe_holder(self._read())
                logger.error("%s %s: lease lost to %s", self.what, self.folder, self.lost)
            return
        seen = self._read()
        if not seen or seen.get("owner") != _OWNER_ID:
            self.lost = describe_holder(seen)
            logger.error("%s %s: lease lost to %s", self.what, self.folder, self.lost)
            return
        self._write()

    def check(self) -> None:
        if self.lost is not None:
            raise FolderLockedError(
                f"{self.what} {self.folder!r}: this run's lease expired and was taken over by "
                f"{self.lost}; stopping so that two runs do not write one folder."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            seen = self._read()
            if seen and seen.get("owner") == _OWNER_ID:
                self.fs.rm(self.inner)
        except Exception as exc:  # noqa: BLE001 - it expires on its own
            logger.debug("could not delete %s: %s", self.path, exc)


def _read_json(read: Any, missing_ok: bool = False) -> dict[str, Any] | None:
    """The JSON object ``read()`` returns; None when empty, missing or unreadable."""
    try:
        data = read()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    try:
        value = json.loads(data.decode() if isinstance(data, bytes) else data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def release_all() -> None:
    """Release every lock this process holds (at exit; tests)."""
    with _registry_lock:
        held = [impl for impl, _ in _registry.values()]
        _registry.clear()
    for impl in held:
        try:
            impl.release()
        except Exception as exc:  # noqa: BLE001 - exiting anyway
            logger.debug("could not release %s: %s", impl.path, exc)


def _forget_after_fork() -> None:
    # A forked child shares the parent's flock: it must neither release nor renew it,
    # and it is another owner.
    global _registry_lock, _OWNER_ID
    _registry.clear()
    _registry_lock = threading.Lock()
    _OWNER_ID = uuid.uuid4().hex


atexit.register(release_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
