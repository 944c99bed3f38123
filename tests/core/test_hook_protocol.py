"""The hook protocol carries a version, and a deprecated hook warns through pluggy."""

from __future__ import annotations

import types
import warnings

import pluggy
import pytest

from ckpt_core import Converter, ConverterSet, PluginError, hookimpl
from ckpt_core.protocol.hookspecs import (
    HOOK_PROTOCOL_VERSION,
    OLDEST_HOOK_PROTOCOL,
    PROJECT_NAME,
    hookspec,
)


class Plain(Converter):
    name = "plain"

    @hookimpl
    def key_filter(self, fqn: str) -> bool:
        return False


def test_a_converter_that_says_nothing_is_taken_as_written_for_protocol_one():
    assert Plain.hook_protocol == 1 <= HOOK_PROTOCOL_VERSION
    assert ConverterSet([Plain()]).names == ["plain"]


def test_a_converter_written_for_a_newer_protocol_is_refused_naming_the_upgrade(monkeypatch):
    class Future(Plain):
        hook_protocol = HOOK_PROTOCOL_VERSION + 1

    with pytest.raises(PluginError, match=r"'plain' was written for hook protocol 2.*upgrade"):
        ConverterSet([Future()])


def test_a_converter_written_for_a_protocol_no_longer_run_is_refused(monkeypatch):
    spec = "ckpt_core.protocol.hookspecs"
    monkeypatch.setattr(f"{spec}.OLDEST_HOOK_PROTOCOL", OLDEST_HOOK_PROTOCOL + 1)
    monkeypatch.setattr(f"{spec}.HOOK_PROTOCOL_VERSION", OLDEST_HOOK_PROTOCOL + 1)
    with pytest.raises(PluginError, match="no longer runs .*upgrade the plugin"):
        ConverterSet([Plain()])


def test_a_hook_marked_deprecated_warns_when_a_converter_implements_it():
    # The deprecation path the protocol documents, with ckpt's own markers.
    specs = types.SimpleNamespace(
        old_hook=hookspec(warn_on_impl=DeprecationWarning("old_hook goes in 0.3; use new_hook"))(
            lambda model: None
        )
    )

    class UsesOldHook:
        @hookimpl
        def old_hook(self, model):
            return None

    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(specs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.register(UsesOldHook())
    assert any("old_hook goes in 0.3" in str(w.message) for w in caught)
