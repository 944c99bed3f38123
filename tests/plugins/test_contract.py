"""The contract kit (``ckpt_core.testing.check_converter``) over every installed converter.

The bundled converters pass it under their export options; each converter of
``_broken_converters`` breaks one rule and must fail it with that rule's id.
"""

from __future__ import annotations

import re

import pytest
from torch import nn

from ckpt_core.protocol.discovery import discover_converters
from ckpt_core.testing import RULES, check_converter
from tests.plugins._broken_converters import BROKEN, Averaging

ENTRIES = discover_converters()


def test_bundled_converters_are_installed():
    assert {"lora", "qat", "float8"} <= set(ENTRIES)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_installed_converter_keeps_the_contract(name):
    check_converter(name)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("lora", {"export": "adapter"}),
        ("lora", {"export": "both", "rank": 4, "alpha": 8.0}),
        ("qat", {"scheme": "int8_dynamic_act_int4_weight", "group_size": 32}),
        ("qat", {"scheme": "int8_weight_only"}),
        ("float8", {"emulate": True, "export": "fp8"}),
        ("float8", {"emulate": True, "recipe": "rowwise", "export": "fp8"}),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_bundled_converters_keep_the_contract_under_their_export_options(name, options):
    check_converter(name, options=options)


def test_bundled_converters_keep_the_contract_on_another_family():
    check_converter("lora", model="qwen3:tiny")


def test_a_converter_class_keeps_the_contract_on_the_callers_own_model():
    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    check_converter(Averaging, model_factory=factory)
    check_converter(Averaging)


def test_every_rule_has_a_broken_converter_that_fails_it():
    assert set(BROKEN.values()) == set(RULES)


@pytest.mark.parametrize(
    ("broken", "rule"), list(BROKEN.items()), ids=lambda v: getattr(v, "__name__", v)
)
def test_a_broken_converter_fails_the_kit_naming_its_rule(broken, rule):
    with pytest.raises(AssertionError, match=re.escape(f"[{rule}]")) as info:
        check_converter(broken)
    assert RULES[rule] in str(info.value)


def test_an_unknown_name_fails_naming_the_installed_converters():
    with pytest.raises(AssertionError, match=r"\[composes\].*installed: .*lora"):
        check_converter("no-such-converter")
