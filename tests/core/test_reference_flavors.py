"""The reference flavors' config.json load in transformers without a warning."""

from __future__ import annotations

import logging

import pytest

from ckpt_core.reference import LlamaStateDictAdapter
from ckpt_core.reference.flavors import FLAVORS, flavor_args


@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_a_flavors_rope_scaling_fits_its_context(name):
    args = flavor_args(name)
    if args.rope_scaling:
        original = args.rope_scaling["original_max_position_embeddings"]
        assert original < args.max_seq_len
        assert original * args.rope_scaling["factor"] == args.max_seq_len


@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_a_flavors_config_json_loads_in_transformers_without_warnings(name):
    import transformers

    config = LlamaStateDictAdapter(flavor_args(name)).hf_config()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        transformers.LlamaConfig(**config)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
