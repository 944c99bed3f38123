"""The write loop of a streamed ``ckpt convert``, in one process.

:class:`Conversion` builds the model on the ``meta`` device (nothing
allocated), applies the converters there, and plans the output
(:mod:`ckpt_core.convert.plan`): the groups of tensors that must meet, what
each group writes, and the files those outputs fill. :meth:`Conversion.write`
then goes group by group: read the group's tensors from the source
(:mod:`ckpt_core.convert.sources`: DCP partial reads, safetensors slices) into
one reused buffer, run the converters' export transform and the adapters'
``to_hf`` on them, write the results, and drop them before the next group.
:func:`split_pieces` cuts the planned files into the shares that
:mod:`ckpt_core.convert.workers` hands to processes; :func:`finish` writes what
follows the data (index, ``config.json``, DCP ``.metadata``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_core.convert.plan import MODEL, ConvertPlan, GroupConverter, Job, OutFile, plan
from ckpt_core.convert.sources import Arena, DcpSource, HfSource, Sources
from ckpt_core.errors import CheckpointError
from ckpt_core.storage import layout

logger = logging.getLogger(__name__)

#: Cap of one DCP data file written by a streamed conversion (HF files: 5 GiB, as exports).
DCP_FILE_BYTES = 1 << 30


@dataclass
class Request:
    """What a conversion needs, in plain values (a spawned worker redoes the plan from it)."""

    folder: str
    kind: str  # "hf" or "dcp"
    family: str
    config: dict[str, Any]
    converters: list[dict[str, Any]]
    fmt: str  # "hf" or "dcp"
    dtype: str | None
    out: str  # the temporary folder written
    max_file_bytes: int
    hf_quantized: bool = False
    #: An owned-only checkpoint's base: ``(path, "dcp" | "hf" | "hf_quantized")``.
    base: tuple[str, str] | None = None


@dataclass
class Piece:
    """Bytes ``[start, end)`` of output file ``file`` (a DCP file is always whole)."""

    file: int
    start: int
    end: int


@dataclass
class PieceResult:
    piece: Piece
    crc: int
    size: int = 0
    writes: list[Any] = field(default_factory=list)  # DCP WriteResults


class Reporter:
    """Progress callbacks; the default does nothing."""

    def read(self, nbytes: int) -> None:
        """``nbytes`` of source tensors were read."""

    def wrote(self, nbytes: int, tensors: int) -> None:
        """``nbytes`` were written, finishing ``tensors`` tensors."""


class Conversion:
    """The planned conversion of one source, and the writer of its pieces."""

    def __init__(self, request: Request, family: Any = None) -> None:
        from ckpt_core.content.families import model_family
        from ckpt_core.content.hf_native import tied_names
        from ckpt_core.content.model_wrapper import ModelWrapper
        from ckpt_core.content.transforms import StateDictTransforms, parse_dtype
        from ckpt_core.protocol.plugin_host import ConverterSet

        self.request = request
        family = family if family is not None else model_family(request.family)
        self.adapter = family.adapter(request.config)
        names = [c["name"] for c in request.converters]
        self.converters = ConverterSet.from_config(
            names, {c["name"]: c.get("options") or {} for c in request.converters}
        )
        net = family.build_model(request.config, device="meta")
        self.converters.convert(net)
        self.full = ModelWrapper(net, self.converters).state_dict("full")
        self.tied = {t: s for t, s in tied_names(net).items() if t in self.full and s in self.full}
        self.transforms = StateDictTransforms(self.adapter, self.converters)
        self.target = parse_dtype(request.dtype)
        self.converter = GroupConverter(self.transforms, request.fmt, self.target)
        self.plan: ConvertPlan = plan(
            self.converter, self.full, tied=self.tied, max_file_bytes=request.max_file_bytes
        )
        self.sources = Sources(
            self._source(request.folder, "hf_quantized" if request.hf_quantized else request.kind),
            base=self._source(*request.base) if request.base else None,
            owned=self.converters.key_filter,
            tied=self.tied,
        )
        self.reporter = Reporter()
        self._cache: tuple[Job, dict[str, Any]] | None = None
        self._prefetch: _Prefetch | None = None

    def _source(self, path: str, kind: str) -> DcpSource | HfSource:
        if kind == "dcp":
            return DcpSource(path)
        return HfSource(path, self.adapter, quantized=kind == "hf_quantized")

    # -- reading and converting one group -----------------------------------------------

    def largest_group_bytes(self) -> int:
        """Bytes of the largest group's inputs (what the arena holds)."""
        sizes = [0]
        for job in self.plan.outputs:
            keys = self.converter.needed(self.plan.groups[job.group], job.part)
            sizes.append(Arena.size_of(self.full[k] for k in self.sources.read_keys(keys)))
        return max(sizes)

    def compute(self, job: Job, arena: Arena | None = None) -> dict[str, Any]:
        """Read one group's part into ``arena`` and convert it: output name → tensor."""
        keys = self.converter.needed(self.plan.groups[job.group], job.part)
        values, nbytes = self.sources.read({k: self.full[k] for k in keys}, arena)
        self.reporter.read(nbytes)
        return self.converter.outputs(values, job.part)

    def outputs(self, job: Job) -> dict[str, Any]:
        """Output name → tensor of one group's part (the last one is kept for the next call)."""
        if self._cache is not None and self._cache[0] == job:
            return self._cache[1]
        self._cache = None  # drop the previous group before reading the next
        out = self._prefetch.take(job) if self._prefetch is not None else self.compute(job)
        self._cache = (job, out)
        return out

    def tensor(self, job: Job, name: str, dtype: torch.dtype, shape: tuple[int, ...]):
        """One planned output tensor, checked against the plan."""
        value = self.outputs(job).get(name)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"convert: the group that plans {name!r} did not produce it from the real "
                "tensors; a converter's transform depends on values in a way the plan cannot see."
            )
        got = (self.converter.written_dtype(value), tuple(value.shape))
        if got != (dtype, shape):
            raise CheckpointError(
                f"convert: {name!r} came out as {got[0]} {list(got[1])}, planned as {dtype} "
                f"{list(shape)}; a converter's transform gives other shapes for real values."
            )
        return value

    def release(self) -> None:
        """Drop the cached group (the end of a worker's share)."""
        self._cache = None

    # -- writing --------------------------------------------------------------------------

    def file_sizes(self) -> list[int]:
        """Size of each output file (HF: exact; DCP: its tensor bytes, for balancing)."""
        if self.plan.fmt == "hf":
            return [hf_layout(f)[2] for f in self.plan.files]
        return [max(1, f.data_bytes) for f in self.plan.files]

    def jobs_of(self, pieces: list[Piece]) -> list[Job]:
        """The groups ``pieces`` need, in the order writing them asks for them."""
        order: list[Job] = []
        for piece in pieces:
            file = self.plan.files[piece.file]
            offsets = hf_layout(file)[1] if self.plan.fmt == "hf" else None
            for i, (job, spec) in enumerate(file.entries):
                if offsets is not None and not (
                    offsets[i] < piece.end and offsets[i] + spec.nbytes > piece.start
                ):
                    continue
                if not order or order[-1] != job:
                    order.append(job)
        return order

    def write(self, pieces: list[Piece]) -> list[PieceResult]:
        """Write ``pieces`` in order, through one staging buffer.

        A reader thread reads and converts the next group while this one is
        written, into the second of two buffers sized for the largest group.
        """
        from ckpt_core.storage.hf_writer import DEFAULT_BUFFER_BYTES, _Staging

        jobs = self.jobs_of(pieces)
        if len(jobs) > 1:
            self._prefetch = _Prefetch(self.compute, jobs, self.largest_group_bytes())
        else:
            self.sources.arena.reserve(self.largest_group_bytes())
        staging = _Staging(DEFAULT_BUFFER_BYTES)
        results = []
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-convert") as pool:
                for piece in pieces:
                    file = self.plan.files[piece.file]
                    if self.plan.fmt == "hf":
                        results.append(self._write_hf_piece(file, piece, staging, pool))
                    else:
                        results.append(self._write_dcp_file(file, piece))
        finally:
            self.release()
            if self._prefetch is not None:
                self._prefetch.close()
                self._prefetch = None
        return results

    def _write_hf_piece(self, file: OutFile, piece: Piece, staging, pool) -> PieceResult:
        from ckpt_core.storage.hf_writer import _StagedFile

        header, offsets, size = hf_layout(file)
        path = layout.join(self.request.out, file.path)
        writer = _StagedFile(path, staging, pool, start=piece.start, piece=True)
        try:
            if piece.start < len(header):
                writer.write_bytes(header[piece.start : min(piece.end, len(header))])
            for (job, spec), start in zip(file.entries, offsets):
                lo, hi = max(piece.start, start), min(piece.end, start + spec.nbytes)
                if lo >= hi:
                    continue
                value = self.tensor(job, spec.name, spec.dtype, spec.shape)
                writer.write_tensor(value, spec.dtype, lo - start, hi - start)
                self.reporter.wrote(hi - lo, 1 if hi == start + spec.nbytes else 0)
        except BaseException:
            writer.abort()
            raise
        written, crc = writer.close(file_size=size if piece.end == size else None)
        if written != piece.end - piece.start:
            raise CheckpointError(
                f"convert: {file.path} bytes [{piece.start}, {piece.end}) got {written} bytes; "
                "the plan and the tensors disagree."
            )
        return PieceResult(piece, int(crc.split(":")[1], 16), written)

    def _write_dcp_file(self, file: OutFile, piece: Piece) -> PieceResult:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        from ckpt_core.storage.dcp_io import storage_writer, written_checksums
        from ckpt_core.storage.stream_write import write_dcp_items

        writer = storage_writer(self.request.out)

        def make(job: Job, spec) -> Callable[[], torch.Tensor]:
            def one() -> torch.Tensor:
                value = self.tensor(job, spec.name, spec.dtype, spec.shape)
                self.reporter.wrote(spec.nbytes, 1)
                return value

            return one

        items = (
            (MetadataIndex(spec.name, torch.Size([0] * len(spec.shape))), make(job, spec))
            for job, spec in file.entries
        )
        writes = write_dcp_items(
            writer.fs, layout.join(self.request.out, file.path), file.path, items
        )
        size, crc = written_checksums(writer)[file.path]
        return PieceResult(piece, int(crc.split(":")[1], 16), size, writes)


