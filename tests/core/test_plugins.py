"""Discovery, validation and composition of converters (ckpt_core.protocol.plugin_host)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from ckpt_core import ConfigError, Converter, ConverterSet, PluginError, hookimpl
from ckpt_core.protocol.discovery import discover_converters

GOOD = """
from typing import ClassVar
from pydantic import Field
from ckpt_core import Converter, ConverterOptions, hookimpl

class Tag(Converter):
    name: ClassVar[str] = "tag"
    class Config(ConverterOptions):
        suffix: str = Field("x", description="suffix")
    @hookimpl
    def key_filter(self, fqn):
        return fqn.endswith(".tag")
"""


class Recorder(Converter):
    """Test converter that records hook calls into a shared list."""

    name = "rec"
    calls: list = []

    def __init__(self, config=None, name: str = "rec"):
        super().__init__(config)
        self.name = name

    @hookimpl
    def convert(self, model):
        self.calls.append(("convert", self.name))

    @hookimpl
    def state_dict_transform(self, state_dict):
        self.calls.append(("transform", self.name))
        out = dict(state_dict)
        out[f"by_{self.name}"] = torch.zeros(1)
        return out

    @hookimpl
    def post_optimizer_step(self, model_parts):
        self.calls.append(("post", self.name))


def test_hooks_compose_in_config_order_and_transforms_in_reverse():
    Recorder.calls = []
    convs = ConverterSet([Recorder(name="a"), Recorder(name="b")])
    convs.convert(nn.Linear(2, 2))
    out = convs.state_dict_transform({})
    convs.post_optimizer_step([nn.Linear(2, 2)])
    assert Recorder.calls == [
        ("convert", "a"),
        ("convert", "b"),
        ("transform", "b"),
        ("transform", "a"),
        ("post", "a"),
        ("post", "b"),
    ]
    assert set(out) == {"by_a", "by_b"}


def test_unknown_converter_lists_installed_ones_and_the_distribution():
    with pytest.raises(ConfigError) as err:
        ConverterSet.from_config(["lorra"])
    msg = str(err.value)
    assert "unknown converter 'lorra'. Did you mean 'lora'?" in msg
    installed = msg.split("Installed converters: ", 1)[1].split(".", 1)[0].split(", ")
    assert {"float8", "lora", "qat"} <= set(installed)
    assert "install the distribution that provides it" in msg and "ckpt-plugins-lora" in msg


def test_invalid_option_names_converter_option_and_reason():
    with pytest.raises(ConfigError) as err:
        ConverterSet.from_config(["lora"], {"lora": {"rank": 0, "bogus": 1}})
    msg = str(err.value)
    assert "Converter 'lora' option 'rank'" in msg
    assert "Converter 'lora' option 'bogus': unknown option; options: rank, alpha" in msg


def test_list_options_given_as_comma_separated_text_become_lists():
    convs = ConverterSet.from_config(["qat", "lora"], {"qat": {"targets": "wq, wv"}})
    assert convs["qat"].config.targets == ["wq", "wv"]
    with pytest.raises(ConfigError, match="Converter 'lora' option 'rank'"):
        ConverterSet.from_config(["lora"], {"lora": {"rank": "8,9"}})  # not a list option


def test_ordering_constraint_names_both_converters():
    with pytest.raises(ConfigError) as err:
        ConverterSet.from_config(["lora", "qat"])
    assert "'qat' must come before 'lora'" in str(err.value)


def test_discovery_finds_an_installed_distribution_and_imports_lazily(fake_dist):
    fake_dist("tag-dist", {"tag": "tagmod:Tag"}, {"tagmod": GOOD})
    found = discover_converters()
    assert found["tag"].distribution == "tag-dist"
    assert "tagmod" not in sys.modules  # listing does not import
    convs = ConverterSet.from_config(["tag"], {"tag": {"suffix": "y"}})
    assert convs["tag"].config.suffix == "y"
    assert convs.key_filter("a.tag") and not convs.key_filter("a.weight")


def test_two_distributions_claiming_one_name_is_an_error_naming_both(fake_dist):
    fake_dist("first-dist", {"tag": "tagmod:Tag"}, {"tagmod": GOOD})
    fake_dist("second-dist", {"tag": "othermod:Tag"}, {"othermod": GOOD})
    with pytest.raises(PluginError) as err:
        ConverterSet.from_config(["tag"])
    msg = str(err.value)
    assert "'tag' is claimed by two distributions" in msg
    assert "'first-dist' (tagmod:Tag)" in msg and "'second-dist' (othermod:Tag)" in msg
    assert ConverterSet.from_config(["lora"]).names == ["lora"]  # other runs are unaffected
    assert "tagmod" not in sys.modules and "othermod" not in sys.modules


def test_plugin_that_fails_to_import_breaks_only_runs_that_enable_it(fake_dist):
    fake_dist("broken-dist", {"broken": "brokenmod:X"}, {"brokenmod": "raise ImportError('no')"})
    ConverterSet.from_config(["lora"])  # unaffected
    with pytest.raises(PluginError) as err:
        ConverterSet.from_config(["broken"])
    assert "broken-dist" in str(err.value) and "ImportError" in str(err.value)


def test_class_without_config_or_name_is_rejected(fake_dist):
    src = "class NoConfig:\n    name = 'nocfg'\n"
    fake_dist("nocfg-dist", {"nocfg": "nocfgmod:NoConfig"}, {"nocfgmod": src})
    with pytest.raises(PluginError, match="Config"):
        ConverterSet.from_config(["nocfg"])
    src1 = "class NoName:\n    class Config:\n        pass\n"
    fake_dist("noname-dist", {"noname": "nonamemod:NoName"}, {"nonamemod": src1})
    with pytest.raises(PluginError) as err:
        ConverterSet.from_config(["noname"])
    assert "'noname'" in str(err.value) and "noname-dist" in str(err.value)
    assert "no string 'name'" in str(err.value)
    src2 = GOOD.replace('name: ClassVar[str] = "tag"', 'name: ClassVar[str] = "other"')
    fake_dist("misnamed-dist", {"misnamed": "misnamedmod:Tag"}, {"misnamedmod": src2})
    with pytest.raises(PluginError, match="'other'"):
        ConverterSet.from_config(["misnamed"])


def test_hookimpl_with_wrong_signature_names_plugin_and_hook():
    class Bad(Converter):
        name = "bad"

        @hookimpl
        def key_filter(self, key):  # spec argument is 'fqn'
            return False

    with pytest.raises(PluginError) as err:
        ConverterSet([Bad()])
    assert "bad" in str(err.value) and "key_filter" in str(err.value)


def test_hookimpl_matching_no_spec_is_rejected():
    class Typo(Converter):
        name = "typo"

        @hookimpl
        def state_dict_transfrom(self, state_dict):
            return state_dict

    with pytest.raises(PluginError, match="state_dict_transfrom"):
        ConverterSet([Typo()])


def test_a_hook_method_without_the_hookimpl_marker_is_refused():
    class Unmarked(Converter):
        name = "unmarked"

        def key_filter(self, fqn):  # forgot @hookimpl: pluggy would never call it
            return True

    with pytest.raises(PluginError, match="'unmarked' defines key_filter\\(\\) without"):
        ConverterSet([Unmarked()])


def test_key_claimed_by_two_converters_names_key_and_both():
    class Own(Converter):
        def __init__(self, name):
            super().__init__()
            self.name = name

        @hookimpl
        def key_filter(self, fqn):
            return fqn == "w"

    convs = ConverterSet([Own("one"), Own("two")])
    with pytest.raises(PluginError) as err:
        convs.key_filter("w")
    assert "'w'" in str(err.value) and "'one'" in str(err.value) and "'two'" in str(err.value)


def test_hook_that_raises_is_reported_with_converter_and_hook():
    class Boom(Converter):
        name = "boom"

        @hookimpl
        def convert(self, model):
            raise RuntimeError("kaput")

    with pytest.raises(PluginError, match="'boom' hook 'convert' raised RuntimeError: kaput"):
        ConverterSet([Boom()]).convert(nn.Linear(1, 1))


def test_disable_autoload_hides_entry_points(monkeypatch):
    monkeypatch.setenv("CKPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "lora" not in discover_converters()
    with pytest.raises(ConfigError, match="unknown converter 'lora'"):
        ConverterSet.from_config(["lora"])


def test_trace_env_logs_every_hook_call_with_arguments_and_result(monkeypatch, caplog):
    trace = logging.getLogger("ckpt_core.trace")
    monkeypatch.setattr(trace, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)  # nothing configured
    monkeypatch.setenv("CKPT_TRACE_PLUGINS", "1")
    convs = ConverterSet([Recorder(name="t")])
    convs.state_dict_transform({"k": torch.ones(1)})
    convs.key_filter("some.key")
    text = caplog.text
    assert "hook state_dict_transform -> [t] args={'state_dict': {'k': tensor([1.])}}" in text
    assert "hook state_dict_transform returned [{'k': tensor([1.]), 'by_t': tensor([0.])}]" in text
    # Recorder has no key_filter: a hook nobody implements is not called, so not traced.
    assert "key_filter" not in text


def test_without_the_trace_env_hook_calls_are_not_logged(monkeypatch, caplog):
    monkeypatch.delenv("CKPT_TRACE_PLUGINS", raising=False)
    convs = ConverterSet([Recorder(name="t")])
    with caplog.at_level(logging.DEBUG):
        convs.state_dict_transform({})
    assert "hook state_dict_transform" not in caplog.text


def test_with_autoload_off_a_class_registered_by_hand_is_found_by_name(monkeypatch):
    from ckpt_core.protocol.discovery import register_converter_class, unregister_converter_class

    class Manual(Converter):
        name = "manual"

        @hookimpl
        def key_filter(self, fqn):
            return fqn.startswith("extra.")

    monkeypatch.setenv("CKPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    register_converter_class(Manual)
    try:
        assert set(discover_converters()) == {"manual"}
        convs = ConverterSet.from_config(["manual"])
        assert convs.key_filter("extra.w") and not convs.key_filter("w")
    finally:
        unregister_converter_class("manual")
    with pytest.raises(ConfigError, match="unknown converter 'manual'"):
        ConverterSet.from_config(["manual"])


def test_duplicate_converter_names_are_refused():
    with pytest.raises(ConfigError, match="more than once"):
        ConverterSet([Recorder(name="a"), Recorder(name="a")])
