"""Where a streamed ``ckpt convert`` reads each tensor group from.

A source fills native-named containers for some keys of the model:

* :class:`DcpSource`: a DCP checkpoint or export; a partial read of just those
  keys (``safe_load`` of a state dict holding only them: checked metadata,
  checked items, tensors read straight into the containers);
* :class:`HfSource`: an HF safetensors folder; the keys' HF names come from
  the model adapter's ``to_hf`` (containers included: an MoE adapter hands out
  one view per expert), the slices are read into them, and ``from_hf`` maps
  them back (stacking experts again).

:class:`Sources` routes each key to the source that holds it (an owned-only
LoRA checkpoint reads its base from the folder its manifest names) and checks,
before anything is read, that every key is there with the shape the model
has: a config that does not fit its weights is one line naming the first
mismatched keys with both shapes. :class:`Arena` is the one reused buffer the
containers of a group are carved from, so reading a group touches memory that
is already mapped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ckpt_core.errors import CheckpointError, first_of
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter

logger = logging.getLogger(__name__)

_ALIGN = 64


def _nbytes(value: torch.Tensor) -> int:
    return value.numel() * value.element_size()


class Arena:
    """One byte buffer, grown to the largest group and reused for every group."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    @staticmethod
    def size_of(specs: Iterable[torch.Tensor]) -> int:
        """Bytes the containers of ``specs`` take in the arena."""
        return sum(-(-_nbytes(t) // _ALIGN) * _ALIGN for t in specs)

    def reserve(self, nbytes: int) -> None:
        """Make room for ``nbytes`` (the largest group, known from the plan)."""
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None  # free the old one first
            self._buf = torch.empty(max(nbytes, _ALIGN), dtype=torch.uint8)

    def containers(self, specs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Uninitialized tensors shaped like ``specs`` (meta tensors), carved from the buffer.

        Valid until the next call: the caller is done with a group before the next.
        """
        self.reserve(self.size_of(specs.values()))
        out, offset = {}, 0
        for key, spec in specs.items():
            n = _nbytes(spec)
            raw = self._buf[offset : offset + n]
            out[key] = raw.view(spec.dtype).view(spec.shape)
            offset += -(-n // _ALIGN) * _ALIGN
        return out


class DcpSource:
    """Model keys of a DCP folder (``model.<key>`` entries)."""

    def __init__(self, folder: str) -> None:
        from ckpt_core.storage.safe_metadata import read_metadata

        self.folder = folder
        self.metadata = read_metadata(folder)

    def _entry(self, key: str) -> Any:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        entry = self.metadata.state_dict_metadata.get(f"model.{key}")
        return entry if isinstance(entry, TensorStorageMetadata) else None

    def has(self, key: str) -> bool:
        return f"model.{key}" in self.metadata.state_dict_metadata

    def stored(self, specs: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``key → (stored shape, stored dtype)`` of the tensor entries among ``specs``' keys."""
        out = {}
        for key in specs:
            entry = self._entry(key)
            if entry is not None:
                out[key] = (tuple(entry.size), entry.properties.dtype)
        return out

    def read(self, containers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fill ``containers`` from the checkpoint (a partial DCP read of their keys)."""
        from ckpt_core.policy.exporter import single_process_quiet
        from ckpt_core.storage.safe_metadata import safe_load

        if containers:
            with single_process_quiet():
                safe_load({"model": containers}, self.folder, metadata=self.metadata)
        return containers


class HfSource:
    """Model keys of an HF safetensors folder, named through the model adapter."""

    def __init__(self, folder: str, adapter: StateDictAdapter, *, quantized: bool) -> None:
        from ckpt_core.storage.hf_reader import index_folder

        self.folder = folder
        self.adapter = adapter
        self.quantized = quantized
        self.files = index_folder(folder)

    def names(self, specs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """HF name → container (or meta tensor) for native ``specs``."""
        return dict(self.adapter.to_hf(dict(specs)))

    def stored(self, specs: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``HF name → (stored shape, safetensors dtype)`` for the names of ``specs``."""
        from ckpt_core.storage.hf_reader import open_safetensors

        wanted = self.names(specs)
        by_file: dict[str, list[str]] = {}
        for name in wanted:
            if name in self.files:
                by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, names in by_file.items():
            with open_safetensors(file) as handle:
                held = set(handle.keys())
                for name in names:
                    if name in held:
                        info = handle.get_slice(name)
                        out[name] = (tuple(info.get_shape()), info.get_dtype())
        return out

    def read(self, containers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Native key → tensor: the containers' HF slices read, mapped back by ``from_hf``."""
        from ckpt_core.storage.hf_reader import read_into

        if not containers:
            return {}
        hf = self.names(containers)
        read_into(
            hf,
            self.folder,
            quantized=self.quantized,
            strict=True,
            files=self.files,
            report_unexpected=False,
        )
        return dict(self.adapter.from_hf(hf))


class Sources:
    """Routes model keys to the sources that hold them and reads a group at a time.

    ``primary`` holds the checkpoint's keys; ``base`` (an owned-only
    checkpoint's recorded base) the keys no converter owns that ``primary``
    lacks. ``tied`` maps a tied target to its source key: only the source is
    read, the target is the same tensor.
    """

    def __init__(
        self,
        primary: DcpSource | HfSource,
        *,
        base: DcpSource | HfSource | None = None,
        owned: Callable[[str], bool] = lambda key: False,
        tied: Mapping[str, str] | None = None,
    ) -> None:
        self.primary, self.base, self.owned = primary, base, owned
        self.tied = dict(tied or {})
        self.arena = Arena()

    def _routes(self, keys: Iterable[str]) -> list[tuple[DcpSource | HfSource, list[str]]]:
        """``(source, keys)`` in reading order; a later source overrides an earlier one.

        As a resume does: the base gives every key no converter owns that it
        holds, then the checkpoint every key it holds.
        """
        keys = list(keys)
        if isinstance(self.primary, HfSource):
            return [(self.primary, [k for k in keys if not self.owned(k)])]
        routes: list[tuple[DcpSource | HfSource, list[str]]] = []
        base = self.base
        if base is not None:
            from_base = [
                k for k in keys if not self.owned(k) and (isinstance(base, HfSource) or base.has(k))
            ]
            routes.append((base, from_base))
        routes.append((self.primary, [k for k in keys if self.primary.has(k)]))
        return routes

    def read_keys(self, keys: Iterable[str]) -> list[str]:
        """The keys a group read actually reads (tied targets come from their source)."""
        keys = list(keys)
        return [k for k in keys if not (k in self.tied and self.tied[k] in keys)]

    def read(
        self, specs: Mapping[str, torch.Tensor], arena: Arena | None = None
    ) -> tuple[dict[str, torch.Tensor], int]:
        """``(native key → tensor, bytes read)`` for the group ``specs`` (meta tensors).

        The containers are carved from ``arena`` (default: the sources' own).

        A converter-owned key no source holds (an HF source carries no LoRA
        factors) is left out when its spec has no data, or kept as the model
        built it (a converter's buffer made at convert time).
        """
        wanted = self.read_keys(specs)
        routes = self._routes(wanted)
        routed = {k for _, keys in routes for k in keys}
        arena = arena if arena is not None else self.arena
        containers = arena.containers({k: specs[k] for k in wanted if k in routed})
        nbytes = 0
        values: dict[str, torch.Tensor] = {
            k: specs[k] for k in wanted if k not in routed and specs[k].device.type != "meta"
        }
        for source, keys in routes:
            values.update(source.read({k: containers[k] for k in keys}))
            nbytes += sum(_nbytes(containers[k]) for k in keys)
        for target, source_key in self.tied.items():
            if target in specs and source_key in values:
                values[target] = values[source_key]
        return {k: values[k] for k in specs if k in values}, nbytes

    # -- checks before reading --------------------------------------------------------

    def check(self, full: Mapping[str, torch.Tensor], what: str, folder: str) -> None:
        """Every key is held, with the model's shape; else one line naming keys and shapes.

        ``what`` names where the architecture came from (``config.json``, the
        manifest's ``model`` entry, ``--model``).
        """
        needed = self.read_keys(full)
        routes = self._routes(needed)
        routed = {k for _, keys in routes for k in keys}
        missing = sorted(k for k in needed if k not in routed and not self.owned(k))
        if missing and not isinstance(self.primary, HfSource):
            where = folder if self.base is None else f"{folder} and its base {self.base.folder}"
            raise CheckpointError(
                f"convert: {where} lacks {len(missing)} model tensors: {missing[:5]}. Is it a "
                "checkpoint of this architecture, written with these converters (--converters)?"
            )
        for source, keys in routes:
            if keys:
                _check_source(source, {k: full[k] for k in keys}, what)


def _check_source(
    source: DcpSource | HfSource, specs: Mapping[str, torch.Tensor], what: str
) -> None:
    """Refuse a source whose tensors are missing or shaped otherwise than ``specs``."""
    stored = source.stored(specs)
    if isinstance(source, HfSource):
        expected = {name: tuple(t.shape) for name, t in source.names(specs).items()}
        missing = sorted(n for n in expected if n not in source.files)
        if missing:
            raise CheckpointError(
                f"{source.folder} lacks {len(missing)} tensors the model needs: "
                f"{first_of(missing)}. Is it a checkpoint of this architecture?"
            )
    else:
        expected = {k: tuple(t.shape) for k, t in specs.items()}
        _check_float8(source, specs, stored)
    mismatched = [n for n in expected if n in stored and stored[n][0] != expected[n]]
    if mismatched:
        shown = "; ".join(
            f"{n!r} is {list(expected[n])} in the model and {list(stored[n][0])} in the files"
            for n in mismatched[:3]
        )
        raise CheckpointError(
            f"convert: {what} does not fit {source.folder}: {len(mismatched)} of "
            f"{len(expected)} tensors differ in shape ({shown}). Pass the architecture these "
            "weights were saved with (--model with its config.json or flavor)."
        )


def _check_float8(source: DcpSource, specs: Mapping[str, torch.Tensor], stored) -> None:
    """Refuse float8 entries that would be widened without their scales."""
    from ckpt_core.content.transforms import is_float8

    narrowed = sorted(
        k for k, (_, dtype) in stored.items() if is_float8(dtype) and specs[k].dtype != dtype
    )
    if narrowed:
        dtype = stored[narrowed[0]][1]
        raise CheckpointError(
            f"convert: {source.folder} stores {len(narrowed)} model tensors as {dtype} (e.g. "
            f"{narrowed[:3]}), quantized values that need their scales: a quantized export "
            "(float8 export = 'fp8') written as DCP. Convert the resumable checkpoint it was "
            "exported from (checkpoint.folder/step-N) instead; an fp8 export in HF format "
            "(checkpoint.export.format = 'hf') is read back dequantized."
        )