class _Prefetch:
    """Reads and converts the groups of ``jobs`` on a thread, one ahead of the writer.

    Two buffers: the writer holds the one of the group it writes, the thread fills
    the other; a buffer is free again when the writer asks for the next group.
    """

    def __init__(self, compute: Callable[[Job, Arena], dict[str, Any]], jobs, nbytes: int):
        import queue

        self.free: queue.Queue = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        for _ in range(2):
            arena = Arena()
            arena.reserve(nbytes)
            self.free.put(arena)
        self.held: Arena | None = None
        self.stopped = False
        self.thread = threading.Thread(
            target=self._run, args=(compute, list(jobs)), name="ckpt-convert-read", daemon=True
        )
        self.thread.start()

    def _run(self, compute: Callable[[Job, Arena], dict[str, Any]], jobs: list[Job]) -> None:
        for job in jobs:
            arena = self.free.get()
            if self.stopped or arena is None:
                return
            try:
                out = compute(job, arena)
            except BaseException as exc:  # noqa: BLE001 - raised in the writer's thread
                self.ready.put((job, arena, None, exc))
                return
            self.ready.put((job, arena, out, None))

    def take(self, job: Job) -> dict[str, Any]:
        """The outputs of ``job`` (the next one); the previous group's buffer is freed."""
        if self.held is not None:
            self.free.put(self.held)
            self.held = None
        got, arena, out, exc = self.ready.get()
        self.held = arena
        if exc is not None:
            raise exc
        if got != job:
            raise CheckpointError(f"convert: read {got} where {job} was next (a planning bug).")
        return out

    def close(self) -> None:
        """Stop the thread (after the current group) and free the buffers."""
        self.stopped = True
        self.held = None
        self.free.put(None)
        self.free.put(None)
        self.thread.join()


