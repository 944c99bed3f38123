"""The architecture of a torchtitan Llama 3, as the ``config.json`` ckpt's ``llama`` family reads.

A torchtitan step folder holds no description of its model, so it comes from
one of:

* a flavor of torchtitan 0.3's ``llama3`` registry: ``llama3:debugmodel``,
  ``llama3:1B`` ... ``llama3:405B`` (:data:`LLAMA3_FLAVORS`, copied from its
  ``config_registry``; the ``llama3:`` prefix is optional);
* a TOML or JSON file of torchtitan's model arguments (``dim``, ``n_layers``,
  ``n_heads``, ``n_kv_heads``, ``vocab_size``, ``multiple_of``,
  ``ffn_dim_multiplier`` or ``ffn_hidden_dim``, ``norm_eps``, ``rope_theta``,
  ``rope_scaling``, ``enable_weight_tying``, ``max_seq_len``), at the top level
  or in a ``[model]`` table; a torchtitan ≤ 0.2 job file's ``[model]`` with
  ``name = "llama3"`` and ``flavor`` names a flavor;
* torchtitan's own ``Llama3Model.Config`` object (:func:`from_model_config`),
  for a script that has torchtitan imported.

The feed-forward width follows torchtitan's ``compute_ffn_hidden_dim``:
``multiple_of`` rounding of ``ffn_dim_multiplier * int(8 * dim / 3)``.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from ckpt_core.errors import ConfigError

_LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

#: torchtitan 0.3's ``llama3`` flavors (its ``config_registry``), as model arguments.
LLAMA3_FLAVORS: dict[str, dict[str, Any]] = {
    "debugmodel": dict(dim=256, n_layers=6, n_heads=16, vocab_size=2048, multiple_of=256),
    "1B": dict(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.5, enable_weight_tying=True,
    ),
    "3B": dict(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.0, enable_weight_tying=True,
    ),
    "8B": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
        ffn_dim_multiplier=1.3,
    ),
    "70B": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
        ffn_dim_multiplier=1.3,
    ),
    "405B": dict(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256,
        multiple_of=4096, ffn_dim_multiplier=1.2,
    ),
}  # fmt: skip

#: Model arguments and their defaults (torchtitan 0.3's Llama 3 values).
DEFAULTS: dict[str, Any] = {
    "n_kv_heads": None,
    "head_dim": None,
    "multiple_of": 256,
    "ffn_dim_multiplier": None,
    "ffn_hidden_dim": None,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": "llama",
    "enable_weight_tying": False,
    "max_seq_len": 131072,
}
REQUIRED = ("dim", "n_layers", "n_heads", "vocab_size")


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as torchtitan computes it."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _scaling(value: Any, source: str) -> dict[str, Any] | None:
    if value in (None, False, "none", "default"):
        return None
    if value in (True, "llama", "llama3"):
        return dict(_LLAMA3_SCALING)
    if isinstance(value, Mapping):
        names = {"scaling_factor": "factor"}
        scaling = dict(_LLAMA3_SCALING)
        for key, v in value.items():
            key = names.get(key, key)
            if key not in scaling:
                raise ConfigError(
                    f"{source}: rope_scaling field {key!r} is unknown; allowed: "
                    f"scaling_factor, {', '.join(list(_LLAMA3_SCALING)[1:])}."
                )
            scaling[key] = v
        return scaling
    raise ConfigError(
        f"{source}: rope_scaling {value!r} is not 'llama', 'none', true/false or a table of "
        "llama scaling parameters."
    )


def hf_config(args: Mapping[str, Any], *, source: str = "model arguments") -> dict[str, Any]:
    """The Llama ``config.json`` dict of torchtitan model arguments (checked, defaults filled)."""
    unknown = sorted(k for k in args if k not in DEFAULTS and k not in REQUIRED)
    if unknown:
        raise ConfigError(
            f"{source}: unknown torchtitan model argument(s) {unknown}; known: "
            f"{', '.join((*REQUIRED, *DEFAULTS))}."
        )
    missing = [k for k in REQUIRED if k not in args]
    if missing:
        raise ConfigError(f"{source}: torchtitan model arguments lack {missing}.")
    a = {**DEFAULTS, **args}
    for key in (*REQUIRED, "multiple_of"):
        if type(a[key]) is not int or a[key] <= 0:
            raise ConfigError(f"{source}: {key} is {a[key]!r}; it must be a positive integer.")
    n_kv = a["n_kv_heads"] or a["n_heads"]
    hidden = a["ffn_hidden_dim"] or ffn_hidden_dim(
        a["dim"], a["multiple_of"], a["ffn_dim_multiplier"]
    )
    rope: dict[str, Any] = {"rope_theta": float(a["rope_theta"]), "rope_type": "default"}
    scaling = _scaling(a["rope_scaling"], source)
    if scaling is not None:
        rope.update(rope_type="llama3", **scaling)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a["dim"],
        "intermediate_size": hidden,
        "num_hidden_layers": a["n_layers"],
        "num_attention_heads": a["n_heads"],
        "num_key_value_heads": n_kv,
        "head_dim": a["head_dim"] or a["dim"] // a["n_heads"],
        "vocab_size": a["vocab_size"],
        "rms_norm_eps": float(a["norm_eps"]),
        "rope_parameters": rope,
        "max_position_embeddings": a["max_seq_len"],
        "tie_word_embeddings": bool(a["enable_weight_tying"]),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def flavor_args(name: str) -> dict[str, Any] | None:
    """Model arguments of a torchtitan flavor (``llama3:8B`` or ``8B``), or ``None``."""
    family, _, flavor = name.rpartition(":")
    if family not in ("", "llama3"):
        return None
    return dict(LLAMA3_FLAVORS[flavor]) if flavor in LLAMA3_FLAVORS else None


def from_file(path: str) -> dict[str, Any]:
    """The ``config.json`` dict of a TOML or JSON file of torchtitan model arguments."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f) if path.endswith(".toml") else json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: not a readable TOML/JSON file of model arguments ({exc})."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of torchtitan model arguments.")
    table = data.get("model", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [model] is not a table.")
    if "flavor" in table:  # a torchtitan job file: [model] name, flavor
        name = str(table.get("name", "llama3"))
        args = flavor_args(f"{name}:{table['flavor']}")
        if args is None:
            raise ConfigError(
                f"{path}: [model] name = {name!r}, flavor = {table['flavor']!r} is not a "
                f"torchtitan Llama 3 flavor ({', '.join(LLAMA3_FLAVORS)}); give the model "
                "arguments instead (dim, n_layers, n_heads, ...)."
            )
        return hf_config(args, source=path)
    return hf_config(table, source=path)


def from_spec(spec: str) -> dict[str, Any] | None:
    """``config.json`` dict of a torchtitan flavor or model-arguments file, else ``None``."""
    args = flavor_args(spec)
    if args is not None:
        return hf_config(args, source=spec)
    if spec.endswith((".toml", ".json")) and os.path.isfile(spec):
        if spec.endswith(".json"):
            with open(spec, "rb") as f:
                try:
                    data = json.load(f)
                except ValueError:
                    data = None
            if isinstance(data, dict) and "model_type" in data:
                return None  # an HF config.json: the model families read it
        return from_file(spec)
    return None


def from_model_config(config: Any) -> dict[str, Any]:
    """The ``config.json`` dict of a torchtitan ``Llama3Model.Config`` object."""
    layer = config.layers[0]
    attn = layer.attention
    rope = attn.rope
    scaling: Any = None
    if getattr(rope, "scaling", "none") == "llama":
        scaling = {
            "scaling_factor": rope.scaling_factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    elif getattr(rope, "scaling", "none") != "none":
        raise ConfigError(
            f"torchtitan rope scaling {rope.scaling!r} is not supported (llama, none)."
        )
    return hf_config(
        {
            "dim": config.dim,
            "n_layers": len(config.layers),
            "n_heads": attn.n_heads,
            "n_kv_heads": attn.n_kv_heads,
            "head_dim": attn.head_dim,
            "vocab_size": config.vocab_size,
            "ffn_hidden_dim": layer.feed_forward.w1.out_features,
            "norm_eps": layer.attention_norm.eps,
            "rope_theta": rope.theta,
            "rope_scaling": scaling,
            "enable_weight_tying": bool(config.enable_weight_tying),
            "max_seq_len": rope.max_seq_len,
        },
        source="torchtitan Llama3Model.Config",
    )
