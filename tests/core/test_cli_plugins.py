"""``ckpt plugins`` lists converters, options, and import failures."""

from __future__ import annotations

import json

from ckpt_core.cli.main import main


def test_ckpt_plugins_lists_bundled_converters_with_options(capsys):
    assert main(["plugins", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)["converters"]}
    assert {"lora", "qat", "float8"} <= set(records)
    assert records["lora"]["distribution"] == "ckpt-plugins-lora"
    rank = next(o for o in records["lora"]["options"] if o["name"] == "rank")
    assert rank["default"] == 8 and rank["type"] == "int" and rank["description"]
    recipe = next(o for o in records["float8"]["options"] if o["name"] == "recipe")
    assert "'tensorwise'" in recipe["type"] and "'rowwise'" in recipe["type"]
    targets = next(o for o in records["lora"]["options"] if o["name"] == "target_modules")
    assert targets["type"] == "list[str]"
    assert {o["name"] for o in records["qat"]["options"]} >= {"scheme", "group_size", "targets"}
    assert {o["name"] for o in records["float8"]["options"]} >= {"recipe", "emulate", "export"}


def test_ckpt_plugins_reports_a_broken_plugin_without_hiding_others(fake_dist, capsys):
    fake_dist("broken-dist", {"broken": "brokenmod:X"}, {"brokenmod": "raise ImportError('gone')"})
    assert main(["plugins"]) == 1
    out = capsys.readouterr().out
    assert "broken  (broken-dist 0.1)" in out and "ImportError: gone" in out
    assert "lora  (ckpt-plugins-lora" in out


def test_unknown_subcommand_option_is_refused(capsys):
    try:
        main(["plugins", "--nope"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("expected argparse to exit")


def test_ckpt_plugins_reports_a_name_two_distributions_claim_on_its_own_line(fake_dist, capsys):
    fake_dist("first-dist", {"dup": "dupmod:X"}, {"dupmod": "X = 1"})
    fake_dist("second-dist", {"dup": "dupmod2:X"}, {"dupmod2": "X = 2"})
    assert main(["plugins"]) == 1
    out = capsys.readouterr().out
    assert "ERROR: Converter name 'dup' is claimed by two distributions" in out
    assert "lora  (ckpt-plugins-lora" in out
