"""The destination of ``ckpt convert``: checked before reading, replaced only on success.

* :func:`prepare`: refuses a DST that is a file, an existing DST without
  ``--overwrite``, and (with it) a ``<dst>.ckpt-convert-new`` or
  ``<dst>.ckpt-convert-old`` that is already there (another convert may be
  writing it, or a crashed one left the previous DST in it); returns the folder
  to write.
* :func:`replace`: with ``--overwrite``, swaps the written folder in by two
  renames, so the previous DST is whole until the new one is complete.
* :func:`discard`: after a failed write (disk full, read-only mount), removes
  what this convert wrote and nothing else.

On an object store (any fsspec URI) there is no rename: DST is written in place and
is complete once its marker (``manifest.json``, or ``.metadata`` for a torchtitan
step), written last, is there (:func:`ckpt_core.storage.store.begin_folder`). Objects
without the marker are a convert cut short: not an existing DST, removed by the next
convert. ``--overwrite`` deletes the previous DST (marker first) just before writing.
"""

from __future__ import annotations

import logging
import os

from ckpt_core.errors import CheckpointError
from ckpt_core.storage import layout, store
from ckpt_core.storage.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

NEW_SUFFIX = ".ckpt-convert-new"
OLD_SUFFIX = ".ckpt-convert-old"


def _sibling(dst: str, suffix: str) -> str:
    return dst.rstrip("/") + suffix


def prepare(dst: str, *, overwrite: bool, marker: str = MANIFEST_NAME) -> str:
    """The folder to write for DST (DST itself, or its ``.ckpt-convert-new`` sibling)."""
    fs, inner = layout.filesystem(dst)
    if fs is not None:  # in place; committed once ``marker`` is there
        if not overwrite and store.folder_committed(dst, marker):
            raise CheckpointError(f"convert: {dst} already exists; pass --overwrite to replace it.")
        return dst
    if fs is None and os.path.lexists(inner) and not os.path.isdir(inner):
        raise CheckpointError(
            f"convert: DST {dst} is a file, and convert writes a folder there; remove the "
            "file or choose another DST (--overwrite replaces folders only)."
        )
    if not overwrite:
        if layout.exists(dst):
            raise CheckpointError(f"convert: {dst} already exists; pass --overwrite to replace it.")
        return dst
    for suffix, why in (
        (NEW_SUFFIX, "another convert to the same DST may be writing it right now"),
        (OLD_SUFFIX, "a convert stopped while swapping it in may have left the previous DST there"),
    ):
        sibling = _sibling(dst, suffix)
        if layout.exists(sibling):
            raise CheckpointError(
                f"convert: {sibling} already exists ({why}); check it and remove it, then run "
                "the convert again."
            )
    return _sibling(dst, NEW_SUFFIX)


def clear(dst: str, *, overwrite: bool, marker: str = MANIFEST_NAME) -> None:
    """Object store with ``overwrite``: delete the previous DST (marker first) before the
    write in place; nothing otherwise (locally :func:`replace` swaps it at the end)."""
    if overwrite and layout.is_uri(dst):
        store.uncommit_folder(dst, marker)


def replace(target: str, dst: str) -> None:
    """Put the finished ``target`` in place of ``dst``; the previous DST goes only at the end."""
    if target == dst:  # written in place (object store)
        return
    _, inner_dst = layout.filesystem(dst)
    _, inner_target = layout.filesystem(target)
    old = _sibling(inner_dst, OLD_SUFFIX)
    had_dst = os.path.lexists(inner_dst)
    if had_dst:
        os.rename(inner_dst, old)
    try:
        os.rename(inner_target, inner_dst)
    except OSError:
        if had_dst:
            os.rename(old, inner_dst)
        raise
    layout.fsync_dir(os.path.dirname(os.path.abspath(inner_dst)))
    if had_dst:
        layout.remove_tree(old)


def discard(target: str, *, overwrite: bool, marker: str = MANIFEST_NAME) -> None:
    """Remove what a failed write to ``target`` left: its temporary folder, and with
    ``overwrite`` the ``.ckpt-convert-new`` folder itself (checked absent before); on an
    object store the objects written in place, unless the marker committed them."""
    if layout.is_uri(target):
        try:
            paths = () if store.folder_committed(target, marker) else (target,)
        except OSError as exc:  # the store is unreachable: the next convert removes them
            logger.warning("convert: could not remove %s after the failed write: %s", target, exc)
            return
    elif overwrite:
        paths = (store.sibling_tmp(target), target)
    else:
        paths = (store.sibling_tmp(target),)
    for path in paths:
        try:
            layout.remove_tree(path)
        except OSError as exc:  # the error that stopped the write is the one to report
            logger.warning("convert: could not remove %s after the failed write: %s", path, exc)
