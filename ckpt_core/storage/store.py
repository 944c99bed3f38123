"""The storage seam: one object per checkpoint folder that does all of a step's I/O.

:func:`store_for` picks the store from the folder string:

* :class:`LocalStore` (a local path or ``file://``): every rank writes into
  ``.tmp-step-<N>/``; rank 0 writes the manifest (and signature) there, fsyncs the
  files and the folder, and renames it to ``step-<N>``. A rename is atomic, so a
  step is there whole or not at all.
* :class:`ObjectStore` (any other fsspec URI: ``s3://``, ``memory://``, ...): there
  is no rename (s3fs's "move" copies object by object), so every rank writes
  straight into ``step-<N>/`` (parallel multipart uploads on S3,
  :mod:`ckpt_core.storage.object_io`) and rank 0 writes ``manifest.json`` *last*,
  after every rank finished; the signature, when signing is on, goes before it.
  ``step-<N>/`` without a manifest is a save cut short: never loaded, never counted,
  removed by the next save of that step or by retention.

The manager, retention and the load policy take their writer, reader, commit,
discovery and removal from here, so a new backend changes only ``storage/``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ckpt_core.errors import DestinationExistsError
from ckpt_core.storage import layout, manifest, object_errors

logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r"^\.tmp-step-(\d+)$")
DELETING_PREFIX = ".deleting-step-"
_DELETING_RE = re.compile(r"^\.deleting-step-(\d+)$")


@contextmanager
def _os_errors() -> Iterator[None]:
    """Raise an object-store client failure (botocore, aiohttp) as an ``OSError``."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        converted = object_errors.as_os_error(exc)
        if converted is None:
            raise
        raise converted from exc


class LocalStore:
    """A folder on a POSIX file system: temporary folder, fsync, rename."""

    #: Whether a step's files are written in place (no temporary folder, no rename).
    in_place = False

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder!r})"

    # -- where a step's files go ------------------------------------------------

    def step_dir(self, step: int) -> str:
        """``<folder>/step-<N>``: the committed step."""
        return layout.step_dir(self.folder, step)

    def staging_dir(self, step: int) -> str:
        """Where every rank writes ``step`` before the commit."""
        return layout.tmp_step_dir(self.folder, step)

    def writer(self, path: str, **kwargs: Any) -> Any:
        """A DCP storage writer for ``path`` that records each file's size and CRC-32."""
        from ckpt_core.storage.dcp_io import storage_writer

        return storage_writer(path, **kwargs)

    def reader(self, path: str, metadata: Any = None) -> Any:
        """A DCP storage reader for ``path`` that reads only checked data."""
        from ckpt_core.storage.dcp_io import storage_reader

        return storage_reader(path, metadata)

    # -- the commit ---------------------------------------------------------------

    def is_committed(self, step: int) -> bool:
        """Whether ``step`` is committed (and so never written again)."""
        return layout.is_committed(self.folder, step)

    def committed_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return layout.committed_steps(self.folder)

    def prepare(self, step: int) -> str:
        """Rank 0, before any rank writes: an empty staging place for ``step``; returns it.

        What an earlier attempt at ``step`` left there is removed.
        """
        with _os_errors():
            return self._prepare(step)

    def _prepare(self, step: int) -> str:
        staging = self.staging_dir(step)
        layout.makedirs(self.folder)
        layout.remove_tree(staging)
        layout.makedirs(staging)
        return staging

    def commit(
        self,
        step: int,
        records: Mapping[str, tuple[int, str]],
        build_manifest: Callable[[dict[str, Any]], dict[str, Any]],
        sign_key: Any = None,
    ) -> str:
        """Rank 0, after every rank wrote: manifest (+ signature), then make it visible.

        ``records``: name -> (size, checksum) computed while writing;
        ``build_manifest(files)`` returns the manifest for the ``files`` table.
        Returns the committed folder.
        """
        with _os_errors():
            return self._commit(step, dict(records), build_manifest, sign_key)

    def _commit(
        self, step: int, records: dict[str, Any], build_manifest: Callable[..., Any], sign_key: Any
    ) -> str:
        staging, final = self.staging_dir(step), self.step_dir(step)
        files = manifest.file_entries(staging, records)
        commit_folder(staging, final, build_manifest(files), sign_key)
        return final

    def abandon(self, step: int) -> None:
        """Remove what a failed save of ``step`` wrote (best effort; never a committed step)."""
        try:
            layout.remove_tree(self.staging_dir(step))
        except Exception as exc:  # noqa: BLE001 - the next save at this step removes it too
            logger.debug("could not remove %s after a failed save: %s", self.staging_dir(step), exc)

    # -- retention ----------------------------------------------------------------

    def leftovers(self, in_flight: Iterable[int] = ()) -> list[str]:
        """Paths a crash left behind that retention may delete now.

        Staging folders older than the newest committed step and not in flight, and
        half-deleted steps.
        """
        flying = {int(s) for s in in_flight}
        newest = max(self.committed_steps(), default=-1)
        out = []
        for name in layout.listdir(self.folder):
            m = _TMP_RE.match(name)
            if (m and int(m.group(1)) < newest and int(m.group(1)) not in flying) or (
                _DELETING_RE.match(name)
            ):
                out.append(layout.join(self.folder, name))
        return out

    def remove_leftover(self, path: str) -> None:
        """Delete one path :meth:`leftovers` named."""
        layout.remove_tree(path)

    def remove_step(self, step: int) -> None:
        """Delete committed ``step`` so that a cut-short delete never looks committed.

        Local: renamed to ``.deleting-step-<N>`` (fsync'd), then deleted.
        """
        import os

        path = self.step_dir(step)
        trash = layout.join(self.folder, f"{DELETING_PREFIX}{step}")
        if layout.exists(trash):
            layout.remove_tree(trash)
        os.rename(layout.filesystem(path)[1], layout.filesystem(trash)[1])
        layout.fsync_dir(layout.filesystem(self.folder)[1])
        layout.remove_tree(trash)


