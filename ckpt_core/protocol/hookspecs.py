"""The converter protocol: pluggy markers and hook specifications.

A converter is a class whose instance is registered with one pluggy
``PluginManager`` per run (see :mod:`ckpt_core.protocol.plugin_host`). It implements any of
the hooks below as ``@hookimpl`` methods; a hook it does not implement simply
takes no part. :class:`ckpt_core.ConverterSet` calls the hooks and composes their
results as each docstring says; trainers never call pluggy directly.

Every docstring states, in this order: what the hook does, when it is called,
what returning ``None`` means, how results of several converters compose, and
the parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from ckpt_core.protocol.state_dict_adapter import StateDictAdapter

PROJECT_NAME = "ckpt_core"
ENTRY_POINT_GROUP = "ckpt_core.converters"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: Version of the hook protocol below: it goes up when a hook's signature or meaning changes
#: in a way existing converters would notice. A converter declares the version it was written
#: for as its ``hook_protocol`` class attribute (1 when it says nothing).
HOOK_PROTOCOL_VERSION = 1
#: The oldest protocol this ckpt-core still runs. Deprecation path: a hook on its way out keeps
#: its spec for one minor release, marked ``@hookspec(warn_on_impl=DeprecationWarning(...))``
#: so pluggy warns when a converter implementing it registers; the release that removes it
#: raises this number.
OLDEST_HOOK_PROTOCOL = 1

HOOK_NAMES = (
    "convert",
    "key_filter",
    "state_dict_transform",
    "state_dict_adapter",
    "post_optimizer_step",
)


@hookspec
def convert(model: nn.Module) -> None:
    """Change the model's modules in place so that it trains the converter's way.

    When: once per model part, after the model is built and before it is
    parallelized (FSDP2, compile) and before optimizers are created.

    Returns: nothing; the return value is ignored.

    Composition: called on each enabled converter in config order, so a later
    converter sees the modules an earlier one made (LoRA wraps QAT linears).

    Args:
        model: one model part, an ``nn.Module`` still on its build device.
    """


@hookspec
def key_filter(fqn: str) -> bool | None:
    """Say whether a state-dict key belongs to this converter.

    Converter-owned keys are left out of the ``base`` view, handed to this
    converter's state-dict adapter, and may be left out of the ``export`` view
    by the converter's transform.

    When: for every key of the ``full`` view whenever a view, an export or a
    load plan is built; it must be cheap and must not depend on call order.

    Returns: ``True`` when the converter owns the key; ``False`` or ``None``
    when it does not.

    Composition: a key is converter-owned when any converter owns it; a key
    claimed by two converters is an error naming the key and both converters.

    Args:
        fqn: the canonical fully qualified key, e.g.
            ``layers.0.attention.wq.lora_a.weight`` (no ``_orig_mod.`` or
            activation-checkpoint prefixes).
    """


@hookspec
def state_dict_transform(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """Turn a training state dict into what the converter's export holds.

    Examples: LoRA merges ``W + (alpha/r)·B·A`` into each base weight and drops
    its adapter keys; QAT replaces fake-quantized weights by real integers and
    scales. Transforms are pure: they must not modify the model or the tensors
    they are given (build new tensors instead).

    When: building the ``export`` view, i.e. for HF/DCP exports and
    ``ckpt convert``; never for resumable checkpoints.

    Returns: the transformed state dict (it may be the same dict object with
    entries replaced), or ``None`` to leave it unchanged.

    Composition: chained in **reverse** config order: each converter receives
    the previous one's output, and the last-applied converter is undone first
    (with ``enabled = ["qat", "lora"]``, LoRA merges before QAT quantizes).

    Args:
        state_dict: the ``full`` view, or the output of the converter after
            this one in config order. Values may be plain tensors or DTensors.
    """


@hookspec
def state_dict_adapter(model_adapter: StateDictAdapter | None) -> StateDictAdapter | None:
    """Provide the adapter that writes and reads this converter's HF-side format.

    When: building an HF export and loading HF/PEFT input (initial or
    additional loads, ``ckpt convert``).

    Returns: a :class:`ckpt_core.StateDictAdapter` for the keys this converter
    owns, or ``None`` when the converter has no format of its own (its keys, if
    any, then go through the model's adapter).

    Composition: each returned adapter converts only the keys its converter
    owns and may add to ``config.json`` and write its own files (for example
    a PEFT adapter in ``adapter/``); the model's adapter converts every other
    key. Adapters are applied in config order.

    Args:
        model_adapter: the model's adapter (native ↔ HF names and config), or
            ``None`` when the run has none; a converter adapter uses it to name
            modules the way the HF model does.
    """


@hookspec
def post_optimizer_step(model_parts: list[nn.Module]) -> None:
    """Do per-step bookkeeping after the optimizers stepped.

    Example: Float8 precomputes the scales that FSDP2's float8 all-gather uses.

    When: after every ``optimizer.step()`` of the training loop, on every rank.

    Returns: nothing; the return value is ignored.

    Composition: called on each enabled converter in config order.

    Args:
        model_parts: every model part of this rank (pipeline stages), as
            trained (possibly FSDP2-wrapped and compiled).
    """