def hf_layout(file: OutFile) -> tuple[bytes, list[int], int]:
    """``(header bytes, file offset of each entry, file size)`` of a planned safetensors file."""
    from ckpt_core.storage.hf_writer import _Entry, _header

    header = _header([_Entry(s.name, None, s.dtype, s.shape) for _, s in file.entries])
    offsets, at = [], len(header)
    for _, spec in file.entries:
        offsets.append(at)
        at += spec.nbytes
    return header, offsets, at


def split_pieces(sizes: list[int], splittable: list[bool], workers: int) -> list[list[Piece]]:
    """The files' bytes in ``workers`` shares of about equal size, cut at page boundaries.

    A file that is not splittable (a DCP data file) goes whole to one share;
    a share may come out empty.
    """
    from ckpt_core.storage.hf_writer import ALIGN

    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    cuts = set()
    for k in range(1, workers):
        at = total * k // workers
        i = max(j for j, s in enumerate(starts) if s <= at)
        offset = at - starts[i]
        if splittable[i]:
            offset -= offset % ALIGN
        else:
            offset = 0 if offset < sizes[i] / 2 else sizes[i]
        cuts.add(starts[i] + offset)
    bounds = [0, *sorted(c for c in cuts if 0 < c < total), total]
    shares = []
    for a, b in zip(bounds, bounds[1:]):
        share = []
        for i, size in enumerate(sizes):
            lo, hi = max(a, starts[i]), min(b, starts[i] + size)
            if lo < hi:
                share.append(Piece(i, lo - starts[i], hi - starts[i]))
        shares.append(share)
    return shares


