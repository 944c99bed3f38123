"""Named sizes of the reference Llama.

* ``tiny``: tests (a few hundred thousand parameters).
* ``debug``: the reference trainer's default, a few million parameters; every
  linear dimension is a multiple of 128 so Float8 and QAT group size 128 apply.
* ``small`` (~100M), ``1b`` (~1.2B): benchmarks.

Llama 3 rope scaling is on in ``debug`` and above so that path is exercised, scaled as
Llama 3.1 is: ``factor`` times the original context is the flavor's ``max_seq_len``
(transformers warns when the original context is not below ``max_position_embeddings``).
"""

from __future__ import annotations

import copy

from ckpt_core.reference.model import ModelArgs


def _llama3_scaling(max_seq_len: int, factor: float = 8.0) -> dict[str, float | int]:
    """Llama 3 rope scaling that stretches ``max_seq_len / factor`` positions to ``max_seq_len``."""
    return {
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(max_seq_len // factor),
    }


FLAVORS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=256
    ),
    "debug": ModelArgs(
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=2048,
        ffn_hidden_dim=768,
        rope_theta=500000.0,
        rope_scaling=_llama3_scaling(2048),
        max_seq_len=2048,
    ),
    "small": ModelArgs(
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        vocab_size=32768,
        ffn_hidden_dim=2048,
        rope_theta=500000.0,
        rope_scaling=_llama3_scaling(4096),
        max_seq_len=4096,
    ),
    "1b": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_hidden_dim=8192,
        rope_theta=500000.0,
        rope_scaling=_llama3_scaling(8192),
        max_seq_len=8192,
        tie_word_embeddings=True,
    ),
}


def flavor_args(name: str) -> ModelArgs:
    """A copy of the named flavor's arguments; unknown names list the known ones."""
    from ckpt_core.errors import ConfigError

    if name not in FLAVORS:
        raise ConfigError(
            f"model.name: unknown flavor {name!r}; known flavors: {', '.join(FLAVORS)}, "
            "or a path to a Hugging Face Llama folder or config.json."
        )
    return copy.deepcopy(FLAVORS[name])
