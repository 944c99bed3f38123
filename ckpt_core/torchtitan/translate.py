"""A torchtitan training state ↔ ckpt's, entry by entry (pure functions over flat dicts).

Both sides are DCP folders whose entries are flat, dotted keys; the functions
here take and return such ``{key: value}`` dicts (tensors and plain values),
so the same code serves ``ckpt convert``, an initial load into a live run, and
a subset of keys read one group at a time.

* weights: torchtitan's top-level keys (:mod:`~ckpt_core.torchtitan.keys`),
  q/k interleaved → ``model.<key>``, q/k rotate-half;
* Adam moments and ``step``: ``optimizer.state.<param>.<name>`` (0.3: one fused
  ``wqkv``) → ``optimizer.state.<key>.<name>`` for ``wq``, ``wk``, ``wv``;
* param groups: ``optimizer.param_groups.<param>.<name>``, renamed the same way;
* LR scheduler: torchtitan's ``lr_scheduler.last_epoch`` ↔ PyTorch's whole
  ``LambdaLR`` state (``last_epoch``, ``_step_count``, ...);
* counters: ``train_state.step`` and ``ntokens_seen`` ↔ ``step`` and ``tokens_seen``;
* data position (``dataloader.*``, pickles of either side's own loader): never
  translated; dropped, with the reason.

Moments go through the same row permutation and split as the weights they
belong to, so Adam continues exactly where it stopped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_core.errors import CheckpointError
from ckpt_core.torchtitan import keys
from ckpt_core.torchtitan.tensors import (
    fuse_qkv,
    half_to_interleaved,
    interleaved_to_half,
    split_qkv,
)

_OPTIM = re.compile(r"^(?:optimizer\.)(state|param_groups)\.(.+\.(?:weight|bias))\.(\w+)$")

#: Why data-loader state is never carried over (logged when it is dropped).
DATALOADER_WHY = (
    "its data-loader position is a pickled state of that framework's own loader (per "
    "data-parallel rank), which the other side's data pipeline cannot read; the run "
    "continues its own data stream"
)


@dataclass(frozen=True)
class Heads:
    """What the conversion needs to know of the architecture."""

    n_heads: int
    n_kv_heads: int
    tied: bool

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Heads:
        """From a Llama ``config.json`` dict (``num_attention_heads``, ...)."""
        n_heads = int(config["num_attention_heads"])
        return cls(
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            tied=bool(config.get("tie_word_embeddings") or False),
        )


@dataclass
class Translated:
    """The translated entries, and the source entries left out with the reason."""

    entries: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


# -- torchtitan → ckpt ----------------------------------------------------------------------


def _from_rows(native: str, role: str | None, value: Any, heads: Heads) -> dict[str, Any]:
    """Native entries of one torchtitan tensor (weight or per-parameter optimizer state)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:  # step counters, plain values
        if role == "qkv":  # one copy each: Adam increments its step tensors in place
            return {keys.attention_key(native, p): _copy(value) for p in ("wq", "wk", "wv")}
        return {native: value}
    if role == "q":
        return {native: interleaved_to_half(value, heads.n_heads)}
    if role == "k":
        return {native: interleaved_to_half(value, heads.n_kv_heads)}
    if role == "qkv":
        q, k, v = split_qkv(value, heads.n_heads, heads.n_kv_heads)
        return {
            keys.attention_key(native, "wq"): interleaved_to_half(q, heads.n_heads),
            keys.attention_key(native, "wk"): interleaved_to_half(k, heads.n_kv_heads),
            keys.attention_key(native, "wv"): v,
        }
    return {native: value}


#: torchtitan's train-state fields → ckpt's (both count the same things).
_TRAIN_STATE = {"step": "step", "ntokens_seen": "tokens_seen"}


def _counters(out: Translated, key: str, value: Any, table: dict[str, str], other: str) -> None:
    """A ``train_state.`` entry renamed through ``table``; data-loader entries dropped."""
    head, _, name = key.partition(".")
    if head == "dataloader":
        out.dropped[key] = DATALOADER_WHY
    elif name in table:
        out.entries[f"train_state.{table[name]}"] = int(value)
    else:
        out.dropped[key] = other


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _param(name: str, heads: Heads, source: str) -> keys.Mapped:
    mapped = keys.to_native(name)
    if mapped is None:
        raise CheckpointError(
            f"{source}: entry {name!r} is no torchtitan Llama 3 parameter this converter knows "
            "(tok_embeddings, layers.N.attention.[qkv_linear.]wq/wk/wv/wqkv/wo, feed_forward.w1-3, "
            "attention_norm, ffn_norm, norm, lm_head/output); is it another model family?"
        )
    native, role = mapped
    if heads.tied and native == "output.weight":
        return "tok_embeddings.weight", role  # the one tied parameter, under ckpt's name
    return native, role