# -- finishing ---------------------------------------------------------------------------


def finish(conversion: Conversion, results: list[PieceResult]) -> dict[str, tuple[int, str]]:
    """Write what follows the data (index, config.json, extras or ``.metadata``).

    Returns ``relative path → (size, checksum)`` of every file written, for the manifest.
    """
    from ckpt_core.storage.manifest import crc32_hex

    plan = conversion.plan
    out = conversion.request.out
    known: dict[str, tuple[int, str]] = {}
    if plan.fmt == "hf":
        from ckpt_core.storage.hf_writer import INDEX_NAME, _write_bytes, _write_json
        from ckpt_core.storage.stream_write import crc32_combine

        for i, file in enumerate(plan.files):
            pieces = sorted((r for r in results if r.piece.file == i), key=lambda r: r.piece.start)
            crc = 0
            for r in pieces:
                crc = crc32_combine(crc, r.crc, r.piece.end - r.piece.start)
            known[file.path] = (sum(r.size for r in pieces), crc32_hex(crc))
        model_files = [f for f in plan.files if f.part is MODEL]
        if len(model_files) > 1:
            index = {
                "metadata": {"total_size": sum(f.data_bytes for f in model_files)},
                "weight_map": {s.name: f.path for f in model_files for _, s in f.entries},
            }
            known[INDEX_NAME] = _write_json(layout.join(out, INDEX_NAME), index)
        for adapter in conversion.converter.subfolder_parts().values():
            sub = adapter.subfolder.strip("/")
            for name, content in adapter.extra_files().items():
                data = content.encode() if isinstance(content, str) else bytes(content)
                known[f"{sub}/{name}"] = _write_bytes(layout.join(out, sub, name), data)
        config = conversion.transforms.hf_config(plan.config_dtype, [])
        known["config.json"] = _write_json(layout.join(out, "config.json"), config)
        return known
    return _finish_dcp(conversion, results)


def _finish_dcp(conversion: Conversion, results: list[PieceResult]) -> dict[str, tuple[int, str]]:
    """``.metadata`` from DCP's own planner (over meta tensors) and the files' write results."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    from ckpt_core.convert.plan import DCP_PREFIX
    from ckpt_core.storage.dcp_io import storage_writer, written_checksums
    from ckpt_core.storage.manifest import crc32_hex

    state = {
        s.name[len(DCP_PREFIX) :]: torch.empty(s.shape, dtype=s.dtype, device="meta")
        for f in conversion.plan.files
        for _, s in f.entries
    }
    planner = DefaultSavePlanner()
    planner.set_up_planner({"model": state}, is_coordinator=True)
    _, metadata = planner.create_global_plan([planner.create_local_plan()])
    writer = storage_writer(conversion.request.out)
    writer.set_up_storage_writer(True)
    writer.finish(metadata, [[w for r in results for w in r.writes]])
    known = {conversion.plan.files[r.piece.file].path: (r.size, crc32_hex(r.crc)) for r in results}
    known.update(written_checksums(writer))
    return known
