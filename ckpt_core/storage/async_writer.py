"""Async checkpointing: stage into reused CPU buffers, then write in the background.

Modes (``checkpoint.async_mode``):

* ``"disabled"`` — the manager saves synchronously; nothing here is used.
* ``"async"`` — ``save`` walks the state dict on the caller's thread (no data
  copied) and returns; one background thread copies the tensors into CPU
  staging buffers, then runs the DCP save, the manifest and the commit on the
  manager's own gloo process group (its collectives never interleave with the
  trainer's). The copy overlaps the trainer's forward/backward;
  :meth:`AsyncCheckpointer.maybe_wait_for_staging`, called before
  ``optimizer.step()``, waits for it, so the checkpoint never sees half-updated
  weights. This is what ``dcp.async_save`` does with its thread executor, with
  the commit added to the same thread. The stager *keeps* its buffers between
  saves: freshly allocated memory is slow to touch on these machines, and
  reusing buffers cut the staging time from ~28% to ~5-8% of a sync save
  (measured in ``docs/performance.md``). Buffers are keyed by the entry's path in
  the state dict, never by storage, so tensors produced by state-dict hooks are
  copied fresh at every save.
* ``"async_with_pinned_mem"`` — as ``"async"`` with page-locked buffers filled
  by non-blocking device-to-host copies enqueued on a side CUDA stream by the
  caller (microseconds); ``maybe_wait_for_staging`` waits for them. Without
  CUDA pinning is unavailable: it logs that once and behaves as ``"async"``.

Each save waits for the previous one (the buffers are reused). A background
failure is re-raised by the next save, :meth:`AsyncCheckpointer.wait` or
:meth:`AsyncCheckpointer.close`; a storage failure arrives as the one-line
:class:`~ckpt_core.errors.SaveError` the manager's job raised, which the next
save raises or logs (``checkpoint.on_save_error``).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ckpt_core.dtensor_utils import with_local

logger = logging.getLogger(__name__)

ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")
_warned_no_cuda = False


class BufferStager:
    """Copies a nested state dict into CPU tensors that are reused across saves."""

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._paths: list[tuple[Any, ...]] = []
        self._stream: Any = None
        self._event: Any = None

    def prepare(
        self, state_dict: Any, defer: Callable[[tuple[Any, ...]], bool] | None = None
    ) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``(staged, copies)``: the staged structure over this stager's buffers, and the
        ``(buffer, source)`` copies still to run (see :meth:`copy`).

        Runs on the caller's thread. Tensors whose path (tuple of keys) ``defer``
        accepts are left for :meth:`copy`; the others are copied now (blocking).
        ``defer=None`` defers every tensor.
        """
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._paths: list[tuple[Any, ...]] = []
        staged = self._walk(state_dict, (), copies)
        if defer is not None:
            now = [(i, c) for i, c in enumerate(copies) if not defer(self._paths[i])]
            for _, (buf, src) in now:
                buf.copy_(src)
            skip = {i for i, _ in now}
            copies = [c for i, c in enumerate(copies) if i not in skip]
        return staged, copies

    def copy(self, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill the buffers: plain copies on CPU, or non-blocking device-to-host copies on a
        side stream with pinned memory (then :meth:`synchronize` waits for them)."""
        if not self.pin_memory:
            for buf, src in copies:
                buf.copy_(src)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for buf, src in copies:
                if src.is_cuda:
                    # The source may be a temporary (an optimizer state-dict view): keep
                    # the allocator from reusing its memory until the copy is done.
                    src.record_stream(self._stream)
                buf.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._event = event

    def stage(self, state_dict: Any) -> Any:
        """A copy of ``state_dict`` in this stager's buffers (:meth:`prepare` + :meth:`copy`)."""
        staged, copies = self.prepare(state_dict)
        self.copy(copies)
        return staged

    def synchronize(self) -> None:
        """Wait until non-blocking copies of the last :meth:`stage` have landed."""
        event = self._event  # read once: the caller and the writer thread may both wait
        if event is not None:
            event.synchronize()

    def close(self) -> None:
        """Drop the buffers."""
        self.synchronize()
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held in staging buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    # -- internals --------------------------------------------------------------

    def _walk(self, value: Any, path: tuple[Any, ...], copies: list) -> Any:
        if isinstance(value, torch.Tensor):
            return self._stage_tensor(value, path, copies)
        if isinstance(value, dict):
            return {k: self._walk(v, (*path, k), copies) for k, v in value.items()}
        if isinstance(value, list):
            return [self._walk(v, (*path, i), copies) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self._walk(v, (*path, i), copies) for i, v in enumerate(value))
        return copy.deepcopy(value)

    def _stage_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...], copies: list) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            local = self._buffer_for(tensor.to_local(), path, copies)
            return with_local(tensor, local)
        return self._buffer_for(tensor, path, copies)

    def _buffer_for(self, tensor: torch.Tensor, path: tuple[Any, ...], copies: list) -> Any:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = torch.empty(
                tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self.pin_memory
            )
            self._buffers[path] = buf
        copies.append((buf, tensor.detach()))
        self._paths.append(path)
        return buf


