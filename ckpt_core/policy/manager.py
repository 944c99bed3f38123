"""``CheckpointManager``: *when*, *what* and *where* to save and load.

Policy only. Content comes from :class:`ModelWrapper` views and the Stateful
containers in :mod:`ckpt_core.content.states`; bytes move through
:mod:`ckpt_core.storage` (DCP writers, manifest, commit, purge) and
:mod:`ckpt_core.storage.async_writer`; loading checks live in
:mod:`ckpt_core.policy.load_mechanics`.

A save (every rank, collectively):

1. ``save(step, last_step)`` decides whether ``step`` is saved (interval, first
   step, last step, ``load_only``) and whether an export is due; the work is in
   :meth:`CheckpointManager._do_save`, which subclasses can call with their own gating.
2. Every rank writes its DCP shards where the store says (local:
   ``<folder>/.tmp-step-<N>/``; object store: ``step-<N>/`` itself), async: after
   staging into reused CPU buffers, in a background thread.
3. After a barrier, rank 0 commits through the store: ``manifest.json`` (checksums
   were computed while the bytes were written) and the rename (local) or the
   manifest written last (object store, :mod:`ckpt_core.storage.store`); barrier.
4. Rank 0 purges old steps (``keep_latest_k``) in a background thread.

The constructor is collective when ``torch.distributed`` is initialized: it
creates the manager's own gloo process group for checkpoint traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ckpt_core.config import CORE_STATES, CheckpointConfig
from ckpt_core.content import model_layout, owned_only
from ckpt_core.content.hf_native import adapter_for
from ckpt_core.content.model_wrapper import ModelWrapper
from ckpt_core.content.states import (
    LRSchedulersContainer,
    ModelState,
    OptimizersContainer,
    as_stateful,
)
from ckpt_core.content.train_state import TrainState
from ckpt_core.errors import CheckpointError, ConfigError, SaveError
from ckpt_core.policy import preflight, save_errors
from ckpt_core.policy.parallel_layout import describe_layout, pipeline_split
from ckpt_core.policy.preemption import PreemptionHandler, parse_signals, pause_before_commit
from ckpt_core.protocol.plugin_host import ConverterSet
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter
from ckpt_core.rank_zero import distributed_on, on_rank_zero
from ckpt_core.storage import layout, manifest, signing
from ckpt_core.storage.async_writer import AsyncCheckpointer
from ckpt_core.storage.dcp_io import written_checksums
from ckpt_core.storage.purge import Purger
from ckpt_core.storage.store import folder_committed, staging_for, store_for, use_storage_options

logger = logging.getLogger(__name__)


_dist_on = distributed_on


class CheckpointManager:
    """Saves and restores a training run's state; see the module docstring."""

    def __init__(
        self,
        config: CheckpointConfig,
        model_parts: nn.Module | list[nn.Module],
        optimizers: Any = None,
        lr_schedulers: Any = None,
        dataloader: Any = None,
        states: Mapping[str, Any] | None = None,
        converters: ConverterSet | None = None,
        sd_adapter: StateDictAdapter | None = None,
    ) -> None:
        self.config = config
        self.enabled = config.enable
        self.converters = converters if converters is not None else ConverterSet([])
        self.wrapper = ModelWrapper(model_parts, converters=self.converters)
        #: What exports read; a pipelined trainer sets a view of the unsplit model here.
        self.export_wrapper: ModelWrapper = self.wrapper
        # A transformers model needs no adapter: its names are HF's
        # (ckpt_core.content.hf_native).
        self.sd_adapter = sd_adapter if sd_adapter is not None else adapter_for(model_parts)
        self.train_state = TrainState()
        # Owned-only checkpoints (see ckpt_core.content.owned_only): only converter-owned
        # model keys.
        self.keep_model_key = owned_only.model_key_filter(self.converters)
        if self.enabled:
            owned_only.check_config(config, self.converters)
        self.states: dict[str, Any] = {"model": ModelState(self.wrapper, self.keep_model_key)}
        if optimizers is not None:
            self.states["optimizer"] = OptimizersContainer(self.wrapper.model_parts, optimizers)
        if lr_schedulers is not None:
            self.states["lr_scheduler"] = LRSchedulersContainer(lr_schedulers)
        if dataloader is not None:
            self.states["dataloader"] = as_stateful(dataloader, "dataloader")
        self.states["train_state"] = self.train_state
        for name, obj in (states or {}).items():
            if name in CORE_STATES:
                raise ConfigError(
                    f"states: the name {name!r} is reserved for the manager's own state "
                    f"(reserved: {list(CORE_STATES)}); pick another name."
                )
            self.states[name] = as_stateful(obj, name)
        unknown = [n for n in config.exclude_from_loading if n not in {*self.states, *CORE_STATES}]
        if unknown:
            raise ConfigError(
                f"checkpoint.exclude_from_loading: unknown state {unknown[0]!r}. Allowed: "
                f"{sorted({*self.states, *CORE_STATES} - {'model'})} (the manager's states "
                "and the names passed in states=...)."
            )
        self.export_enabled = self._check_export()
        use_storage_options(config.storage_options, *self._storage_paths())
        self.store = store_for(config.folder)  # all of a step's I/O (ckpt_core.storage.store)
        self._model_description = self._describe_model()  # for manifests
        self.process_group = dist.new_group(backend="gloo") if _dist_on() else None
        self._pipeline_split: list[dict[str, Any]] | None = None  # manifest "mesh" (first save)
        self.train_state.process_group = self.process_group
        self.rank = dist.get_rank() if _dist_on() else 0
        self.world_size = dist.get_world_size() if _dist_on() else 1
        self._async = (
            AsyncCheckpointer(config.async_mode)
            if self.enabled and config.async_mode != "disabled" and not config.load_only
            else None
        )
        self._purger = Purger(
            config.folder,
            config.keep_latest_k,
            keep_every_n_steps=config.keep_every_n_steps,
            keep_steps=config.keep_steps,
        )
        self._preemption: PreemptionHandler | None = None
        self._preemption_group: Any = None
        signs = self.enabled and config.sign_key and not config.load_only
        self._sign_key = signing.load_private_key(config.sign_key) if signs else None
        if self.enabled and config.verify_key:  # a bad key fails now, not at the first resume
            signing.load_public_key(config.verify_key)
        self._loaded_step: int | None = None
        self._closed = False
        self._locks: list[Any] | None = None  # storage.lock.FolderLock, held on rank 0
        self._also: dict[str, str] = {}
        self._preflight_done = False

    def _check_export(self) -> bool:
        export = self.config.export
        if not (self.enabled and export.enable):
            return False
        if export.format == "hf" and self.sd_adapter is None:
            if "export" in self.config.model_fields_set:
                raise ConfigError(
                    "checkpoint.export.format = 'hf' needs a model state-dict adapter "
                    "(sd_adapter=...) to name HF keys and write config.json. Pass sd_adapter, "
                    "set checkpoint.export.format = 'dcp', or checkpoint.export.enable = false."
                )
            logger.info("No sd_adapter given: the default HF export is off for this run.")
            return False
        if "folder" not in export.model_fields_set:
            # Left at its default, the export goes inside the checkpoint folder, not the
            # working directory: a run writes under the one folder it was given.
            export.folder = layout.join(self.config.folder, export.folder)
            logger.info("checkpoint.export.folder not set: exports go to %s", export.folder)
        return True

    def _storage_paths(self) -> list[str]:
        """Every folder or file this run reads or writes (for ``checkpoint.storage_options``)."""
        config = self.config
        paths = [config.folder, config.export.folder, config.initial_load.path]
        return [p for p in paths + [e.path for e in config.additional_load] if p]

    # -- one writer and pre-flight (ckpt_core.storage.lock, ckpt_core.policy.preflight) ----

    def _written_folders(self) -> list[tuple[str, str]]:
        """``(what, folder)`` for every folder this run writes (rank 0 writes them)."""
        folders = []
        if self.enabled and not self.config.load_only:
            folders.append(("checkpoint.folder", self.config.folder))
            if self.export_enabled:
                folders.append(("checkpoint.export.folder", self.config.export.folder))
        return folders + list(self._also.items())

    def acquire(self, also: Mapping[str, str] | None = None) -> None:
        """Lock the folders this run writes, so that a second run on them fails at start.

        The checkpoint folder and, when exports are on, the export folder, plus
        ``also`` (``{what: folder}``, e.g. the trainer's metrics folder). A folder
        another process holds raises :class:`~ckpt_core.errors.FolderLockedError`
        naming the holder, on every rank. Collective; call it before step 1 (the
        first save does otherwise). Released by :meth:`close` and at process exit.
        """
        if self._locks is not None:
            return
        self._also = dict(also or {})
        from ckpt_core.storage import lock

        folders = self._written_folders()
        held = on_rank_zero(lambda: lock.acquire_all(folders), self.rank, self.process_group)
        self._locks = held or []

    def preflight(self) -> None:
        """Before step 1: create and probe every folder :meth:`acquire` names, and compare
        free space with one checkpoint (+ export), per ``checkpoint.preflight``.

        Raises :class:`~ckpt_core.errors.PreflightError` on every rank. Collective;
        runs once (the first save runs it otherwise).
        """
        if self._preflight_done:
            return
        self._preflight_done = True
        needs: dict[str, int] = {}
        if self.config.preflight != "off" and self.enabled and not self.config.load_only:
            opt = self.states.get("optimizer")
            ckpt, export = preflight.planned_bytes(
                self.states["model"].state_dict(),
                opt.optimizers if opt is not None else [],
                rank=self.rank,
                group=self.process_group,
                export_dtype=self.config.export.dtype if self.export_enabled else None,
            )
            needs = {"checkpoint.folder": ckpt, "checkpoint.export.folder": export}
        folders, mode = self._written_folders(), self.config.preflight
        on_rank_zero(lambda: preflight.check(folders, needs, mode), self.rank, self.process_group)

    # -- saving -----------------------------------------------------------------

    def should_save(self, step: int, last_step: bool = False) -> bool:
        """Whether :meth:`save` writes a checkpoint at ``step``."""
        if not self.enabled or self.config.load_only:
            return False
        if last_step or step % self.config.interval == 0:
            return True
        return step == 1 and self.config.enable_first_step_checkpoint

    def should_export(self, step: int, last_step: bool = False) -> bool:
        """Whether :meth:`save` writes an export at ``step``."""
        if not self.export_enabled or self.config.load_only:
            return False
        interval = self.config.export.interval
        return last_step or (interval > 0 and step % interval == 0)

    def save(self, step: int, last_step: bool = False) -> bool:
        """Save (and export) ``step`` if the config says so; returns whether it saved.

        Collective: every rank calls it with the same arguments. The last step is
        saved synchronously; other steps follow ``checkpoint.async_mode``. A save
        failing on the storage raises :class:`~ckpt_core.errors.SaveError` or is
        retried at the next interval (``checkpoint.on_save_error``).
        """
        saved = False
        policy = self.config.on_save_error
        if self.should_save(step, last_step):
            try:
                saved = self._do_save(step, sync=last_step or self._async is None)
            except SaveError as exc:
                save_errors.handle(exc, policy, final=last_step)
        if self.should_export(step, last_step):
            try:
                self._do_export(step)
            except SaveError as exc:
                save_errors.handle(exc, policy, final=last_step)
        return saved

    # -- preemption (see ckpt_core.policy.preemption) ----------------------------------

    def install_preemption_handler(self, signals: Any = None) -> PreemptionHandler | None:
        """Catch ``signals`` (default: ``checkpoint.preemption_signal``) as a preemption
        notice; None when that is ``'none'``.

        Collective (a gloo group of its own carries the flag, apart from async saves);
        main thread only. Then call :meth:`preemption_requested` once per step and
        :meth:`save_now` when it says so.
        """
        sigs = parse_signals(self.config.preemption_signal if signals is None else signals)
        if not sigs:
            return None
        if self._preemption is None:
            if _dist_on() and self.world_size > 1:
                self._preemption_group = dist.new_group(backend="gloo")
            self._preemption = PreemptionHandler(sigs)
        self._preemption.install()
        return self._preemption

    def preemption_requested(self) -> bool:
        """Whether any rank got a preemption signal; every rank gets the same answer.

        Collective when several ranks run (one all-reduce of one integer).
        """
        handler = self._preemption
        if handler is None:
            return False
        if self._preemption_group is None:
            return handler.requested
        flag = torch.tensor([int(handler.requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._preemption_group)
        return bool(flag.item())

    def save_now(self, step: int) -> bool:
        """Save ``step`` synchronously after any async save in flight; True when ``step``
        is committed afterwards (saved now or before). No export: it is the resumable
        checkpoint a preempted run needs. Collective.
        """
        if not self.enabled or self.config.load_only:
            return False
        self._wait_for_previous()
        if not self.store.is_committed(step):
            self._do_save(step, sync=True)
        if self._preemption is not None:
            self._preemption.saved()
        return True

    def _do_save(self, step: int, *, sync: bool) -> bool:
        """Write ``step`` now (sync) or stage it and write in the background.

        Holds no gating, so subclasses can reuse it. Returns False when the step
        is already committed (a committed step is never overwritten).
        """
        if self._closed:
            raise CheckpointError(
                f"CheckpointManager: save of step {step} after close(); close() drains and "
                "stops the background writer. Save before closing, or build a new manager."
            )
        self._drain_previous()
        self.acquire()
        self.preflight()
        final = self.store.step_dir(step)
        if self.store.is_committed(step):
            logger.warning("%s is already committed; not overwriting it.", final)
            return False
        self.train_state.step = step
        on_rank_zero(lambda: self._prepare_tmp(step), self.rank, self.process_group)
        state = {name: obj.state_dict() for name, obj in self.states.items()}
        # Everything that reads the live model happens here, on the caller's thread:
        # the background thread sees only staged copies (FSDP2 state-dict hooks are not
        # safe to run while the trainer runs forward/backward).
        if self._pipeline_split is None:  # collective, once: the parts never change
            self._pipeline_split = pipeline_split(self.wrapper.model_parts, self.process_group)
        mesh = describe_layout(state["model"], self._pipeline_split)
        if sync or self._async is None:
            self._write_and_commit(state, step, mesh)
            logger.info("Saved checkpoint %s", final)
        else:
            deferrable = self._deferrable_paths(state)
            self._async.submit(
                state,
                lambda staged: self._write_and_commit(staged, step, mesh),
                defer=lambda path: path[:2] in deferrable,
            )
            logger.info("Staged checkpoint step %d; writing %s in the background", step, final)
        return True

    def _prepare_tmp(self, step: int) -> None:
        """Rank 0: check the lock is still ours, then an empty staging place for ``step``
        (a crashed earlier attempt at this step is removed; a symbolic link there is refused)."""
        for held in self._locks or []:
            held.check()
        try:
            self.store.prepare(step)
        except OSError as exc:
            self._save_failed(exc, step, self.store.staging_dir(step))

    def _save_failed(self, exc: BaseException, step: int, tmp: str) -> None:
        """Raise a storage failure as one-line :class:`SaveError` after removing ``tmp``
        (rank 0, best effort); re-raise anything else unchanged."""
        error = save_errors.as_save_error(exc, f"saving step {step} to {tmp}", self.config.folder)
        if error is None:
            raise exc
        if self.rank == 0:
            self.store.abandon(step)
        raise error from exc

    def _drain_previous(self) -> None:
        """Wait for the previous async save; its storage failure follows
        ``checkpoint.on_save_error`` (raised, or logged and the next save goes on)."""
        try:
            self._wait_for_previous()
        except SaveError as exc:
            save_errors.handle(exc, self.config.on_save_error, final=False)

    def _deferrable_paths(self, state: dict[str, Any]) -> set[tuple[str, str]]:
        """Entries only ``optimizer.step()`` changes: model parameters and optimizer state.

        Their staging copy may overlap forward/backward; buffers (a forward pass may
        update them in place) and everything else are copied before ``save`` returns.
        """
        from ckpt_core.content.model_wrapper import canonical_fqn

        params = {
            canonical_fqn(name)
            for part in self.wrapper.model_parts
            for name, _ in part.named_parameters()
        }
        paths = {("model", k) for k in state["model"] if k in params}
        paths |= {("optimizer", k) for k in state.get("optimizer", {})}
        return paths

    def _write_and_commit(self, state: dict[str, Any], step: int, mesh: Any = None) -> None:
        """DCP-save ``state`` to the staging place, write the manifest, commit, purge."""
        tmp = self.store.staging_dir(step)
        writer = self.store.writer(tmp)
        try:
            dcp.save(
                state,
                storage_writer=writer,
                process_group=self.process_group,
                no_dist=self.process_group is None,
            )
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            self._save_failed(exc, step, tmp)
        records = written_checksums(writer)
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, records, group=self.process_group)
            records = {k: v for part in gathered for k, v in part.items()}
        pause_before_commit()  # CKPT_TEST_SAVE_DELAY_S: tests of signals during a save
        on_rank_zero(lambda: self._commit(tmp, step, records, mesh), self.rank, self.process_group)
        if self.rank == 0 and self.config.keep_latest_k > 0:
            protected = [] if self._loaded_step is None else [self._loaded_step]
            self._purger.start(protected=protected, in_flight=[step])

    def _commit(self, tmp: str, step: int, records: dict[str, Any], mesh: Any) -> None:
        """Rank 0: manifest, signature and commit through the store (a storage failure is
        a :class:`SaveError`, the uncommitted files removed)."""
        try:
            self.store.commit(
                step, records, lambda files: self._manifest(step, files, mesh), self._sign_key
            )
        except OSError as exc:
            self._save_failed(exc, step, tmp)

    def _manifest(self, step: int, files: dict[str, Any], mesh: Any = None) -> dict[str, Any]:
        data = manifest.build(
            kind="checkpoint",
            step=step,
            files=files,
            world_size=self.world_size,
            mesh=mesh,
            converters=self.converters.describe(),
            model=self._model_description,
        )
        if self.keep_model_key is not None:
            data["base"] = owned_only.base_record(self.config.initial_load)
        return data

    def _describe_model(self) -> dict[str, Any] | None:
        adapter = self.sd_adapter
        if adapter is None:
            return None
        name = getattr(adapter, "registry_name", type(adapter).__name__)
        try:
            config = adapter.update_hf_config({})
        except Exception as exc:  # noqa: BLE001 - a description must not fail a save
            logger.warning("sd_adapter.update_hf_config({}) failed (%s); using describe()", exc)
            config = adapter.describe()
        return model_layout.record({"adapter": name, "config": config}, adapter)

    def _do_export(self, step: int) -> None:
        from ckpt_core.policy.exporter import write_export

        self.acquire()
        self.preflight()
        export = self.config.export
        final = layout.step_dir(export.folder, step)
        if folder_committed(final):
            logger.warning("%s already exists; not exporting step %d again.", final, step)
            return
        try:
            write_export(
                self.export_wrapper,
                final,
                fmt=export.format,
                dtype=export.dtype,
                sd_adapter=self.sd_adapter,
                converters=self.converters,
                step=step,
                sign_key=self._sign_key,
            )
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            error = save_errors.as_save_error(
                exc, f"exporting step {step} to {final}", export.folder
            )
            if error is None:
                raise
            if self.rank == 0:
                save_errors.cleanup(staging_for(final))
            raise error from exc
        logger.info("Exported step %d to %s", step, final)

    def maybe_wait_for_staging(self) -> None:
        """Wait until a pending async save has copied the weights (call before
        ``optimizer.step()``); returns at once when nothing is staging."""
        if self._async is not None:
            self._async.maybe_wait_for_staging()

    def _wait_for_previous(self) -> None:
        if self._async is not None:
            self._async.wait()

    def _barrier(self) -> None:
        if self.process_group is not None:
            dist.barrier(group=self.process_group)

    def close(self) -> None:
        """Drain the pending async save and purge; re-raises any background error.

        Closing twice is harmless; saving after close is an error.
        """
        self._closed = True
        if self._preemption is not None and not self._preemption.requested:
            self._preemption.uninstall()  # a preempted process keeps it until it exits
        try:
            if self._async is not None:
                self._async.close()
        finally:
            self._purger.join()
            for held in self._locks or []:
                held.release()

    # -- loading ----------------------------------------------------------------

    def load(self, step: int = -1) -> bool:
        """Restore state: a committed step > ``initial_load`` > fresh start.

        ``step`` (or ``checkpoint.load_step``) names a step that must exist; -1
        takes the newest committed step. Returns True when anything was loaded
        (a resume or an initial load), False for a fresh start. Collective.
        """
        from ckpt_core.policy.load_policy import load_into

        if not self.enabled:
            return False
        self._wait_for_previous()
        return load_into(self, step)
