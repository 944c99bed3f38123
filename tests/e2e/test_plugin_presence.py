"""The end-to-end tests fail, not skip, when a bundled converter is missing or broken."""

from __future__ import annotations

import pytest

from tests.e2e import _train as t


def test_a_bundled_converter_that_fails_to_import_fails_the_test(fake_dist, monkeypatch):
    fake_dist("broken-conv", {"brokenconv": "brokenconv_mod:Conv"}, {"brokenconv_mod": "1/0\n"})
    monkeypatch.setitem(t.BUNDLED, "brokenconv", "brokenconv_mod")
    with pytest.raises(pytest.fail.Exception, match="'brokenconv' fails to import"):
        t.plugin_missing(["brokenconv"])


def test_a_bundled_converter_that_is_not_installed_fails_the_test(monkeypatch):
    monkeypatch.setitem(t.BUNDLED, "absentconv", "ckpt_plugins_absent")
    with pytest.raises(pytest.fail.Exception, match="pip install -e ./ckpt_plugins_absent"):
        t.plugin_missing(["absentconv"])


def test_a_third_party_converter_that_is_not_installed_is_a_reason_to_skip():
    assert t.plugin_missing(["not-bundled-conv"]) == "converter 'not-bundled-conv' is not installed"


def test_the_bundled_converters_are_present_and_import():
    assert t.plugin_missing(list(t.BUNDLED)) is None


def test_kill_points_replay_from_the_printed_seed(monkeypatch, capsys):
    monkeypatch.setenv("CKPT_TEST_SEED", "1234")
    first = [t.seeded_rng("x").random() for _ in range(2)]
    assert "x seed: 1234 (replay: CKPT_TEST_SEED=1234)" in capsys.readouterr().out
    assert first[0] == first[1]
