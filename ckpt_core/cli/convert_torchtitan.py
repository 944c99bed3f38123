"""``ckpt convert --from torchtitan`` / ``--to torchtitan``: source, destination, cleanup.

The conversions themselves are :mod:`ckpt_core.torchtitan.convert`'s.
"""

from __future__ import annotations

from ckpt_core.errors import ConfigError
from ckpt_core.torchtitan.convert import from_torchtitan_step, to_torchtitan_step


def convert_cli(
    src: str,
    dst: str,
    target: str,
    *,
    to: str,
    source_format: str,
    model: str | None,
    step: int | None,
    dtype: str | None,
    overwrite: bool,
) -> str:
    """``ckpt convert`` with ``--from/--to torchtitan``; returns the folder read."""
    from ckpt_core.cli import convert_dest
    from ckpt_core.storage import manifest, pins

    if source_format == "torchtitan" and to == "torchtitan":
        raise ConfigError("convert: --from torchtitan --to torchtitan converts nothing.")
    if source_format == "torchtitan":
        from ckpt_core.torchtitan.steps import step_folder

        folder = step_folder(src, step)
    else:
        from ckpt_core.cli.convert_source import resolve_source

        folder, kind = resolve_source(src, step)
        if kind != "dcp":
            raise ConfigError(
                f"convert --to torchtitan: {folder} is an HF folder; torchtitan reads those "
                "itself (checkpoint.initial_load_in_hf). Pass a ckpt DCP step."
            )
    marker = ".metadata" if to == "torchtitan" else manifest.MANIFEST_NAME
    convert_dest.clear(dst, overwrite=overwrite, marker=marker)  # object store: before the write
    with pins.reading(folder):
        try:
            if source_format == "torchtitan":
                from_torchtitan_step(folder, target, to=to, model=model, dtype=dtype)
            else:
                recorded = manifest.read(folder)
                if recorded is None and source_format != "ckpt":
                    from ckpt_core.storage.safe_metadata import read_metadata
                    from ckpt_core.torchtitan.detect import CONVERT, refuse_unrecorded

                    saved = read_metadata(folder).state_dict_metadata
                    refuse_unrecorded(folder, saved, reader=CONVERT)
                to_torchtitan_step(folder, target, recorded=recorded, model=model)
        except BaseException:
            convert_dest.discard(target, overwrite=overwrite, marker=marker)
            raise
    if overwrite:
        convert_dest.replace(target, dst)
    return folder
