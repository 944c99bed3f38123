"""Stateful containers the manager hands to DCP.

* :class:`ModelState` — the ``full`` view of a :class:`ModelWrapper`; loading
  goes back through :meth:`ModelWrapper.load_state_dict`.
* :class:`OptimizersContainer` — one optimizer per model part, its state
  flattened by parameter FQN (``state.<fqn>.exp_avg``,
  ``param_groups.<fqn>.lr``) with
  :func:`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`.
  Keys named after parameters reshard with FSDP2 (DTensors) and never collide
  across pipeline stages, unlike the integer ids of ``optimizer.state_dict()``.
* :class:`LRSchedulersContainer` — the schedulers' states. All schedulers of a
  run step together, so one state is saved and restored into each of them
  (a run may have a different number of stages when it resumes).
* :func:`as_stateful` — any object with ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ckpt_core.content.model_wrapper import ModelWrapper
from ckpt_core.errors import ConfigError

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class ModelState:
    """``{"model": ...}`` entry: the ``full`` view, loaded back through the wrapper.

    ``keep`` (optional) limits the entry to the keys it accepts (owned-only
    checkpoints, see :mod:`ckpt_core.content.owned_only`); loading is then partial.
    """

    def __init__(self, wrapper: ModelWrapper, keep: Callable[[str], bool] | None = None) -> None:
        self.wrapper = wrapper
        self.keep = keep

    def state_dict(self) -> dict[str, Any]:
        full = self.wrapper.state_dict("full")
        if self.keep is None:
            return full
        return {k: v for k, v in full.items() if self.keep(k)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wrapper.load_state_dict(state_dict, strict=self.keep is None)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class OptimizersContainer:
    """Optimizers of the model parts, saved flattened by parameter FQN."""

    def __init__(self, model_parts: Iterable[nn.Module], optimizers: Any) -> None:
        self.model_parts = list(model_parts)
        self.optimizers: list[torch.optim.Optimizer] = _as_list(optimizers)
        if len(self.optimizers) != len(self.model_parts):
            raise ConfigError(
                f"optimizers: got {len(self.optimizers)} optimizer(s) for "
                f"{len(self.model_parts)} model part(s). Pass one optimizer per model part "
                "(in the same order), so its state can be saved under parameter names."
            )

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for model, optim in zip(self.model_parts, self.optimizers):
            merged.update(get_optimizer_state_dict(model, optim, options=_FLAT))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for model, optim in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(model, optim, state_dict, options=_FLAT)


class LRSchedulersContainer:
    """LR schedulers stepping together; one state restored into all of them."""

    def __init__(self, schedulers: Any) -> None:
        self.schedulers = _as_list(schedulers)

    def state_dict(self) -> dict[str, Any]:
        if not self.schedulers:
            return {}
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for sched in self.schedulers:
            sched.load_state_dict(copy.deepcopy(dict(state_dict)))


class StatefulWrapper:
    """Adapts an object with ``state_dict``/``load_state_dict`` to DCP's ``Stateful``."""

    def __init__(self, obj: Any, name: str) -> None:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise ConfigError(
                f"states[{name!r}]: {type(obj).__name__} has no state_dict/load_state_dict; "
                "pass an object implementing both (DCP's Stateful protocol)."
            )
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.obj.load_state_dict(state_dict)


def as_stateful(obj: Any, name: str) -> Any:
    """``obj`` if it is already a Stateful container, else a :class:`StatefulWrapper`."""
    if isinstance(obj, (ModelState, OptimizersContainer, LRSchedulersContainer)):
        return obj
    return StatefulWrapper(obj, name)