class ObjectStore(LocalStore):
    """An object store (any fsspec URI but ``file://``): in place, manifest last."""

    in_place = True

    def staging_dir(self, step: int) -> str:
        return self.step_dir(step)

    def _prepare(self, step: int) -> str:
        """Remove an abandoned partial ``step-<N>/`` (no manifest); a committed one is refused."""
        path = self.step_dir(step)
        if self.is_committed(step):
            raise DestinationExistsError(
                f"{path} is already committed; refusing to overwrite it. Remove it first or "
                "save under another step."
            )
        if layout.exists(path):
            logger.info("Removing %s: objects of an earlier save that never committed", path)
            layout.remove_tree(path)
        return path

    def _commit(
        self, step: int, records: dict[str, Any], build_manifest: Callable[..., Any], sign_key: Any
    ) -> str:
        """Signature (when signing), then the manifest: one PUT that commits the step."""
        path = self.step_dir(step)
        files = manifest.file_entries(path, records)
        stale = sorted(set(files) - set(records)) if records else []
        if stale:  # not written by this save (prepare removes them): never listed
            logger.warning(
                "%s: %d object(s) not written by this save, not listed: %s",
                path,
                len(stale),
                ", ".join(stale[:5]),
            )
            files = {k: v for k, v in files.items() if k in records}
        commit_folder(path, path, build_manifest(files), sign_key)
        return path

    def abandon(self, step: int) -> None:
        try:
            if not self.is_committed(step):
                layout.remove_tree(self.step_dir(step))
        except Exception as exc:  # noqa: BLE001 - retention or the next save removes it
            logger.debug("could not remove %s after a failed save: %s", self.step_dir(step), exc)

    def leftovers(self, in_flight: Iterable[int] = ()) -> list[str]:
        """Partial ``step-<N>/`` prefixes (no manifest) older than the newest committed step
        and not in flight, staging folders of older versions, and unfinished multipart
        uploads of files directly in such a ``step-<N>/`` (named ``upload:<key>:<id>``;
        uploads elsewhere under the folder, e.g. an export being written, are left alone)."""
        flying = {int(s) for s in in_flight}
        prefixes = layout.step_prefixes(self.folder)
        newest = max((s for s, done in prefixes.items() if done), default=-1)
        out = [
            self.step_dir(s)
            for s, done in prefixes.items()
            if not done and s < newest and s not in flying
        ]
        out += super().leftovers(in_flight)
        from ckpt_core.storage import object_io

        base = layout.filesystem(self.folder)[1].rstrip("/")
        bucket_prefix = base.split("/", 1)[1] if "/" in base else ""
        for key, upload_id in object_io.abandoned_uploads(self.folder):
            rel = key[len(bucket_prefix) :].lstrip("/").split("/")
            m = re.match(r"^step-(\d+)$", rel[0]) if len(rel) == 2 else None
            if m is None or int(m.group(1)) >= newest or int(m.group(1)) in flying:
                continue  # not a step's data file (an export's?), or a save in progress owns it
            out.append(f"upload:{key}:{upload_id}")
        return out

    def remove_leftover(self, path: str) -> None:
        if path.startswith("upload:"):
            from ckpt_core.storage import object_io

            _, key, upload_id = path.split(":", 2)
            object_io.abort_upload(self.folder, key, upload_id)
            return
        layout.remove_tree(path)

    def remove_step(self, step: int) -> None:
        """Manifest first (the step stops being committed), then the rest."""
        path = self.step_dir(step)
        fs, inner = layout.filesystem(layout.join(path, manifest.MANIFEST_NAME))
        if fs.exists(inner):
            fs.rm(inner)
        layout.remove_tree(path)


