"""Reading an HF ``config.json`` (a folder's, or a file given directly), bounded and checked.

The same reader serves every model family: the family is chosen from the
config's ``model_type`` (:func:`ckpt_core.content.families.family_for_hf_config`).
"""

from __future__ import annotations

import os
from typing import Any

from ckpt_core.errors import ConfigError, DamagedCheckpointError
from ckpt_core.storage import hf_reader, layout


def read_hf_config(path: str) -> dict[str, Any]:
    """Read ``config.json`` from an HF folder, or a config file given directly.

    A folder's ``config.json`` must be a regular file inside it; the file must
    hold a JSON object of bounded size. Else a one-line :class:`DamagedCheckpointError`.
    """
    file = path if path.endswith(".json") else layout.join(path, "config.json")
    fs, inner = layout.filesystem(file)
    if (fs is None and not os.path.lexists(inner)) or (fs is not None and not fs.exists(inner)):
        raise ConfigError(
            f"{file} does not exist; expected a Hugging Face model folder with config.json."
        )
    if fs is None:
        if not path.endswith(".json"):
            inner = hf_reader.resolve_file(path, "config.json", what=path)
        config = hf_reader.read_json(inner)
    else:
        with fs.open(inner, "rb") as f:
            config = hf_reader.parse_json(f.read(hf_reader.MAX_JSON_BYTES + 1), file)
    if not isinstance(config, dict):
        raise DamagedCheckpointError(
            f"{file}: holds a JSON {type(config).__name__}, not an object; the config is "
            "damaged or was crafted."
        )
    return config


def is_hf_path(path: str) -> bool:
    """Whether ``path`` looks like an HF folder or config file (not a flavor name)."""
    return path.endswith(".json") or os.sep in path or "://" in path or os.path.isdir(path)
