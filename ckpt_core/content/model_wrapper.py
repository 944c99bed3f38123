"""``ModelWrapper``: the ``full``, ``base`` and ``export`` views of a model.

* ``full``: every persistent key of every model part under canonical names
  (no ``_orig_mod.`` from ``torch.compile``, no activation-checkpoint wrapper
  prefixes). Used for resumable checkpoints.
* ``base``: ``full`` without converter-owned keys (``key_filter``).
* ``export``: ``full`` through the converters' ``state_dict_transform`` chain.

Nothing is snapshotted at construction: each call reads the live modules, and
the returned tensors share storage with the parameters and buffers. Tensors that
state-dict hooks build fresh at each call are fresh here too; the async stager
keys its buffers by the entry's path, never by storage, so it copies them anew
at every save. Tensor
subclasses that wrap one plain tensor (Float8 all-gather weights) are unwrapped
to that tensor, which shares the same storage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ckpt_core.dtensor_utils import with_local
from ckpt_core.errors import CheckpointError, first_of
from ckpt_core.protocol.plugin_host import ConverterSet

View = Literal["full", "base", "export"]
VIEWS: tuple[str, ...] = ("full", "base", "export")

# Prefixes that wrappers insert into module names; canonical names drop them.
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def canonical_fqn(fqn: str) -> str:
    """Drop wrapper path components (``_orig_mod.`` and friends) from a key."""
    for prefix in WRAPPER_PREFIXES:
        if prefix in fqn:
            fqn = fqn.replace(prefix, "")
    return fqn


def unwrap_tensor(value: Any) -> Any:
    """Return the plain tensor inside a single-tensor wrapper subclass, else ``value``.

    DTensors keep their placement; their local tensor is unwrapped.
    """
    if not isinstance(value, torch.Tensor):
        return value
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        local = value._local_tensor
        inner = _unwrap_plain(local)
        if inner is local:
            return value
        return with_local(value, inner)
    return _unwrap_plain(value)


def _unwrap_plain(t: torch.Tensor) -> torch.Tensor:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen = 0
    while is_traceable_wrapper_subclass(t) and seen < 4:
        attrs, _ = t.__tensor_flatten__()
        if len(attrs) != 1:
            return t
        inner = getattr(t, attrs[0])
        if inner.shape != t.shape:
            return t
        t, seen = inner, seen + 1
    # The inner tensor of a parameter wrapper is the live parameter's data (with
    # requires_grad); views hand out detached tensors, as a plain module's state_dict does.
    return t.detach() if seen else t


def tensor_shape(value: Any) -> tuple[int, ...] | None:
    """Global shape of a tensor or DTensor; ``None`` for non-tensors."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class ModelWrapper:
    """Views over one model or several model parts (pipeline stages)."""

    #: True when this rank's parts are only some of the model's stages (pipeline
    #: parallel): keys a loaded folder holds beyond them belong to other ranks.
    partial: bool = False

    def __init__(
        self, model: nn.Module | Iterable[nn.Module], converters: ConverterSet | None = None
    ) -> None:
        self.model_parts: list[nn.Module] = [model] if isinstance(model, nn.Module) else list(model)
        if not self.model_parts:
            raise ValueError("ModelWrapper needs at least one model part.")
        self.converters = converters if converters is not None else ConverterSet([])

    # -- views ----------------------------------------------------------------

    def _part_state_dicts(self) -> list[dict[str, tuple[str, Any]]]:
        """Per part: canonical key → (real key, tensor)."""
        out = []
        for part in self.model_parts:
            entries: dict[str, tuple[str, Any]] = {}
            for key, value in part.state_dict().items():
                entries[canonical_fqn(key)] = (key, value)
            out.append(entries)
        return out

    def state_dict(self, view: View = "full") -> dict[str, Any]:
        """The chosen view: ``"full"``, ``"base"`` or ``"export"``."""
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}.")
        full: dict[str, Any] = {}
        for i, entries in enumerate(self._part_state_dicts()):
            for key, (_, value) in entries.items():
                if key in full:
                    raise CheckpointError(
                        f"Key {key!r} appears in two model parts (part {i} and an earlier "
                        "one); pipeline stages must have disjoint keys."
                    )
                full[key] = unwrap_tensor(value)
        if view == "full":
            return full
        if view == "base":
            return {k: v for k, v in full.items() if not self.converters.key_filter(k)}
        return self.converters.state_dict_transform(full)

    def owned_keys(self) -> dict[str, list[str]]:
        """Converter name → the ``full`` keys it owns."""
        owned: dict[str, list[str]] = {}
        for key in self.state_dict("full"):
            name = self.converters.owner(key)
            if name is not None:
                owned.setdefault(name, []).append(key)
        return owned

    # -- loading --------------------------------------------------------------

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Copy ``state_dict`` (``full`` names) into the model parts.

        Returns ``(missing, unexpected)`` key lists. With ``strict``, any missing
        or unexpected key raises a :class:`CheckpointError` that lists them; a
        shape mismatch always raises, naming the key and both shapes.
        """
        parts = self._part_state_dicts()
        known = {k for entries in parts for k in entries}
        unexpected = sorted(k for k in state_dict if k not in known)
        missing = sorted(k for k in known if k not in state_dict)
        if strict and (missing or unexpected):
            raise CheckpointError(_describe_mismatch(missing, unexpected))
        for part, entries in zip(self.model_parts, parts):
            sub = {}
            for key, (real, current) in entries.items():
                if key not in state_dict:
                    continue
                value = state_dict[key]
                want, got = tensor_shape(current), tensor_shape(value)
                if want is not None and got is not None and want != got:
                    raise CheckpointError(
                        f"Shape mismatch for {key!r}: the model has {list(want)}, the "
                        f"checkpoint has {list(got)}. Was it saved from another architecture?"
                    )
                if value is current or (
                    isinstance(value, torch.Tensor)
                    and isinstance(current, torch.Tensor)
                    and _same_storage(value, current)
                ):
                    continue  # already loaded in place (DCP writes into these tensors)
                sub[real] = value
            if sub:
                part.load_state_dict(sub, strict=False)
        return missing, unexpected


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    a = a._local_tensor if isinstance(a, DTensor) else a
    b = b._local_tensor if isinstance(b, DTensor) else b
    a, b = _unwrap_plain(a), _unwrap_plain(b)
    try:
        return (
            a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset()
            and a.shape == b.shape
            and a.dtype == b.dtype
        )
    except (RuntimeError, NotImplementedError):
        return False


def _describe_mismatch(missing: list[str], unexpected: list[str], limit: int = 20) -> str:
    def show(keys: list[str]) -> str:
        return first_of(keys, limit)

    lines = ["The state dict does not match the model."]
    if missing:
        lines.append(f"Missing keys ({len(missing)}): {show(missing)}")
    if unexpected:
        lines.append(f"Unexpected keys ({len(unexpected)}): {show(unexpected)}")
    return "\n".join(lines)
