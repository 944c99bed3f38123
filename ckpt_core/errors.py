"""Exceptions raised by ckpt; each message names the value, the field and the fix.

Each class carries the exit code ``ckpt`` returns for it: 2 for bad input (a
wrong path, option or config, a checkpoint that does not fit the model), 1 for
damaged data (a file whose bytes are truncated, malformed or hostile).
"""

from __future__ import annotations

from collections.abc import Iterable


class CkptError(Exception):
    """Base class of every error ckpt raises on purpose."""

    #: Exit status of the ``ckpt`` command line for this error.
    exit_code = 2


class ConfigError(CkptError, ValueError):
    """A configuration value is invalid; the message names the field."""


class PluginError(CkptError):
    """A plugin (a converter or a model family) is missing, broken or misbehaving."""


class CheckpointError(CkptError):
    """A checkpoint is missing or does not match the model (the user's input is wrong)."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's or HF folder's files are damaged or hostile: truncated, malformed,
    out of bounds, pointing outside their folder, or failing their checksums."""

    exit_code = 1


class FolderLockedError(CkptError):
    """Another run holds the folder this run would write (one writer per folder).

    ``ckpt train`` exits 2: nothing was trained or written.
    """

    exit_code = 2


class PreflightError(CkptError):
    """A folder the run will write is not writable or too small, found before step 1.

    ``ckpt train`` exits 2: nothing was trained or written.
    """

    exit_code = 2


class SaveError(CheckpointError, OSError):
    """Writing a checkpoint or an export failed on the storage (disk full, read-only,
    vanished mount); the last committed step is intact.

    An ``OSError`` too, so callers that caught the storage's own error still do.
    ``ckpt train`` exits 1: the run stopped after training some steps.
    """

    exit_code = 1


def first_of(items: Iterable[object], limit: int = 10, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, then `` ... and K more`` when cut.

    Messages list a few offending names, not hundreds: ``first_of(missing, 3)``
    gives ``"a, b, c ... and 7 more"``.
    """
    items = [str(i) for i in items]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


class NotEnabledError(ConfigError, KeyError):
    """A converter looked up by name (``converters["lora"]``) is not enabled.

    Also a ``KeyError``, as any failed lookup by key is.
    """

    def __str__(self) -> str:  # KeyError's own would quote the message
        return Exception.__str__(self)


class DestinationExistsError(CkptError, FileExistsError):
    """The folder a write would create (an export, a step, ``ckpt convert``'s destination)
    already exists; nothing was overwritten. Also a ``FileExistsError``.

    ``ckpt`` exits 2: the user picks another destination or removes the old one.
    """


class ExportContentError(CheckpointError, TypeError):
    """The export view holds an entry an HF folder cannot store: not a tensor, or a
    dtype safetensors lacks. Also a ``TypeError``."""