def store_for(folder: str) -> LocalStore:
    """The store for ``folder``: :class:`ObjectStore` for a URI, else :class:`LocalStore`."""
    return ObjectStore(folder) if layout.is_uri(folder) else LocalStore(folder)


def use_storage_options(options: Mapping[str, Any] | None, *paths: str) -> None:
    """Pass ``options`` (``checkpoint.storage_options``) to fsspec for every URI in ``paths``."""
    for path in paths:
        if path and layout.is_uri(path):
            layout.set_storage_options(path, dict(options or {}))


# -- folders committed as a unit (exports, converted checkpoints) -----------------------


def sibling_tmp(final: str) -> str:
    """The temporary folder beside ``final`` (``.tmp-step-N`` for ``step-N``)."""
    final = final.rstrip("/")
    if layout.is_uri(final):
        parent, _, name = final.rpartition("/")
    else:
        import os

        parent, name = os.path.dirname(final), os.path.basename(final)
    if name.startswith(layout.STEP_PREFIX) and name[len(layout.STEP_PREFIX) :].isdigit():
        return layout.tmp_step_dir(parent or ".", int(name[len(layout.STEP_PREFIX) :]))
    return layout.join(parent or ".", f".tmp-{name}")


def staging_for(final: str) -> str:
    """Where a folder committed as a unit is written: beside it locally, in place on an
    object store (see the module docstring)."""
    return final if layout.is_uri(final) else sibling_tmp(final)


def folder_committed(final: str, marker: str = manifest.MANIFEST_NAME) -> bool:
    """Whether ``final`` is a committed folder: there (local) or holding ``marker``, the
    object written last (object store; objects without it are a write cut short)."""
    if not layout.is_uri(final):
        return layout.exists(final)
    return layout.exists(layout.join(final, marker))


def begin_folder(final: str, *, what: str, marker: str = manifest.MANIFEST_NAME) -> str:
    """Rank 0, before writing a folder committed as a unit: its staging place, emptied.

    A committed ``final`` is refused (:class:`DestinationExistsError` naming ``what``);
    what a write cut short left (a local temporary folder, or objects without ``marker``
    in place on an object store) is removed first.
    """
    with _os_errors():
        if folder_committed(final, marker):
            raise DestinationExistsError(
                f"{final} already exists; refusing to overwrite {what}. Remove it or "
                "choose another destination."
            )
        staging = staging_for(final)
        if layout.exists(staging):
            logger.info("Removing %s: what an earlier write that never committed left", staging)
            layout.remove_tree(staging)
        layout.makedirs(staging)
        return staging


def uncommit_folder(final: str, marker: str = manifest.MANIFEST_NAME) -> None:
    """Delete the object-store folder ``final``: ``marker`` first, so that a delete cut
    short never leaves a folder that looks committed, then every other object."""
    with _os_errors():
        fs, inner = layout.filesystem(layout.join(final, marker))
        if fs is not None and fs.exists(inner):
            fs.rm(inner)
        if layout.exists(final):
            layout.remove_tree(final)


def commit_folder(staging: str, final: str, data: Mapping[str, Any], sign_key: Any = None) -> None:
    """Commit a folder written at :func:`staging_for`: manifest ``data`` and signature,
    then the rename (local), or in place (``staging == final``, object store): the
    signature first, then the manifest, one PUT, whole or absent, that commits it. Either
    way a committed folder is never unsigned."""
    with _os_errors():
        encoded = manifest.encode(data)
        if staging == final:  # in place: the manifest commits, so it goes last
            if sign_key is not None:
                from ckpt_core.storage import signing

                signing.sign_folder(final, sign_key, manifest_bytes=encoded)
            manifest.write_bytes(final, encoded)
            return
        manifest.write_bytes(staging, encoded)
        if sign_key is not None:
            from ckpt_core.storage import signing

            signing.sign_folder(staging, sign_key)
        layout.commit(staging, final)
