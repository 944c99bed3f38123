"""What a checkpoint's model tensors mean beyond their names and shapes: the rotary layout.

Names and shapes cannot tell two layouts of the same weights apart. Rotary
attention is the case that bites: torchtitan (and Meta's original Llama)
keep each head's q/k rows as *interleaved* real/imaginary pairs, while ckpt's
reference models and Hugging Face use *rotate-half*. Loaded into the other
layout, the weights fit every shape check and compute something else.

So the manifest's ``model`` entry records the layout its q/k rows are in
(``"rope_layout": "rotate_half"``), taken from the state-dict adapter's
:attr:`~ckpt_core.protocol.state_dict_adapter.StateDictAdapter.rope_layout`, and every load
compares it with the live model's adapter: a difference is refused, naming
both and the conversion to run. A manifest without the field (written by ckpt
0.1, or with no adapter) means rotate-half: ckpt has never written another.
A DCP folder with no manifest at all records nothing, and is refused by the
readers that cannot tell (see :mod:`ckpt_core.torchtitan.detect`).
"""

from __future__ import annotations

from typing import Any

from ckpt_core.errors import CheckpointError, DamagedCheckpointError

#: The manifest ``model`` field holding the layout.
FIELD = "rope_layout"
ROTATE_HALF = "rotate_half"
INTERLEAVED = "interleaved"
#: What a manifest that records no layout means (ckpt 0.1 wrote rotate-half only).
DEFAULT = ROTATE_HALF


def layout_of(adapter: Any) -> str | None:
    """The rotary layout a state-dict adapter's model computes with (``None``: not declared)."""
    value = getattr(adapter, "rope_layout", None)
    return value if isinstance(value, str) else None


def record(entry: dict[str, Any] | None, adapter: Any) -> dict[str, Any] | None:
    """The manifest ``model`` entry ``entry`` with the adapter's layout added (when it has one)."""
    layout = layout_of(adapter)
    if entry is None or layout is None:
        return entry
    return {**entry, FIELD: layout}


def recorded(entry: Any, *, source: str) -> str:
    """The layout a manifest ``model`` entry records (:data:`DEFAULT` when it records none)."""
    if not isinstance(entry, dict) or FIELD not in entry:
        return DEFAULT
    value = entry[FIELD]
    if not isinstance(value, str):
        raise DamagedCheckpointError(
            f"{source}: manifest field model.{FIELD} is {value!r}, not a string; the manifest "
            "is damaged or was crafted."
        )
    return value


def check(entry: Any, adapter: Any, *, source: str) -> None:
    """Refuse a checkpoint whose recorded layout is not the live model's."""
    saved = recorded(entry, source=source)
    live = layout_of(adapter)
    if saved == (live or DEFAULT):
        return
    raise CheckpointError(
        f"{source} holds q/k weights in the {saved!r} rotary layout (its manifest's "
        f"model.{FIELD}), and this model computes with {live or 'an undeclared layout'!r}: "
        "loaded as they are, the weights would fit every shape and compute something else. "
        "Convert the checkpoint to this model's layout first (for a torchtitan source: "
        "ckpt convert SRC DST --from torchtitan --to dcp)."
    )


#: ``config.json`` fields that change what the weights compute without changing a shape.
MATH_FIELDS = (
    "rope_theta",
    "rope_scaling",
    "rope_parameters",  # transformers 5: theta and scaling in one table
    "rms_norm_eps",
    "hidden_act",
    "tie_word_embeddings",
    "norm_topk_prob",
    "num_experts_per_tok",
)


#: Fields that change shapes: when one differs, the shape check reports the model instead.
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "num_experts",
    "moe_intermediate_size",
)


def check_config(entry: Any, live: Any, *, source: str) -> None:
    """Refuse a checkpoint whose recorded ``config`` differs from the live model's in a
    field that changes the math but no shape (RoPE scaling, norm eps, activation, ...).

    Fields either side does not record are not compared.
    """
    saved = entry.get("config") if isinstance(entry, dict) else None
    now = live.get("config") if isinstance(live, dict) else None
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return
    if any(saved.get(k) != now.get(k) for k in SHAPE_FIELDS):
        return  # another architecture: the shape check names the tensors that differ
    differ = [k for k in MATH_FIELDS if k in saved and k in now and saved[k] != now[k]]
    if differ:
        k = differ[0]
        raise CheckpointError(
            f"{source} was saved by a model whose config.json field {k} is {saved[k]!r}; this "
            f"model has {now[k]!r} (fields that differ: {', '.join(differ)}): the weights would "
            "load and compute something else. Build the model with the checkpoint's config "
            "(its manifest's model.config, e.g. model.name = an HF folder with that "
            "config.json), or start a new checkpoint folder."
        )
