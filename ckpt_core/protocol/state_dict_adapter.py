"""The state-dict adapter: native names and formats ↔ a Hugging Face-side format.

A model adapter (such as :class:`ckpt_core.reference.LlamaStateDictAdapter`)
maps every native key to its Hugging Face name and writes ``config.json``.
A converter adapter (returned by the ``state_dict_adapter`` hook) converts only
the keys its converter owns, and may add to ``config.json`` (a
``quantization_config``) or write its own folder (a PEFT adapter).

Adapters are content stage: pure functions over state dicts. They never touch
storage; the export writer asks them for tensors, JSON and file names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class StateDictAdapter(ABC):
    """Converts state dicts between native keys and an HF-side format.

    Subclasses implement :meth:`to_hf` and :meth:`from_hf`; the other methods
    have defaults that suit a converter without a format of its own.
    """

    #: Folder, relative to the export folder, that receives this adapter's
    #: tensors (``model.safetensors`` style names come from :meth:`file_name`)
    #: and :meth:`extra_files`. ``None``: its tensors join the model's files.
    subfolder: str | None = None

    #: Rotary layout of the q/k weights the model computes with (``"rotate_half"``:
    #: Hugging Face's and ckpt's reference models'), recorded in manifests and
    #: compared on every load (:mod:`ckpt_core.content.model_layout`); ``None``: not declared.
    rope_layout: str | None = None

    @abstractmethod
    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Return the given native entries under HF names (tensors may be new)."""

    @abstractmethod
    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """Return the given HF entries under native names (inverse of :meth:`to_hf`)."""

    def hf_key(self, fqn: str) -> str:
        """HF name of one native key; defaults to going through :meth:`to_hf`."""
        (name,) = self.to_hf({fqn: None}).keys()
        return name

    def hf_module(self, module: str) -> str:
        """HF name of a native module path (``layers.0.attention.wq`` -> ``...q_proj``).

        Derived from :meth:`hf_key` of the module's ``weight`` key; converter
        adapters use it to name the modules they quantize or adapt.
        """
        return self.hf_key(f"{module}.weight").removesuffix(".weight")

    def update_hf_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Return ``config.json`` content with this adapter's additions.

        The model adapter builds the base config (``config`` is empty for it);
        converter adapters then add fields such as ``quantization_config``.
        """
        return config

    def file_name(self) -> str:
        """Safetensors file name used for this adapter's tensors in its subfolder."""
        return "model.safetensors"

    def extra_files(self) -> dict[str, str | bytes]:
        """Extra files to write beside this adapter's tensors: name → content."""
        return {}

    def check_source(self, folder: str) -> None:
        """Raise when the files in ``folder`` were written with incompatible options.

        Called before this adapter's tensors are read from ``folder`` (an
        additional load). Example: a PEFT adapter whose ``lora_alpha`` differs
        from the converter's would load with the wrong scaling. Default: no check.
        """
        return None

    def convert_group(self, fqn: str) -> str | None:
        """Name of the tensor group ``fqn`` is converted with, or ``None`` for the default.

        ``ckpt convert`` streams: it reads, converts and writes one group of
        tensors at a time. By default a key joins its module's group, folded
        into the outermost ancestor module holding tensors of its own (LoRA
        factors meet their weight, an MoE layer's stacked experts meet each
        other). An adapter whose ``to_hf`` / ``from_hf`` combines tensors of
        different modules (a fused ``qkv`` split from separate ``q``, ``k``,
        ``v`` modules) returns one name for all of them. Keys with equal names
        form one group.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in checkpoint manifests.

        The model adapter returns what it needs to rebuild ``config.json``
        offline (``ckpt convert``); converter adapters may return ``{}``.
        """
        return {}