def from_torchtitan(entries: Mapping[str, Any], heads: Heads, *, source: str) -> Translated:
    """ckpt entries (``model.``, ``optimizer.``, ``lr_scheduler.``, ``train_state.``) of a
    torchtitan step's ``entries`` (all of them, or a group read at a time)."""
    out = Translated()
    groups: dict[str, dict[str, Any]] = {}
    for key, value in entries.items():
        head = key.split(".", 1)[0]
        if head == "optimizer":
            m = _OPTIM.match(key)
            if m is None:
                raise CheckpointError(
                    f"{source}: optimizer entry {key!r} is not a flat, per-parameter entry "
                    "(optimizer.state.<param>.<name> or optimizer.param_groups.<param>.<name>); "
                    "only such optimizer states (Adam, AdamW, SGD) translate."
                )
            kind, name, field_name = m.groups()
            native, role = _param(name, heads, source)
            for nkey, nvalue in _from_rows(native, role, value, heads).items():
                out.entries[f"optimizer.{kind}.{nkey}.{field_name}"] = nvalue
        elif head == "lr_scheduler":
            groups.setdefault("lr_scheduler", {})[key.split(".", 1)[1]] = value
        elif head in ("train_state", "dataloader"):
            _counters(out, key, value, _TRAIN_STATE, "not a train-state field ckpt knows")
        else:
            mapped = keys.to_native(key)
            if mapped is None:
                out.dropped[key] = "a state ckpt does not know (not translated)"
                continue
            native, role = mapped
            if heads.tied and native == "output.weight":
                continue  # the same tensor as tok_embeddings.weight
            for nkey, nvalue in _from_rows(native, role, value, heads).items():
                out.entries[f"model.{nkey}"] = nvalue
    if "lr_scheduler" in groups:
        out.entries.update(scheduler_from_torchtitan(groups["lr_scheduler"], out.entries))
    return out


def scheduler_from_torchtitan(state: Mapping[str, Any], translated: Mapping[str, Any]) -> dict:
    """A ``LambdaLR`` state for ckpt from torchtitan's ``{"last_epoch": N}``.

    torchtitan saves only the step count (its schedule is recomputed from the
    config); ckpt's trainer keeps PyTorch's whole ``LambdaLR`` state, so the
    rest is derived: ``base_lrs`` and ``_last_lr`` from the translated param
    groups (one value per distinct group, in order). The schedule's shape is
    the continuing run's own.
    """
    epoch = int(state["last_epoch"])
    initial, current = [], []
    seen: set[tuple[Any, Any]] = set()
    for key in sorted(translated):
        m = re.match(r"^optimizer\.param_groups\.(.+)\.initial_lr$", key)
        if m is None:
            continue
        lr = translated.get(f"optimizer.param_groups.{m.group(1)}.lr")
        pair = (translated[key], lr)
        if pair not in seen:
            seen.add(pair)
            initial.append(translated[key])
            current.append(lr)
    return {
        "lr_scheduler.last_epoch": epoch,
        "lr_scheduler._step_count": epoch + 1,
        "lr_scheduler._is_initial": False,
        "lr_scheduler._get_lr_called_within_step": False,
        "lr_scheduler.base_lrs": initial,
        "lr_scheduler._last_lr": current,
        "lr_scheduler.lr_lambdas": [None] * len(initial),
    }


# -- ckpt → torchtitan ----------------------------------------------------------------------


