"""Configuration models for the ``[converters]`` and ``[checkpoint]`` sections.

All models forbid unknown fields. Converter options are kept as raw tables here
and validated by each converter's own ``Config`` (the schema never changes with
which plugins are installed).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CORE_STATES = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")

ExportDtype = Literal["float32", "bfloat16", "float16"]


def comma_list(value: Any) -> Any:
    """``"a, b,"`` → ``["a", "b"]`` (a list option as a command line gives it); any other
    value is returned as it is, for the field's own validation."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConvertersConfig(_Strict):
    """``[converters]``: which converters run, in order, and their options."""

    enabled: list[str] = Field(
        default_factory=list, description="Converter names, in the order they convert the model."
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-converter option tables ([converters.<name>] in TOML).",
    )

    @model_validator(mode="before")
    @classmethod
    def _collect_sections(cls, data: Any) -> Any:
        # [converters.lora] arrives as converters["lora"] = {...}: move it to options.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        options = dict(data.pop("options", None) or {})
        for key in list(data):
            if key != "enabled" and isinstance(data[key], dict):
                options[key] = data.pop(key)
        data["options"] = options
        return data

    @field_validator("enabled", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        return comma_list(value)


class InitialLoadConfig(_Strict):
    """``[checkpoint.initial_load]``: where a run starts when no step is committed."""

    path: str | None = Field(None, description="Folder or URI of the starting weights.")
    format: Literal["dcp", "hf", "hf_quantized", "torchtitan"] = Field(
        "dcp",
        description="'dcp', 'hf' (safetensors folder), 'hf_quantized' (fp8 blocks) or "
        "'torchtitan' (a torchtitan step or checkpoint folder; docs/torchtitan.md).",
    )
    model_only: bool = Field(True, description="Load only the model (not optimizer etc.).")


class AdditionalLoadConfig(_Strict):
    """``[[checkpoint.additional_load]]``: converter-owned weights from a second source."""

    path: str = Field(description="Folder of the converter's format (e.g. a PEFT adapter).")
    converter: str = Field(description="Name of the enabled converter whose adapter reads it.")


class ExportConfig(_Strict):
    """``[checkpoint.export]``: consumable exports, apart from resumable checkpoints."""

    enable: bool = Field(True, description="Write exports at all (needs a folder).")
    folder: str = Field(
        "export",
        description="Exports go to <folder>/step-<N>/; left unset, <checkpoint.folder>/export.",
    )
    format: Literal["hf", "dcp"] = Field("hf", description="'hf' safetensors or 'dcp'.")
    dtype: ExportDtype = Field("bfloat16", description="Floating tensors are cast to this.")
    interval: int = Field(0, ge=0, description="Export every N steps; 0: last step only.")


class CheckpointConfig(_Strict):
    """``[checkpoint]``: resumable DCP checkpoints and what to load at start."""

    enable: bool = Field(True, description="Save and load checkpoints at all.")
    folder: str = Field("checkpoints", description="Checkpoints go to <folder>/step-<N>/.")
    interval: int = Field(50, ge=1, description="Save every N steps.")
    keep_latest_k: int = Field(0, ge=0, description="Keep the newest k steps; 0 keeps all.")
    keep_every_n_steps: int = Field(
        0, ge=0, description="With keep_latest_k: also keep every step divisible by N; 0: off."
    )
    keep_steps: list[int] = Field(
        default_factory=list, description="With keep_latest_k: steps never deleted, e.g. [1000]."
    )
    preemption_signal: list[str] = Field(
        default_factory=lambda: ["SIGTERM"],
        description="Signals install_preemption_handler() turns into a save-and-stop; 'none': off.",
    )
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = Field(
        "disabled", description="'disabled', 'async' or 'async_with_pinned_mem'."
    )
    load_step: int = Field(-1, ge=-1, description="Step to resume from; -1: the latest.")
    exclude_from_loading: list[str] = Field(
        default_factory=list, description="States not restored on resume, e.g. ['dataloader']."
    )
    enable_first_step_checkpoint: bool = Field(False, description="Also save at step 1.")
    load_only: bool = Field(False, description="Load at start but never save.")
    preflight: Literal["error", "warn", "off"] = Field(
        "error",
        description="Before step 1, less free space than one checkpoint (+ export) is an "
        "'error', a 'warn'ing, or not checked ('off'). Unwritable folders always fail.",
    )
    on_save_error: Literal["stop", "retry"] = Field(
        "stop",
        description="A save failing on the storage mid-run (disk full, read-only): 'stop' the "
        "run, or log it and 'retry' at the next interval (the last step's always stops).",
    )
    sign_key: str | None = Field(
        default_factory=lambda: os.environ.get("CKPT_SIGN_KEY") or None,
        description="Private ed25519 PEM: sign every saved step and export (env CKPT_SIGN_KEY).",
    )
    verify_key: str | None = Field(
        default_factory=lambda: os.environ.get("CKPT_VERIFY_KEY") or None,
        description="Public ed25519 PEM: load only folders it signed (env CKPT_VERIFY_KEY).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        repr=False,
        description="fsspec options for URI folders (checkpoint, export, loads), e.g. "
        "{endpoint_url = '...', profile = '...'}; default: the standard AWS chain. Never "
        "logged or written to manifests.",
    )
    initial_load: InitialLoadConfig = Field(default_factory=InitialLoadConfig)
    additional_load: list[AdditionalLoadConfig] = Field(default_factory=list)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("keep_latest_k")
    @classmethod
    def _keep_k(cls, value: int) -> int:
        if value == 1:
            raise ValueError(
                "1 is not allowed: an async save may be in flight "
                "while the previous step is deleted. Use 0 (keep all) or 2 or more."
            )
        return value

    @field_validator("keep_steps", mode="before")
    @classmethod
    def _split_steps(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("preemption_signal", mode="before")
    @classmethod
    def _parse_signals(cls, value: Any) -> Any:
        from ckpt_core.policy.preemption import parse_signals, signal_names

        return signal_names(parse_signals(value))

    @field_validator("exclude_from_loading", mode="before")
    @classmethod
    def _split_states(cls, value: Any) -> Any:
        return comma_list(value)

    @model_validator(mode="after")
    def _check_exclusions(self) -> CheckpointConfig:
        excluded = set(self.exclude_from_loading)
        if "model" in excluded:
            raise ValueError(
                "checkpoint.exclude_from_loading may not contain 'model': a resume always "
                "restores the model. Remove it, or start fresh with a new checkpoint.folder."
            )
        if "optimizer" in excluded and "lr_scheduler" not in excluded:
            raise ValueError(
                "checkpoint.exclude_from_loading contains 'optimizer' but not 'lr_scheduler': "
                "restoring a scheduler without its optimizer gives an inconsistent run. "
                "Exclude both."
            )
        return self
