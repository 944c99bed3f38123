"""Config models, TOML loading and command-line overrides."""

from __future__ import annotations

import pytest

from ckpt_core import CheckpointConfig, ConfigError, ConvertersConfig
from ckpt_core.config_loading import apply_overrides, build_config, load_config, parse_value


def test_keep_latest_k_of_one_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as err:
        build_config(CheckpointConfig, {"keep_latest_k": 1})
    assert "keep_latest_k" in str(err.value) and "async" in str(err.value)


def test_model_may_not_be_excluded_from_loading():
    with pytest.raises(ConfigError, match="exclude_from_loading may not contain 'model'"):
        build_config(CheckpointConfig, {"exclude_from_loading": ["model"]})


def test_excluding_optimizer_requires_excluding_lr_scheduler():
    with pytest.raises(ConfigError, match="lr_scheduler"):
        build_config(CheckpointConfig, {"exclude_from_loading": ["optimizer"]})
    ok = build_config(CheckpointConfig, {"exclude_from_loading": "optimizer,lr_scheduler"})
    assert ok.exclude_from_loading == ["optimizer", "lr_scheduler"]


def test_unknown_field_and_bad_literal_name_the_field_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        build_config(CheckpointConfig, {"intervall": 5, "async_mode": "sometimes"})
    msg = str(err.value)
    assert "intervall: unknown field" in msg
    assert "async_mode" in msg and "'disabled'" in msg and "'async'" in msg


def test_converter_sections_become_options():
    cfg = build_config(ConvertersConfig, {"enabled": ["qat", "lora"], "lora": {"rank": 8}})
    assert cfg.enabled == ["qat", "lora"] and cfg.options == {"lora": {"rank": 8}}


def test_toml_file_with_nested_sections_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'folder = "ck"\ninterval = 5\n[export]\ndtype = "float32"\n'
        '[[additional_load]]\npath = "/a"\nconverter = "lora"\n'
    )
    cfg = load_config(
        CheckpointConfig,
        path,
        ["--interval", "7", "--export.dtype=bfloat16", "--exclude_from_loading", "dataloader"],
    )
    assert cfg.folder == "ck" and cfg.interval == 7 and cfg.export.dtype == "bfloat16"
    assert cfg.exclude_from_loading == ["dataloader"]
    assert cfg.additional_load[0].converter == "lora"


def test_malformed_toml_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("interval = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(CheckpointConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CheckpointConfig, tmp_path / "nope.toml")


def test_override_values_parse_as_literals_else_strings():
    assert parse_value("3") == 3 and parse_value("true") is True
    assert parse_value('["a", "b"]') == ["a", "b"] and parse_value("hello") == "hello"
    data = apply_overrides({}, ["--a.b.c", "1.5", "--a.d", "x"])
    assert data == {"a": {"b": {"c": 1.5}, "d": "x"}}
    with pytest.raises(ConfigError, match="needs a value"):
        apply_overrides({}, ["--a"])


def test_unknown_field_lists_the_fields_allowed_at_that_place():
    with pytest.raises(ConfigError) as err:
        build_config(CheckpointConfig, {"export": {"dtyp": "float32"}})
    msg = str(err.value)
    assert "export.dtyp: unknown field; allowed:" in msg
    assert "dtype" in msg and "interval" in msg and "keep_latest_k" not in msg
    with pytest.raises(ConfigError, match="allowed: path, converter"):
        build_config(CheckpointConfig, {"additional_load": [{"path": "/a", "conv": "lora"}]})
