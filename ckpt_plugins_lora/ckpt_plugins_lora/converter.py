"""The lora converter: hooks only; the work lives in sibling modules.

* :mod:`ckpt_plugins_lora.layers` attaches the factors to the target linears;
* :mod:`ckpt_plugins_lora.merge` merges them into the base weights for exports;
* :mod:`ckpt_plugins_lora.peft_format` reads and writes the PEFT adapter format.

The converter records, at convert time, the canonical names of the linears it
adapted; ownership, merging and PEFT names all go through that record.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from torch import nn

from ckpt_core.plugin_api import Converter, StateDictAdapter, canonical_fqn, hookimpl
from ckpt_plugins_lora.config import LoRAConfig
from ckpt_plugins_lora.layers import (
    ADAPTER_CHILDREN,
    attach_lora,
    freeze_all_but_adapters,
    select_targets,
    skipped_expert_targets,
)
from ckpt_plugins_lora.merge import merge_adapters
from ckpt_plugins_lora.peft_format import PeftLoraAdapter

logger = logging.getLogger(__name__)


class LoRAConverter(Converter):
    """Converter registered as ``lora``: low-rank adapters on frozen linears.

    Attributes:
        modules: canonical names of the adapted linears, filled by ``convert``.
        base_model_name_or_path: written to ``adapter_config.json``; a trainer
            that knows where the base came from may set it (otherwise the model
            adapter's ``name_or_path`` attribute is used when it has one).
    """

    name: ClassVar[str] = "lora"
    runs_after: ClassVar[tuple[str, ...]] = ("qat", "float8")
    Config = LoRAConfig

    def __init__(self, config: LoRAConfig | None = None) -> None:
        super().__init__(config)
        self.modules: set[str] = set()
        self.base_model_name_or_path: str | None = None

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor applied to ``B·A``."""
        return self.config.alpha / self.config.rank

    @property
    def checkpoint_view(self) -> str:
        """``"owned"`` when interval checkpoints keep only this converter's keys."""
        return "owned" if self.config.trainable_only_checkpoints else "full"

    # -- hooks ----------------------------------------------------------------

    @hookimpl
    def convert(self, model: nn.Module) -> None:
        """Attach LoRA to every target linear and freeze everything else."""
        cfg = self.config
        targets = select_targets(model, list(cfg.target_modules))
        skipped = skipped_expert_targets(model, list(cfg.target_modules))
        if skipped:
            logger.info(
                "lora: targets %s name stacked MoE expert weights (not nn.Linear) here: those stay "
                "frozen, without adapters",
                skipped,
            )
        for name, linear in targets.items():
            attach_lora(linear, cfg.rank, cfg.alpha, cfg.dropout)
            self.modules.add(canonical_fqn(name))
        trainable, frozen = freeze_all_but_adapters(model)
        logger.info(
            "lora: adapted %d linears (rank %d, alpha %g); %d trainable and %d frozen parameters",
            len(targets),
            cfg.rank,
            cfg.alpha,
            trainable,
            frozen,
        )

    @hookimpl
    def key_filter(self, fqn: str) -> bool:
        """Own ``<module>.lora_a.weight`` and ``<module>.lora_b.weight`` of adapted modules."""
        parts = fqn.rsplit(".", 2)
        if len(parts) != 3 or parts[1] not in ADAPTER_CHILDREN:
            return False
        module = parts[0]
        if self.modules:
            return module in self.modules
        # Not converted in this process (offline tools): trust the configured leaf names.
        return module.rsplit(".", 1)[-1] in self.config.target_modules

    @hookimpl
    def state_dict_transform(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Merge (``export`` = merged/both) or drop (``adapter``) the factors."""
        modules = self.modules or {k.rsplit(".", 2)[0] for k in state_dict if self.key_filter(k)}
        return merge_adapters(
            state_dict, modules, self.scaling, merge=self.config.export != "adapter"
        )

    @hookimpl
    def state_dict_adapter(self, model_adapter: StateDictAdapter | None) -> StateDictAdapter:
        """The PEFT adapter format.

        With ``export = "merged"`` the adapter has no ``subfolder``: exports then
        write no adapter folder (the merged transform leaves no factor keys for
        it), while ``[[checkpoint.additional_load]]`` can still read a PEFT
        adapter folder (point ``path`` at the folder itself).
        """
        adapter = self.peft_adapter(model_adapter)
        if self.config.export == "merged":
            adapter.subfolder = None
        return adapter

    # -- helpers --------------------------------------------------------------

    def peft_adapter(self, model_adapter: StateDictAdapter | None) -> PeftLoraAdapter:
        """The PEFT-format adapter for the recorded modules (whatever ``export`` says)."""
        base = self.base_model_name_or_path or getattr(model_adapter, "name_or_path", None)
        return PeftLoraAdapter(
            self.modules,
            rank=self.config.rank,
            alpha=self.config.alpha,
            dropout=self.config.dropout,
            model_adapter=model_adapter,
            base_model_name_or_path=base,
        )