def to_torchtitan(
    entries: Mapping[str, Any], heads: Heads, *, source: str, fused: bool = True
) -> Translated:
    """torchtitan 0.3 entries of a whole ckpt step's ``entries``.

    ``fused``: optimizer state of ``wq``/``wk``/``wv`` goes to torchtitan 0.3's
    fused ``qkv_linear.wqkv`` parameter (its Llama 3 default); the weights are
    always written split, as torchtitan's own state dict hooks save them.
    """
    out = Translated()
    attention: dict[tuple[str, str, str, str], Any] = {}  # (kind, layer, field, proj) -> value
    for key, value in entries.items():
        head, _, rest = key.partition(".")
        if head == "model":
            if keys.to_native(rest) is None:
                raise CheckpointError(
                    f"{source}: model entry {rest!r} is no Llama weight torchtitan has (a "
                    "converter's key?); export the merged model (--to hf) and load that in "
                    "torchtitan with initial_load_in_hf instead."
                )
            out.entries.update(_model_to(rest, value, heads))
        elif head == "optimizer":
            m = _OPTIM.match(key)
            if m is None:
                raise CheckpointError(f"{source}: optimizer entry {key!r} is not per-parameter.")
            kind, native, field_name = m.groups()
            a = re.match(r"^layers\.(\d+)\.attention\.(wq|wk|wv)\.weight$", native)
            if a is not None and fused:
                attention[(kind, a.group(1), field_name, a.group(2))] = value
                continue
            if a is not None and kind == "state":
                value = _to_rows(a.group(2), value, heads)
            out.entries[f"optimizer.{kind}.{keys.to_torchtitan(native)}.{field_name}"] = value
        elif head == "lr_scheduler":
            if rest == "last_epoch":
                out.entries["lr_scheduler.last_epoch"] = int(value)
            else:
                out.dropped[key] = "torchtitan keeps only last_epoch (its schedule is its config's)"
        elif head in ("train_state", "dataloader"):
            reverse = {v: k for k, v in _TRAIN_STATE.items()}
            _counters(out, key, value, reverse, "ckpt's RNG states; torchtitan restores none")
        else:
            out.dropped[key] = "a state torchtitan does not know (not translated)"
    out.entries.update(_fuse_attention(attention, heads, source))
    return out


def _to_rows(proj: str, value: Any, heads: Heads) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if proj == "wq":
        return half_to_interleaved(value, heads.n_heads)
    if proj == "wk":
        return half_to_interleaved(value, heads.n_kv_heads)
    return value


def _model_to(native: str, value: Any, heads: Heads) -> dict[str, Any]:
    a = re.match(r"^layers\.\d+\.attention\.(wq|wk|wv)\.(weight|bias)$", native)
    out = {keys.to_torchtitan(native): _to_rows(a.group(1), value, heads) if a else value}
    if heads.tied and native == "tok_embeddings.weight":
        out["lm_head.weight"] = value  # torchtitan's state dict names the tied weight twice
    return out


def _fuse_attention(attention: dict, heads: Heads, source: str) -> dict[str, Any]:
    """Optimizer entries of ``wq``/``wk``/``wv`` as one fused ``wqkv`` per layer and field."""
    out: dict[str, Any] = {}
    for kind, layer, field_name in sorted({k[:3] for k in attention}):
        parts = {p: attention.get((kind, layer, field_name, p)) for p in ("wq", "wk", "wv")}
        absent = [p for p, v in parts.items() if v is None]
        name = f"layers.{layer}.attention.qkv_linear.wqkv.weight"
        if absent:
            raise CheckpointError(
                f"{source}: optimizer {kind} {field_name!r} of layer {layer} lacks {absent}; "
                "torchtitan keeps one fused wqkv state, so wq, wk and wv must all have one."
            )
        q, k, v = parts["wq"], parts["wk"], parts["wv"]
        if isinstance(q, torch.Tensor) and q.dim() > 0:
            value = fuse_qkv(
                half_to_interleaved(q, heads.n_heads),
                half_to_interleaved(k, heads.n_kv_heads),
                v,
                heads.n_heads,
                heads.n_kv_heads,
            )
        else:
            if not _equal(q, k) or not _equal(q, v):
                raise CheckpointError(
                    f"{source}: optimizer {kind} {field_name!r} of layer {layer} differs between "
                    f"wq ({q!r}), wk ({k!r}) and wv ({v!r}); torchtitan fuses them into one "
                    "parameter, which has one value. Put them in one param group."
                )
            value = q
        out[f"optimizer.{kind}.{name}.{field_name}"] = value
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def native_model_keys(names: list[str], heads: Heads) -> set[str]:
    """The native model keys a torchtitan step's entry names translate to (names only)."""
    out: set[str] = set()
    for name in names:
        if name.split(".", 1)[0] in ("optimizer", "lr_scheduler", "train_state", "dataloader"):
            continue
        mapped = keys.to_native(name)
        if mapped is None:
            continue
        native, role = mapped
        if heads.tied and native == "output.weight":
            continue
        if role == "qkv":
            out.update(keys.attention_key(native, p) for p in ("wq", "wk", "wv"))
        else:
            out.add(native)
    return out
