"""Planning a streaming conversion: which tensors must meet, and what each output file holds.

``ckpt convert`` never holds the whole model. It builds the model on the
``meta`` device (no memory), applies the converters there so they know their
modules, and plans from that:

1. **Groups**: the tensors a transform needs together. A key belongs to the
   group of its module (``layers.0.attention.wq``), folded into the outermost
   ancestor module that holds tensors of its own: a LoRA factor
   (``wq.lora_a.weight``) or a fake-quantizer scale (``wq.weight_fake_quantizer.scale``)
   meets its weight; the stacked experts of one MoE layer (``moe.experts.w1``,
   ``w2``, ``w3``) meet each other; a tied target meets its source. An adapter
   (the model's or a converter's) can say otherwise through
   :meth:`~ckpt_core.StateDictAdapter.convert_group`.
2. **Dry run**: each group goes through the converters' export transform, the
   routing to adapters and ``to_hf`` on meta tensors, which gives the name,
   dtype and shape of everything it writes (a transform that meta tensors
   cannot run, such as a data-dependent quantizer, runs on zeros of one group).
   The same run over the whole meta model must give the same tensors, or the
   grouping would change the output: that is an error naming the first
   difference.
3. **Files**: the outputs in group order, cut into files under a size cap
   (HF: ``model-0000i-of-0000n.safetensors`` as today's export names them, and
   one file per converter subfolder such as LoRA's ``adapter/``; DCP: data
   files ``__<i>_0.distcp``).

This module is content only: no file is opened here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_core.content.transforms import (
    StateDictTransforms,
    cast_dtype,
    cast_state_dict,
    is_castable,
)
from ckpt_core.errors import CheckpointError
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter

logger = logging.getLogger(__name__)

#: The part of an output that is the model itself (a converter's subfolder is named by it).
MODEL = None
#: Prefix of model keys in a DCP export (``{"model": state_dict}`` flattened).
DCP_PREFIX = "model."


@dataclass(frozen=True)
class OutTensor:
    """One tensor an output file receives: name, dtype as written, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Job:
    """What one group gives one part of the output (``part`` None: the model's files)."""

    group: int
    part: str | None


@dataclass
class OutFile:
    """One output file: its path relative to the output folder and its tensors in order."""

    path: str
    part: str | None
    entries: list[tuple[Job, OutTensor]] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for _, t in self.entries)


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def default_group(key: str, owners: set[str]) -> str:
    """The module ``key`` belongs to, folded into the outermost ancestor holding tensors.

    ``owners`` is the set of modules that hold tensors directly. The root never
    absorbs the others (a model with a root-level tensor is not one group).
    """
    module = _module(key)
    parts = module.split(".") if module else []
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in owners:
            return prefix
    return module


def group_keys(
    keys: Iterable[str],
    *,
    tied: Mapping[str, str] | None = None,
    adapters: Iterable[StateDictAdapter] = (),
) -> list[list[str]]:
    """Native keys split into the groups that must be read and converted together.

    Groups keep the order of their first key; a tied target joins its source's group.
    """
    keys = list(keys)
    tied = dict(tied or {})
    adapters = [a for a in adapters if a is not None]
    owners = {_module(k) for k in keys}

    def anchor(key: str) -> str:
        for adapter in adapters:
            chosen = adapter.convert_group(key)
            if chosen is not None:
                return chosen
        return default_group(key, owners)

    anchors = {k: anchor(k) for k in keys}
    for target, source in tied.items():
        if target in anchors and source in anchors:
            anchors[target] = anchors[source]
    out: dict[str, list[str]] = {}
    for key in keys:
        out.setdefault(anchors[key], []).append(key)
    return list(out.values())


