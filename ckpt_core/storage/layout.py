"""Folder layout and the commit protocol shared by checkpoints and exports.

``<folder>/step-<N>/`` is complete or absent. Writers fill
``<folder>/.tmp-step-<N>/`` (the same name on every rank) and one rank renames
it with :func:`commit` after every rank finished. Discovery lists only
committed ``step-<N>`` folders, so leftovers of a crash are never loaded.

Paths are strings, not ``pathlib.Path``: an fsspec URI such as
``memory://run/ckpt`` or ``s3://bucket/run`` would lose its ``//`` in a Path.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ckpt_core.errors import DestinationExistsError

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
_STEP_RE = re.compile(r"^step-(\d+)$")


def is_uri(path: str) -> bool:
    """Whether ``path`` names a non-local fsspec filesystem (``proto://...``)."""
    return "://" in path and not path.startswith("file://")


def join(folder: str, *names: str) -> str:
    """Join path parts with ``/`` for URIs and ``os.path.join`` for local paths."""
    if is_uri(folder):
        return "/".join([folder.rstrip("/"), *names])
    return os.path.join(_local(folder), *names)


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


#: ``checkpoint.storage_options`` by URI prefix (:func:`set_storage_options`). Kept in
#: memory only: never logged, never written into a manifest.
_OPTIONS: dict[str, dict[str, Any]] = {}
#: Protocols whose client caches directory listings: ckpt turns that cache off, since
#: another process (another rank, node or run) adds and removes steps behind it.
_LISTING_CACHE_PROTOCOLS = ("s3", "s3a")


def set_storage_options(prefix: str, options: dict[str, Any] | None) -> None:
    """Pass ``options`` to fsspec for every path under the URI ``prefix`` (None: forget them).

    E.g. ``{"endpoint_url": ..., "profile": ..., "anon": True, "client_kwargs": {...}}``
    for ``s3://``; the longest matching prefix wins. Local paths take no options.
    """
    if not is_uri(prefix):
        return
    key = prefix.rstrip("/")
    if options:
        _OPTIONS[key] = dict(options)
    else:
        _OPTIONS.pop(key, None)


def storage_option_table() -> dict[str, dict[str, Any]]:
    """Every URI prefix with its options (to hand to a spawned worker; never to print)."""
    return {prefix: dict(options) for prefix, options in _OPTIONS.items()}


def storage_options(path: str) -> dict[str, Any]:
    """The fsspec options for ``path``: those set for its longest prefix, else none."""
    best = ""
    for prefix in _OPTIONS:
        if (path == prefix or path.startswith(prefix + "/")) and len(prefix) > len(best):
            best = prefix
    return dict(_OPTIONS.get(best, {}))


def filesystem(path: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for a URI; ``(None, path)`` when local."""
    if not is_uri(path):
        return None, _local(path)
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path, **fsspec_options(path))
    return fs, inner


def fsspec_options(path: str) -> dict[str, Any]:
    """Keyword arguments for fsspec at ``path``: :func:`storage_options`, listing cache off."""
    options = storage_options(path)
    if path.split("://", 1)[0] in _LISTING_CACHE_PROTOCOLS:
        options.setdefault("use_listings_cache", False)
    return options


def step_dir(folder: str, step: int) -> str:
    """``<folder>/step-<step>``."""
    return join(folder, f"{STEP_PREFIX}{step}")


def tmp_step_dir(folder: str, step: int) -> str:
    """``<folder>/.tmp-step-<step>``: where every rank writes before the commit."""
    return join(folder, f"{TMP_PREFIX}{step}")


def listdir(folder: str) -> list[str]:
    """Entry names in ``folder`` (empty when it does not exist)."""
    fs, inner = filesystem(folder)
    if fs is None:
        try:
            return sorted(os.listdir(inner))
        except FileNotFoundError:
            return []
    fs.invalidate_cache(inner)
    if not fs.exists(inner):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(inner, detail=False))


def committed_steps(folder: str) -> list[int]:
    """Committed steps, ascending.

    Local: every ``step-<N>`` folder (a rename made it appear whole). Object store
    (any URI): every ``step-<N>/`` holding a ``manifest.json``, which the save
    writes last; objects of a save cut short are not a committed step.
    """
    if is_uri(folder):
        return [s for s, done in step_prefixes(folder).items() if done]
    steps = []
    for name in listdir(folder):
        m = _STEP_RE.match(name)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def step_prefixes(folder: str) -> dict[int, bool]:
    """Object store: ``{N: has a manifest}`` for every ``step-<N>/`` prefix holding objects.

    One flat listing of ``folder`` (a request per 1000 objects on S3), fresh (no
    cached listing).
    """
    fs, inner = filesystem(folder)
    base = inner.rstrip("/")
    try:
        fs.invalidate_cache(base)
        found = fs.find(base)
    except FileNotFoundError:
        return {}
    out: dict[int, bool] = {}
    for path in found:
        rel = path[len(base) :].lstrip("/").split("/")
        m = _STEP_RE.match(rel[0])
        if m and len(rel) > 1:
            step = int(m.group(1))
            out[step] = out.get(step, False) or rel[1:] == ["manifest.json"]
    return dict(sorted(out.items()))


def is_committed(folder: str, step: int) -> bool:
    """Whether ``step`` is committed in ``folder`` (see :func:`committed_steps`)."""
    path = step_dir(folder, step)
    if not is_uri(folder):
        return exists(path)
    fs, inner = filesystem(join(path, "manifest.json"))
    fs.invalidate_cache(inner.rsplit("/", 1)[0])
    return bool(fs.exists(inner))


def exists(path: str) -> bool:
    """Whether a file or folder exists at ``path``."""
    fs, inner = filesystem(path)
    return os.path.exists(inner) if fs is None else fs.exists(inner)


def open_file(path: str, mode: str) -> Any:
    """Open a file at a local path (built-in ``open``) or an fsspec URI (``fs.open``)."""
    fs, inner = filesystem(path)
    return open(inner, mode) if fs is None else fs.open(inner, mode)


def write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all.

    Local: a temporary name beside it, fsync'd, renamed over ``path``, folder
    fsync'd. An object store's single PUT is all-or-nothing already.
    """
    fs, inner = filesystem(path)
    if fs is not None:
        with fs.open(inner, "wb") as f:
            f.write(data)
        return
    tmp = f"{inner}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, inner)
    fsync_dir(os.path.dirname(inner) or ".")


def makedirs(path: str) -> None:
    """Create ``path`` and its parents if needed."""
    fs, inner = filesystem(path)
    if fs is None:
        os.makedirs(inner, exist_ok=True)
    else:
        fs.makedirs(inner, exist_ok=True)


def refuse_link(path: str, action: str) -> None:
    """Raise :class:`CheckpointError` when the local ``path`` itself is a symbolic link.

    ckpt creates its step and temporary folders itself; a link in their place was
    put there by someone else, and following it would write or delete wherever it
    points. Links *inside* a folder are never followed either (``shutil.rmtree``
    unlinks them).
    """
    fs, inner = filesystem(path)
    if fs is None and os.path.islink(inner):
        from ckpt_core.errors import CheckpointError

        raise CheckpointError(
            f"{inner} is a symbolic link (to {os.readlink(inner)!r}); ckpt never {action} "
            "through a link. Remove the link (and find out who made it), then run again."
        )


def remove_tree(path: str) -> None:
    """Delete a folder and everything in it (missing is fine).

    A local ``path`` that is a symbolic link or not a folder is refused with a
    :class:`~ckpt_core.errors.CheckpointError` (nothing is deleted).
    """
    fs, inner = filesystem(path)
    if fs is None:
        import shutil

        refuse_link(path, "deletes")
        if os.path.exists(inner):
            if not os.path.isdir(inner):
                from ckpt_core.errors import CheckpointError

                raise CheckpointError(
                    f"{inner} is a file where ckpt expects a folder it made; not deleting it. "
                    "Move it away, then run again."
                )
            shutil.rmtree(inner)
    elif fs.exists(inner):
        fs.rm(inner, recursive=True)


def fsync_tree(path: str) -> None:
    """fsync every file under a local folder, then the folders themselves."""
    fs, inner = filesystem(path)
    if fs is not None:
        return  # object stores have no fsync; their writes are durable on close
    for root, _dirs, files in os.walk(inner, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    """fsync a local directory entry (makes renames and creations durable)."""
    try:
        fd = os.open(_local(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str, final: str, *, fsync: bool = True) -> None:
    """Make ``tmp`` visible as ``final`` by rename; refuses to replace ``final``.

    Local folders are fsync'd (files, the folder, then the parent after the
    rename) so a crash never leaves a committed but empty step.
    """
    fs, inner_tmp = filesystem(tmp)
    _, inner_final = filesystem(final)
    if exists(final) or (fs is None and os.path.islink(inner_final)):
        raise DestinationExistsError(
            f"{final} already exists; refusing to overwrite a committed folder. Remove it "
            "first or save under another step."
        )
    if fs is None:
        refuse_link(tmp, "commits")
        if fsync:
            fsync_tree(inner_tmp)
        os.rename(inner_tmp, inner_final)
        if fsync:
            fsync_dir(os.path.dirname(inner_final) or ".")
    else:
        fs.mv(inner_tmp, inner_final, recursive=True)
