"""Contract tests run over every installed converter."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from ckpt_core import Converters
from ckpt_core.discovery import discover_converters
from ckpt_core.hookspecs import HOOK_NAMES

ENTRIES = discover_converters()


@pytest.fixture(params=sorted(ENTRIES), ids=sorted(ENTRIES))
def converter_class(request):
    return request.param, ENTRIES[request.param].load()


def test_bundled_converters_are_installed():
    assert {"lora", "qat", "float8"} <= set(ENTRIES)


def test_name_config_and_options_follow_the_protocol(converter_class):
    name, cls = converter_class
    assert cls.name == name
    assert issubclass(cls.Config, BaseModel)
    defaults = cls.Config()  # every option has a default
    with pytest.raises(ValidationError):
        cls.Config(definitely_not_an_option=1)
    for field_name, field in cls.Config.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"
    assert cls(defaults).config == defaults


def test_hookimpls_validate_and_default_instance_composes(converter_class):
    name, cls = converter_class
    convs = Converters([cls(cls.Config())])
    assert convs.names == [name]
    impls = [
        hook for hook in HOOK_NAMES if getattr(convs.plugin_manager.hook, hook).get_hookimpls()
    ]
    assert set(impls) <= set(HOOK_NAMES)
    for earlier in getattr(cls, "runs_after", ()):
        assert isinstance(earlier, str)


def test_from_config_builds_each_converter_by_name(converter_class):
    name, _ = converter_class
    assert Converters.from_config([name]).names == [name]