class GroupConverter:
    """The per-group content step: export transform, routing, ``to_hf`` or the DCP view.

    ``fmt`` is ``"hf"`` or ``"dcp"``; ``target`` the export dtype (``None`` keeps).
    """

    def __init__(self, transforms: StateDictTransforms, fmt: str, target: torch.dtype | None):
        self.transforms = transforms
        self.converters = transforms.converters
        self.fmt = fmt
        self.target = target
        self._owners: dict[str, str | None] = {}

    def owner(self, key: str) -> str | None:
        if key not in self._owners:
            self._owners[key] = self.converters.owner(key) if self.converters else None
        return self._owners[key]

    def subfolder_parts(self) -> dict[str, StateDictAdapter]:
        """Converter name → its adapter, for adapters writing their own subfolder (HF only)."""
        if self.fmt != "hf":
            return {}
        return {name: a for name, a in self.transforms.converter_adapters.items() if a.subfolder}

    def parts(self, keys: Iterable[str]) -> list[str | None]:
        """The parts a group with ``keys`` contributes to: the model, and owning subfolders."""
        subs = self.subfolder_parts()
        owned = {self.owner(k) for k in keys}
        return [MODEL, *[name for name in subs if name in owned]]

    def needed(self, keys: Iterable[str], part: str | None) -> list[str]:
        """The input keys ``part`` needs (a subfolder needs only its converter's keys)."""
        return [k for k in keys if part is MODEL or self.owner(k) == part]

    def outputs(self, inputs: dict[str, Any], part: str | None) -> dict[str, Any]:
        """Output name → tensor (HF tensors not yet cast: the writer casts them)."""
        if part is not MODEL:
            adapter = self.subfolder_parts()[part]
            return dict(adapter.to_hf({k: v for k, v in inputs.items() if self.owner(k) == part}))
        export = self.converters.state_dict_transform(dict(inputs)) if self.converters else inputs
        if self.fmt == "dcp":
            view = cast_state_dict(export, self.target)
            odd = [k for k, v in view.items() if not isinstance(v, torch.Tensor)]
            if odd:
                raise CheckpointError(
                    f"convert: the export view holds {odd[0]!r}, a "
                    f"{type(view[odd[0]]).__name__} and not a tensor; a streaming DCP "
                    "conversion writes tensors only. Convert to HF, or without the converter "
                    "that adds it (--converters)."
                )
            return {DCP_PREFIX + k: v for k, v in view.items()}
        return dict(self.transforms.to_hf(export, {})[0].tensors)

    def written_dtype(self, value: torch.Tensor) -> torch.dtype:
        """The dtype ``value`` is written in (DCP views are cast already)."""
        return value.dtype if self.fmt == "dcp" else cast_dtype(value.dtype, self.target)


def _zeros_like_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return torch.zeros(value.shape, dtype=value.dtype)
    return value


def dry_run(
    converter: GroupConverter, full: Mapping[str, Any], keys: list[str], part: str | None
) -> list[OutTensor]:
    """What ``part`` of the group ``keys`` writes, from meta tensors (zeros if meta fails)."""
    inputs = {k: full[k] for k in converter.needed(keys, part)}
    try:
        out = converter.outputs(inputs, part)
    except Exception as exc:  # noqa: BLE001 - any failure on meta: run it on zeros
        logger.debug("convert: dry run on meta failed (%s); running it on zeros", exc)
        out = converter.outputs({k: _zeros_like_meta(v) for k, v in inputs.items()}, part)
    specs = []
    for name, value in out.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"convert: {name!r} is a {type(value).__name__}; an HF export holds tensors only."
            )
        specs.append(OutTensor(name, converter.written_dtype(value), tuple(value.shape)))
    return specs


def whole_model_outputs(
    converter: GroupConverter, full: Mapping[str, Any]
) -> dict[tuple[str | None, str], tuple[torch.dtype, tuple[int, ...]]] | None:
    """The same outputs for the whole meta model at once; ``None`` when meta cannot run them."""
    try:
        out: dict[tuple[str | None, str], tuple[torch.dtype, tuple[int, ...]]] = {}
        for part in [MODEL, *converter.subfolder_parts()]:
            for name, value in converter.outputs(dict(full), part).items():
                out[(part, name)] = (converter.written_dtype(value), tuple(value.shape))
        return out
    except Exception as exc:  # noqa: BLE001 - e.g. a quantizer that reads values
        logger.debug("convert: whole-model dry run on meta failed (%s); not compared", exc)
        return None