def resolve_mode(mode: str) -> str:
    """The mode that will actually run here (pinned memory needs CUDA)."""
    global _warned_no_cuda
    if mode not in ASYNC_MODES:
        raise ValueError(f"checkpoint.async_mode must be one of {ASYNC_MODES}, got {mode!r}.")
    if mode == "async_with_pinned_mem" and not torch.cuda.is_available():
        if not _warned_no_cuda:
            logger.warning(
                "checkpoint.async_mode = 'async_with_pinned_mem' needs CUDA (pinned host "
                "memory, side-stream copies); this machine has none, so saves use 'async': "
                "staging into reused CPU buffers, writing in a background thread."
            )
            _warned_no_cuda = True
        return "async"
    return mode


class AsyncCheckpointer:
    """Runs one background save at a time; the caller is blocked only while staging."""

    def __init__(self, mode: str) -> None:
        self.mode = resolve_mode(mode)
        self.stager = BufferStager(pin_memory=self.mode == "async_with_pinned_mem")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-async")
        self._future: Future | None = None
        self._staged: threading.Event | None = None

    def submit(
        self,
        state_dict: Any,
        job: Callable[[Any], Any],
        defer: Callable[[tuple[Any, ...]], bool] | None = None,
    ) -> None:
        """Wait for the previous save, then stage ``state_dict`` and run ``job(staged)``
        in the background.

        The structure is walked here. Tensors ``defer`` accepts (by path) are copied in
        the background (CPU) or enqueued on a side stream (pinned), overlapping the
        trainer's forward/backward until :meth:`maybe_wait_for_staging`: only tensors
        that nothing changes before ``optimizer.step()`` may be deferred (parameters,
        optimizer state). The rest (buffers a forward pass may update, counters) are
        copied before this returns.
        """
        self.wait()
        staged, copies = self.stager.prepare(state_dict, defer)
        if self.stager.pin_memory:
            self.stager.copy(copies)  # enqueue only: returns at once
        done = threading.Event()
        self._staged = done

        def run() -> Any:
            try:
                if self.stager.pin_memory:
                    self.stager.synchronize()
                else:
                    self.stager.copy(copies)
            finally:
                done.set()
            return job(staged)

        self._future = self._executor.submit(run)

    def maybe_wait_for_staging(self) -> None:
        """Block until the pending save's copy of the state is complete.

        Call it before anything changes the saved tensors (``optimizer.step()``): until
        it returns, the background copy may still be reading them.
        """
        done, self._staged = self._staged, None
        if done is not None:
            done.wait()

    @property
    def in_flight(self) -> bool:
        """Whether a background save is still running."""
        return self._future is not None and not self._future.done()

    def wait(self) -> None:
        """Wait for the background save; re-raise its error, if any."""
        self._staged = None
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def close(self) -> None:
        """Drain the pending save, stop the thread, free the buffers; re-raise errors."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self.stager.close()
