"""Checks every ``config.json`` gets before a model is built from it, whatever its family.

The size fields that decoder-only configs of transformers share are bounded,
so a damaged or crafted config cannot ask the allocator for an absurd tensor;
a family adds its own checks (:attr:`ckpt_core.content.families.ModelFamily.check_config`).
"""

from __future__ import annotations

from ckpt_core.errors import DamagedCheckpointError

#: Bounds of the size fields of a ``config.json``: ``field -> (required, largest)``.
#: Far beyond any published model, yet small enough that no single one can ask
#: the allocator for an absurd tensor; a folder's weights bound the rest
#: (:func:`ckpt_core.storage.hf_reader.check_fits`).
SIZE_FIELDS = {
    "hidden_size": (True, 1 << 20),
    "intermediate_size": (True, 1 << 22),
    "num_hidden_layers": (True, 1 << 12),
    "num_attention_heads": (True, 1 << 12),
    "num_key_value_heads": (False, 1 << 12),
    "head_dim": (False, 1 << 14),
    "vocab_size": (True, 1 << 24),
    "max_position_embeddings": (False, 1 << 31),
}


def damaged_config(source: str, message: str) -> DamagedCheckpointError:
    """The error for a malformed ``config.json``: ``source`` and ``message`` on one line."""
    return DamagedCheckpointError(f"{source}: {message}; the config is damaged or was crafted.")


def check_sizes(config: object, *, source: str = "config.json", required: bool = True) -> None:
    """Refuse a ``config.json`` dict whose declared sizes are missing, mistyped or absurd.

    Checked before any tensor is built: each of :data:`SIZE_FIELDS` present is
    a positive ``int`` within its bound (the required ones must be present when
    ``required``), the key/value heads divide the attention heads, and without
    ``head_dim`` the attention heads divide ``hidden_size``. Raises
    :class:`DamagedCheckpointError` naming ``source`` and the field.
    """
    if not isinstance(config, dict):
        raise damaged_config(source, f"holds a JSON {type(config).__name__}, not an object")
    for name, (needed, largest) in SIZE_FIELDS.items():
        value = config.get(name)
        if value is None:
            if needed and required:
                raise damaged_config(source, f"lacks {name!r}")
            continue
        if type(value) is not int or not 1 <= value <= largest:
            raise damaged_config(
                source, f"{name} is {value!r}; it must be an integer from 1 to {largest}"
            )
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise damaged_config(
            source, f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})"
        )
    hidden, head_dim = config.get("hidden_size"), config.get("head_dim")
    if heads and hidden and head_dim is None and hidden % heads:
        raise damaged_config(
            source, f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})"
        )
    dim = head_dim or (hidden // heads if heads and hidden else None)
    if dim is not None and dim % 2:
        raise damaged_config(
            source, f"the head dimension {dim} is odd; rotary embeddings need it even"
        )
    for name in ("rms_norm_eps", "rope_theta"):
        value = config.get(name)
        if value is not None and (type(value) not in (int, float) or not 0 < value < float("inf")):
            raise damaged_config(source, f"{name} is {value!r}; it must be a positive number")
