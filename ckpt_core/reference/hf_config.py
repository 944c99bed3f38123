"""``ModelArgs`` ↔ Hugging Face ``config.json`` for Llama.

Writes the transformers 5 form (``rope_parameters`` holding ``rope_theta`` and
the scaling, ``dtype``) and reads both that and the older form (top-level
``rope_theta``, ``rope_scaling`` with ``type`` or ``rope_type``).
"""

from __future__ import annotations

from typing import Any

from ckpt_core.content.hf_config_checks import SIZE_FIELDS, check_sizes
from ckpt_core.content.hf_config_checks import damaged_config as _damaged
from ckpt_core.errors import ConfigError
from ckpt_core.reference.model import ModelArgs
from ckpt_core.storage.hf_config_file import is_hf_path, read_hf_config

__all__ = [
    "SIZE_FIELDS",
    "check_flags",
    "check_sizes",
    "common_fields",
    "from_hf_config",
    "is_hf_path",
    "read_hf_config",
    "to_hf_config",
]

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# Fields we produce ourselves; everything else of a source config is carried over.
_OWN_FIELDS = {
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "tie_word_embeddings",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "quantization_config",
}


#: Entries of a Llama ``config.json`` that families built on the same model lack.
LLAMA_ONLY: dict[str, Any] = {"mlp_bias": False}


def to_hf_config(
    args: ModelArgs,
    dtype: str | None = None,
    *,
    architecture: str = "LlamaForCausalLM",
    model_type: str = "llama",
    own: dict[str, Any] = LLAMA_ONLY,
) -> dict[str, Any]:
    """The ``config.json`` dict of a ``LlamaForCausalLM`` with these arguments.

    Families built on the reference model (Qwen3) pass their ``architecture``,
    ``model_type`` and ``own`` entries instead of the Llama-only ones.
    """
    rope: dict[str, Any] = {"rope_theta": float(args.rope_theta), "rope_type": "default"}
    if args.rope_scaling:
        rope["rope_type"] = "llama3"
        rope.update({k: args.rope_scaling[k] for k in LLAMA3_KEYS})
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        **own,
    }
    for key, value in args.extra_hf_config.items():
        config.setdefault(key, value)
    if dtype is not None:
        config["dtype"] = dtype
    return config


def _number(rope: dict[str, Any], key: str, source: str) -> float:
    value = rope[key]
    if type(value) not in (int, float) or not 0 < value < float("inf"):
        raise _damaged(source, f"rope parameter {key} is {value!r}; it must be a positive number")
    return float(value)


def from_hf_config(config: dict[str, Any], *, source: str = "config.json") -> ModelArgs:
    """``ModelArgs`` from a Llama ``config.json`` dict; unsupported features are errors.

    Malformed fields (:func:`check_sizes`) are a :class:`DamagedCheckpointError`
    naming ``source``; valid features the reference Llama lacks are a :class:`ConfigError`.
    """
    check_sizes(config, source=source)
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(
            f"config.json model_type is {model_type!r}; the reference model reads 'llama' only."
        )
    check_flags(config, source, ("attention_bias", "mlp_bias", "tie_word_embeddings"))
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(f"config.json {flag}=true is not supported by the reference Llama.")
    return ModelArgs(**common_fields(config, source=source, what="the reference Llama"))


def check_flags(config: dict[str, Any], source: str, flags: tuple[str, ...]) -> None:
    """Refuse ``flags`` present with a value other than true/false (a string ``'no'`` is truthy)."""
    for flag in flags:
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            raise _damaged(source, f"{flag} is {config[flag]!r}; it must be true or false")


def common_fields(
    config: dict[str, Any],
    *,
    source: str,
    what: str,
    own_fields: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """:class:`ModelArgs` fields of a checked ``config.json`` of a Llama-like model.

    Sizes, norms, RoPE (``default`` or ``llama3``) and tying; ``what`` names the
    model in errors; fields outside the Llama ones and ``own_fields`` are kept in
    ``extra_hf_config`` for a faithful re-export.
    """
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json hidden_act is {act!r}; {what} uses 'silu'.")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise _damaged(source, f"rope parameters are {rope!r}, not an object")
    rope = dict(rope)
    if "rope_theta" in rope:
        _number(rope, "rope_theta", source)
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_KEYS if k not in rope and k != LLAMA3_KEYS[3]]
        if missing:
            raise ConfigError(f"config.json rope parameters of type 'llama3' lack {missing}.")
        scaling = {k: _number(rope, k, source) for k in LLAMA3_KEYS[:3]}
        scaling[LLAMA3_KEYS[3]] = rope.get(
            LLAMA3_KEYS[3], config.get("max_position_embeddings", 2048)
        )
        if rope.get(LLAMA3_KEYS[3]) is not None:
            _number(rope, LLAMA3_KEYS[3], source)
        if scaling["low_freq_factor"] == scaling["high_freq_factor"]:
            raise _damaged(source, "rope low_freq_factor equals high_freq_factor")
    elif rope_type != "default":
        raise ConfigError(
            f"config.json rope_type {rope_type!r} is not supported; allowed: 'default', 'llama3'."
        )
    n_heads = config["num_attention_heads"]
    extra = {k: v for k, v in config.items() if k not in _OWN_FIELDS and k not in own_fields}
    return dict(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        vocab_size=config["vocab_size"],
        ffn_hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=config.get("tie_word_embeddings") or False,
        extra_hf_config=extra,
    )