def check_grouping(
    planned: dict[Job, list[OutTensor]],
    whole: Mapping[tuple[str | None, str], tuple[torch.dtype, tuple[int, ...]]] | None,
) -> None:
    """Refuse a grouping whose outputs differ from converting the whole model at once."""
    if whole is None:
        return
    got: dict[tuple[str | None, str], tuple[torch.dtype, tuple[int, ...]]] = {}
    for job, specs in planned.items():
        for spec in specs:
            key = (job.part, spec.name)
            if key in got:
                raise CheckpointError(
                    f"convert: {spec.name!r} is produced by two tensor groups; an adapter or "
                    "converter names one output from tensors of different modules. Give its "
                    "adapter a convert_group() that puts them together."
                )
            got[key] = (spec.dtype, spec.shape)
    if got == dict(whole):
        return
    only_whole = sorted(str(n) for (p, n) in whole.keys() - got.keys())
    only_groups = sorted(str(n) for (p, n) in got.keys() - whole.keys())
    changed = sorted(str(k[1]) for k in got.keys() & whole.keys() if got[k] != whole[k])
    first = (only_whole or only_groups or changed)[0]
    raise CheckpointError(
        f"convert: converting tensor groups one at a time gives other tensors than "
        f"converting the whole model (first difference: {first!r}); a converter or adapter "
        "combines tensors of different modules. Give its adapter a convert_group() that "
        "puts them together."
    )


def split_files(
    entries: list[tuple[Job, OutTensor]], max_bytes: int
) -> list[list[tuple[Job, OutTensor]]]:
    """Entries cut into consecutive files of at most ``max_bytes`` (a bigger tensor alone)."""
    files: list[list[tuple[Job, OutTensor]]] = [[]]
    size = 0
    for job, spec in entries:
        if files[-1] and size + spec.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append((job, spec))
        size += spec.nbytes
    return files


def shard_names(count: int) -> list[str]:
    """HF file names of the model's ``count`` files, as transformers names them."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


@dataclass
class ConvertPlan:
    """Everything a writer needs: groups, the outputs of each, the files they fill."""

    fmt: str
    groups: list[list[str]]
    files: list[OutFile]
    #: dtype of config.json (HF): the export dtype, else the first floating output's.
    config_dtype: torch.dtype
    outputs: dict[Job, list[OutTensor]]

    @property
    def data_bytes(self) -> int:
        return sum(f.data_bytes for f in self.files)


def plan(
    converter: GroupConverter,
    full: Mapping[str, Any],
    *,
    tied: Mapping[str, str],
    max_file_bytes: int,
    progress: Callable[[], None] | None = None,
) -> ConvertPlan:
    """Plan the conversion of the meta state dict ``full`` (see the module docstring)."""
    adapters = [converter.transforms.sd_adapter, *converter.transforms.converter_adapters.values()]
    groups = group_keys(full, tied=tied, adapters=adapters)
    outputs: dict[Job, list[OutTensor]] = {}
    for gi, keys in enumerate(groups):
        for part in converter.parts(keys):
            outputs[Job(gi, part)] = dry_run(converter, full, keys, part)
        if progress is not None:
            progress()
    check_grouping(outputs, whole_model_outputs(converter, full))
    model_entries = [(job, s) for job, specs in outputs.items() if job.part is MODEL for s in specs]
    files: list[OutFile] = []
    if converter.fmt == "hf":
        chunks = split_files(model_entries, max_file_bytes)
        for name, chunk in zip(shard_names(len(chunks)), chunks):
            files.append(OutFile(name, MODEL, chunk))
        for part, adapter in converter.subfolder_parts().items():
            entries = [
                (job, s) for job, specs in outputs.items() if job.part == part for s in specs
            ]
            path = f"{adapter.subfolder.strip('/')}/{adapter.file_name()}"
            files.append(OutFile(path, part, entries))
    else:
        for i, chunk in enumerate(split_files(model_entries, max_file_bytes)):
            files.append(OutFile(f"__{i}_0.distcp", MODEL, chunk))
    dtype = converter.target or next(
        (s.dtype for _, s in model_entries if is_castable(s.dtype)), torch.float32
    )
    return ConvertPlan(converter.fmt, groups, files, dtype, outputs)
