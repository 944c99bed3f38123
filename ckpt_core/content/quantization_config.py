"""Composing compressed-tensors ``quantization_config`` entries of ``config.json``.

A quantizing converter's adapter (QAT, Float8 with ``export = "fp8"``) describes its
export with one ``quantization_config``: config groups targeting ``Linear`` and an
``ignore`` list naming every linear it left alone. When two such converters are
enabled on different linears, the second must not overwrite the first (transformers
would then read the first converter's tensors with the second's scheme and initialize
them randomly). :func:`add_quantization_config` merges them instead into one config
whose groups name their modules explicitly, with ``format = "mixed-precision"`` when
the groups' formats differ; compressed-tensors decompresses each module by its own
group's format.

Every config stored is *complete* (:func:`complete_quantization_config`): it carries
every field compressed-tensors' own ``QuantizationConfig`` / ``QuantizationArgs`` models
have and llm-compressor writes (``version``, ``sparsity_config``, ``transform_config``,
``moe_sparsity_config``, and per scheme ``observer``, ``observer_kwargs``, ``actorder``,
``block_structure``, ``scale_dtype``, ``zp_dtype``), so a consumer that requires them reads
it as it reads llm-compressor's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from ckpt_core.errors import PluginError, first_of

KEY = "quantization_config"
MIXED = "mixed-precision"
#: The one class target the bundled converters write; merging turns it into module names.
LINEAR = "Linear"
#: The compressed-tensors release whose config fields these configs follow (``version``).
FORMAT_VERSION = "0.20.0"
#: Top-level fields and their defaults, as llm-compressor writes them.
_CONFIG_DEFAULTS: dict[str, Any] = {
    "version": FORMAT_VERSION,
    "quant_method": "compressed-tensors",
    "sparsity_config": {},
    "transform_config": {},
    "kv_cache_scheme": None,
    "global_compression_ratio": None,
    "ignore": [],
    "moe_sparsity_config": None,
}
_SCHEME_DEFAULTS: dict[str, Any] = {
    "weights": None,
    "input_activations": None,
    "output_activations": None,
    "format": None,
}
_ARGS_DEFAULTS: dict[str, Any] = {
    "group_size": None,
    "strategy": None,
    "block_structure": None,
    "dynamic": False,
    "actorder": None,
    "scale_dtype": None,
    "zp_dtype": None,
    "observer_kwargs": {},
}
#: Observer of static (calibrated once per tensor) quantization; dynamic has none.
STATIC_OBSERVER = "memoryless_minmax"


def complete_quantization_config(qc: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``qc`` with every field llm-compressor writes, missing ones at their defaults.

    Per ``QuantizationArgs`` the observer is ``memoryless_minmax`` for static
    quantization and none for dynamic, as llm-compressor records for the schemes the
    bundled converters export.
    """
    out = copy.deepcopy(qc)
    for key, default in _CONFIG_DEFAULTS.items():
        out.setdefault(key, copy.deepcopy(default))
    for scheme in out.get("config_groups", {}).values():
        if not isinstance(scheme, dict):
            continue
        for key, default in _SCHEME_DEFAULTS.items():
            scheme.setdefault(key, default)
        for role in ("weights", "input_activations", "output_activations"):
            args = scheme.get(role)
            if isinstance(args, dict):
                args = {**copy.deepcopy(_ARGS_DEFAULTS), **args}
                args.setdefault("observer", None if args["dynamic"] else STATIC_OBSERVER)
                scheme[role] = args
    return out


def add_quantization_config(
    config: dict[str, Any], qc: dict[str, Any], quantized: Iterable[str], owner: str
) -> dict[str, Any]:
    """Return ``config`` (a ``config.json`` dict) with ``qc`` added under ``quantization_config``.

    Args:
        config: ``config.json`` content so far; not modified.
        qc: this converter's ``quantization_config`` (groups targeting ``Linear``,
            ``ignore`` listing every linear it did not quantize, under HF names).
        quantized: HF module names this converter quantized.
        owner: the converter's name, for error messages.

    With no ``quantization_config`` in ``config`` yet, ``qc`` is stored (completed).
    Otherwise both are merged: each group targets the HF module names it
    quantizes, ``ignore`` keeps the linears neither quantized, and a module that
    both quantize is a :class:`PluginError` naming them.
    """
    out = copy.deepcopy(config)
    existing = out.get(KEY)
    if existing is None:
        out[KEY] = complete_quantization_config(qc)
        return out
    out[KEY] = complete_quantization_config(
        merge_quantization_configs(existing, qc, quantized, owner)
    )
    return out


def merge_quantization_configs(
    existing: dict[str, Any], qc: dict[str, Any], quantized: Iterable[str], owner: str
) -> dict[str, Any]:
    """One compressed-tensors config holding the groups of ``existing`` and of ``qc``."""
    mine = list(dict.fromkeys(quantized))
    for name, value in (("existing", existing), (owner, qc)):
        method = value.get("quant_method")
        if method != "compressed-tensors":
            raise PluginError(
                f"Converter {owner!r}: cannot merge its quantization_config with one whose "
                f"quant_method is {method!r} (from {name}); only compressed-tensors configs "
                "compose. Enable one quantizing export at a time."
            )
    # Every linear of the model: what this converter quantized plus what it ignored.
    linears = set(mine) | set(qc.get("ignore", []))
    old_ignore = list(existing.get("ignore", []))
    theirs = sorted(linears.difference(old_ignore))

    groups = _explicit_groups(existing, theirs)
    claimed = {t for g in groups for t in g.get("targets", [])}
    both = sorted(claimed.intersection(mine))
    if both:
        shown = first_of(both, 5)
        raise PluginError(
            f"Converter {owner!r} and an earlier quantizing converter both quantize {shown} "
            "in the export; a linear can carry one quantization scheme. Keep each linear in "
            "one converter's targets (e.g. float8 filter_fqns, qat targets)."
        )
    groups = [g for g in groups + _explicit_groups(qc, mine) if g.get("targets")]

    formats = {g["format"] for g in groups}
    new_ignore = set(qc.get("ignore", []))
    merged = copy.deepcopy(existing)
    merged["config_groups"] = {f"group_{i}": g for i, g in enumerate(groups)}
    merged["ignore"] = [n for n in old_ignore if n in new_ignore]
    merged["format"] = formats.pop() if len(formats) == 1 else MIXED
    if merged.get("kv_cache_scheme") is None:
        merged["kv_cache_scheme"] = qc.get("kv_cache_scheme")
    return merged


def _explicit_groups(config: dict[str, Any], modules: list[str]) -> list[dict[str, Any]]:
    """Copies of ``config``'s groups: a ``Linear`` target becomes ``modules``, and each
    group states its format (``config``'s own when the group has none)."""
    groups = []
    for group in config.get("config_groups", {}).values():
        group = copy.deepcopy(group)
        if group.get("targets") == [LINEAR]:
            group["targets"] = list(modules)
        group["format"] = group.get("format") or config.get("format")
        groups.append(group)
    return groups
