"""torchtitan's names for Llama 3 weights, and telling a torchtitan folder apart.

ckpt (under ``model.``) ← torchtitan 0.3 / torchtitan ≤ 0.2:

* ``tok_embeddings.weight``, ``norm.weight``, and per layer
  ``attention.wo``, ``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``:
  the same names in all three;
* ``layers.N.attention.wq/wk/wv.weight`` (rotate-half) ←
  ``layers.N.attention.qkv_linear.wq/wk/wv.weight`` / ``layers.N.attention.wq/wk/wv.weight``
  (both interleaved); torchtitan 0.3 keeps their optimizer state on one fused
  ``layers.N.attention.qkv_linear.wqkv.weight``;
* ``output.weight`` (absent when tied) ← ``lm_head.weight`` / ``output.weight``.

torchtitan keeps model entries at the top level of its DCP folder (no
``model.`` prefix); ckpt's live under ``model.``. A folder whose keys were
renamed to ckpt's by hand is read the same way (the prefix is accepted), since
its q/k rows are still interleaved.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: What a parameter name becomes: ``(native fqn, role)``; role ``q``/``k``/``v`` for
#: the attention projections, ``qkv`` for torchtitan's fused one (native fqn is then
#: the ``wq`` key of its layer), ``None`` for everything else.
Mapped = tuple[str, str | None]

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_ATTN = re.compile(r"^attention\.(?:qkv_linear\.)?(wq|wk|wv|wqkv)\.(weight|bias)$")
_SAME_IN_LAYER = (
    "attention.wo.",
    "attention_norm.",
    "ffn_norm.",
    "feed_forward.w1.",
    "feed_forward.w2.",
    "feed_forward.w3.",
)
_TOP = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "output.weight": "output.weight",
}


def to_native(name: str) -> Mapped | None:
    """``(native fqn, role)`` of a torchtitan parameter name, or ``None`` if it is not one."""
    name = name.removeprefix("model.")
    if name in _TOP:
        return _TOP[name], None
    m = _LAYER.match(name)
    if m is None:
        return None
    layer, rest = m.groups()
    a = _ATTN.match(rest)
    if a is not None:
        proj, param = a.groups()
        if proj == "wqkv":
            return f"layers.{layer}.attention.wq.{param}", "qkv"
        return f"layers.{layer}.attention.{proj}.{param}", proj[1]
    if rest.startswith(_SAME_IN_LAYER) and rest.endswith((".weight", ".bias")):
        return f"layers.{layer}.{rest}", None
    return None


def attention_key(native: str, proj: str) -> str:
    """The ``wq``/``wk``/``wv`` sibling ``proj`` of a native attention key."""
    return re.sub(r"\.attention\.w[qkv]\.", f".attention.{proj}.", native)


def to_torchtitan(native: str, *, fused: bool = False) -> str:
    """torchtitan 0.3 name of a native key (``fused``: the ``wqkv`` name of ``wq``)."""
    if native == "output.weight":
        return "lm_head.weight"
    m = _LAYER.match(native)
    if m is not None:
        a = re.match(r"^attention\.(wq|wk|wv)\.(weight|bias)$", m.group(2))
        if a is not None:
            proj = "wqkv" if fused else a.group(1)
            return f"layers.{m.group(1)}.attention.qkv_linear.{proj}.{a.group(2)}"
    return native


# -- telling a torchtitan folder apart ------------------------------------------------------

_TORCHTITAN_MARKERS = (
    re.compile(r"(^|\.)qkv_linear\."),
    re.compile(r"^(model\.)?lm_head\.weight$"),
    re.compile(r"^train_state\.ntokens_seen$"),
    re.compile(r"^dataloader\.dp_rank_\d+$"),
)
_UNPREFIXED = re.compile(r"^(tok_embeddings|norm|output|lm_head)\.weight$|^layers\.\d+\.")


def torchtitan_evidence(keys: Iterable[str]) -> str | None:
    """A key showing that a DCP folder was written by torchtitan, or ``None``.

    Markers: torchtitan 0.3's ``qkv_linear`` and ``lm_head`` names (also under a
    ``model.`` prefix added by hand), its train state's ``ntokens_seen``, its
    per-rank dataloader entries, and model weights at the top level of the
    folder, where ckpt always writes them under ``model.``.
    """
    keys = list(keys)
    for pattern in _TORCHTITAN_MARKERS:
        for key in keys:
            if pattern.search(key):
                return key
    for key in keys:
        if _UNPREFIXED.search(key):
            return key
    return None
