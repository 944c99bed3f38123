"""``Qwen3Args`` / ``MoEArgs`` ↔ Hugging Face ``config.json`` (``qwen3``, ``qwen3_moe``).

Both build on the Llama reading and writing (:mod:`ckpt_core.reference.hf_config`:
sizes, RoPE, norms, tying) and add their own fields. Valid features the
reference models lack (sliding-window attention, attention bias) are a
:class:`ConfigError`; malformed or absurd values a :class:`DamagedCheckpointError`
naming the source, before anything is allocated.
"""

from __future__ import annotations

from typing import Any

from ckpt_core.content.hf_config_checks import check_sizes, damaged_config
from ckpt_core.errors import ConfigError
from ckpt_core.reference.hf_config import check_flags, common_fields, to_hf_config
from ckpt_core.reference.moe import MoEArgs
from ckpt_core.reference.qwen3 import Qwen3Args

#: Sliding-window fields: written as "off", read and refused when on.
_WINDOW_FIELDS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers"})
#: Expert fields of a ``qwen3_moe`` config: ``field -> (MoEArgs field, largest)``.
_MOE_SIZES = {
    "num_experts": ("num_experts", 1 << 16),
    "num_experts_per_tok": ("top_k", 1 << 16),
    "moe_intermediate_size": ("moe_hidden_dim", 1 << 22),
    "decoder_sparse_step": ("decoder_sparse_step", 1 << 12),
}
#: transformers 5 writes ``num_experts`` under this name (its ``attribute_map``).
_NUM_EXPERTS_ALIAS = "num_local_experts"
_MOE_FIELDS = frozenset(_MOE_SIZES) | {"norm_topk_prob", "mlp_only_layers", _NUM_EXPERTS_ALIAS}


def qwen3_to_hf_config(args: Qwen3Args, dtype: str | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of a ``Qwen3ForCausalLM`` with these arguments."""
    own = {"use_sliding_window": False}
    return to_hf_config(args, dtype, architecture="Qwen3ForCausalLM", model_type="qwen3", own=own)


def moe_to_hf_config(args: MoEArgs, dtype: str | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of a ``Qwen3MoeForCausalLM`` with these arguments."""
    own = {
        "use_sliding_window": False,
        "num_experts": args.num_experts,
        "num_experts_per_tok": args.top_k,
        "moe_intermediate_size": args.moe_hidden_dim,
        "norm_topk_prob": args.norm_topk_prob,
        "decoder_sparse_step": args.decoder_sparse_step,
        "mlp_only_layers": list(args.mlp_only_layers),
    }
    return to_hf_config(
        args, dtype, architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe", own=own
    )


def _qwen3_fields(
    config: dict[str, Any], source: str, model_type: str, what: str, own: frozenset[str]
) -> dict[str, Any]:
    """Checks shared by both model types, then the common fields."""
    check_sizes(config, source=source)
    found = config.get("model_type", model_type)
    if found != model_type:
        raise ConfigError(f"config.json model_type is {found!r}; {what} reads {model_type!r} only.")
    check_flags(config, source, ("attention_bias", "tie_word_embeddings", "use_sliding_window"))
    if config.get("attention_bias"):
        raise ConfigError(f"config.json attention_bias=true is not supported by {what}.")
    if config.get("use_sliding_window"):
        raise ConfigError(
            f"config.json use_sliding_window=true: {what} has full attention in every layer; "
            "set it to false (or train the model with transformers: docs/hf.md)."
        )
    layer_types = config.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or set(layer_types) - {"full_attention"}
    ):
        raise ConfigError(
            f"config.json layer_types {str(layer_types)[:80]}: {what} has only "
            "'full_attention' layers."
        )
    return common_fields(config, source=source, what=what, own_fields=_WINDOW_FIELDS | own)


def qwen3_from_hf_config(config: dict[str, Any], *, source: str = "config.json") -> Qwen3Args:
    """``Qwen3Args`` from a ``qwen3`` ``config.json`` dict; unsupported features are errors."""
    return Qwen3Args(**_qwen3_fields(config, source, "qwen3", "the reference Qwen3", frozenset()))


def moe_from_hf_config(config: dict[str, Any], *, source: str = "config.json") -> MoEArgs:
    """``MoEArgs`` from a ``qwen3_moe`` ``config.json`` dict; malformed expert fields refused."""
    fields = _qwen3_fields(config, source, "qwen3_moe", "the reference MoE", _MOE_FIELDS)
    alias = config.get(_NUM_EXPERTS_ALIAS)
    if alias is not None and config.get("num_experts", alias) != alias:
        raise damaged_config(
            source,
            f"num_experts ({config['num_experts']!r}) and {_NUM_EXPERTS_ALIAS} ({alias!r}) differ",
        )
    for name, (arg, largest) in _MOE_SIZES.items():
        value = config.get(name)
        if name == "num_experts" and value is None:
            value = alias
        if value is None:
            continue
        if type(value) is not int or not 1 <= value <= largest:
            raise damaged_config(
                source, f"{name} is {value!r}; it must be an integer from 1 to {largest}"
            )
        fields[arg] = value
    if fields.get("top_k", 8) > fields.get("num_experts", 128):
        raise damaged_config(
            source,
            f"num_experts_per_tok ({fields.get('top_k', 8)}) exceeds num_experts "
            f"({fields.get('num_experts', 128)})",
        )
    check_flags(config, source, ("norm_topk_prob",))
    # transformers' defaults where the config is silent
    fields.setdefault("num_experts", 128)
    fields.setdefault("top_k", 8)
    fields.setdefault("moe_hidden_dim", 768)
    fields["norm_topk_prob"] = bool(config.get("norm_topk_prob", False))
    dense = config.get("mlp_only_layers") or []
    n_layers = fields["n_layers"]
    if not isinstance(dense, list) or any(
        type(i) is not int or not 0 <= i < n_layers for i in dense
    ):
        raise damaged_config(
            source,
            f"mlp_only_layers is {str(dense)[:80]}; it must list layer numbers from 0 to "
            f"{n_layers - 1}",
        )
    fields["mlp_only_layers"] = sorted(set(dense))
    return MoEArgs(**fields)
