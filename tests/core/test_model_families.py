"""Model families as plugins: discovery, conflicts, broken entries, lookup errors, and
the library's independence from the reference model."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from ckpt_core.cli.main import main
from ckpt_core.content import families as adapters
from ckpt_core.content.families import (
    FAMILY_ENTRY_POINT_GROUP,
    ModelFamily,
    discover_model_families,
    family_for_hf_config,
    family_for_model,
    model_family,
    register_model_family,
)
from ckpt_core.errors import ConfigError, PluginError
from tests.conftest import REPO_ROOT
from tests.core.hf_helpers import save_hf_llama

# A family whose builders are never called by these tests: the module only has to load.
FAMILY_SOURCE = """
from ckpt_core.content.families import ModelFamily

def _unused(*args, **kwargs):
    raise AssertionError("not called")

def make():
    return ModelFamily(
        "{name}", adapter=_unused, build_model=_unused, model_types=({types}),
        flavors={flavors}, config_for=lambda name: {{"model_type": "{first}"}},
    )

FAMILY = make()
"""


def _family_module(name: str, *types: str, flavors: tuple[str, ...] = ("tiny",)) -> str:
    return FAMILY_SOURCE.format(
        name=name,
        types="".join(f"{t!r}, " for t in types),
        first=types[0] if types else "",
        flavors=repr(tuple(flavors)),
    )


@pytest.fixture
def family_dist(fake_dist):
    """``family_dist(dist, {name: "mod:attr"}, {mod: source})`` in the families' group."""

    def make(dist, entry_points, modules=None):
        return fake_dist(dist, entry_points, modules, group=FAMILY_ENTRY_POINT_GROUP)

    return make


@pytest.fixture(autouse=True)
def _no_hand_registrations(monkeypatch):
    monkeypatch.setattr(adapters, "_manual", {})


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_the_reference_llama_is_found_through_its_entry_point_without_importing_it():
    code = (
        "import sys, json\n"
        "from ckpt_core.content.families import discover_model_families, family_for_hf_config\n"
        "entry = discover_model_families()['llama']\n"
        "listed_only = 'ckpt_core.reference' not in sys.modules\n"
        "family = family_for_hf_config({'model_type': 'llama'})\n"
        "print(json.dumps([entry.distribution, entry.value, listed_only, family.name,\n"
        "                  'ckpt_core.reference' in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CKPT_DISABLE_PLUGIN_AUTOLOAD"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    assert out.returncode == 0, out.stderr
    dist, value, listed_only, name, imported = json.loads(out.stdout.splitlines()[-1])
    assert (dist, value) == ("ckpt-core", "ckpt_core.reference.family:llama_family")
    assert listed_only and name == "llama" and imported


def test_an_installed_family_is_listed_lazily_and_found_by_name_and_model_type(family_dist):
    family_dist("fam-dist", {"fam": "fammod:FAMILY"}, {"fammod": _family_module("fam", "famtype")})
    entry = discover_model_families()["fam"]
    assert (entry.distribution, entry.version) == ("fam-dist", "0.1")
    assert "fammod" not in sys.modules  # listing does not import
    assert model_family("fam").model_types == ("famtype",)
    assert family_for_hf_config({"model_type": "famtype"}).name == "fam"
    assert family_for_hf_config({"model_type": "llama"}).name == "llama"


def test_an_entry_point_may_name_a_factory_returning_the_family(family_dist):
    family_dist("fam-dist", {"fam": "fammod:make"}, {"fammod": _family_module("fam", "famtype")})
    assert model_family("fam").name == "fam"


def test_the_family_named_like_the_model_type_is_imported_alone(family_dist):
    family_dist("other-dist", {"other": "othermod:FAMILY"}, {"othermod": _family_module("other")})
    assert family_for_hf_config({"model_type": "llama"}).name == "llama"
    assert "othermod" not in sys.modules


def test_two_distributions_claiming_one_family_name_break_only_that_family(family_dist, capsys):
    family_dist("first-dist", {"fam": "fam1:FAMILY"}, {"fam1": _family_module("fam", "famtype")})
    family_dist("second-dist", {"fam": "fam2:FAMILY"}, {"fam2": _family_module("fam", "famtype")})
    with pytest.raises(PluginError) as err:
        model_family("fam")
    message = _one_line(err.value)
    assert "Model family name 'fam' is claimed by two distributions" in message
    assert "'first-dist' (fam1:FAMILY)" in message and "'second-dist' (fam2:FAMILY)" in message
    assert family_for_hf_config({"model_type": "llama"}).name == "llama"  # unaffected
    assert "fam1" not in sys.modules and "fam2" not in sys.modules
    assert main(["plugins"]) == 1
    out = capsys.readouterr().out
    assert "ERROR: Model family name 'fam' is claimed by two distributions" in out
    assert "llama  (ckpt-core" in out


def test_two_families_reading_one_model_type_is_an_error_naming_both(family_dist):
    family_dist("a-dist", {"a": "amod:FAMILY"}, {"amod": _family_module("a", "shared")})
    family_dist("b-dist", {"b": "bmod:FAMILY"}, {"bmod": _family_module("b", "shared")})
    with pytest.raises(PluginError) as err:
        family_for_hf_config({"model_type": "shared"})
    message = _one_line(err.value)
    assert "'a' (a-dist)" in message and "'b' (b-dist)" in message


def test_a_broken_family_gets_its_own_line_and_fails_only_runs_that_need_it(family_dist, capsys):
    family_dist(
        "broken-dist", {"broken": "brokenmod:FAMILY"}, {"brokenmod": "raise OSError('gone')"}
    )
    assert family_for_hf_config({"model_type": "llama"}).name == "llama"
    with pytest.raises(PluginError) as err:
        model_family("broken")
    message = _one_line(err.value)
    assert "'broken' from distribution 'broken-dist'" in message and "OSError: gone" in message
    assert main(["plugins"]) == 1
    out = capsys.readouterr().out
    assert "broken  (broken-dist 0.1)  brokenmod:FAMILY" in out and "OSError: gone" in out
    assert "llama  (ckpt-core" in out and "reads model_type: llama" in out
    with pytest.raises(ConfigError) as err:  # it could have been the one: it is named
        family_for_hf_config({"model_type": "unheard"})
    assert "Failed to load: Model family 'broken'" in _one_line(err.value)


MALFORMED = {
    "not-a-family": ("FAMILY = 42", "must name a ckpt_core.content.families.ModelFamily"),
    "wrong-name": (_family_module("other", "t"), "ModelFamily.name is 'other'"),
    "list-types": (
        _family_module("fam", "t").replace("model_types=('t', )", "model_types=['t']"),
        "model_types must be a tuple of non-empty strings, got ['t']",
    ),
    "not-callable": (
        _family_module("fam", "t").replace("build_model=_unused", "build_model=3"),
        "build_model must be callable, got 3",
    ),
    "factory-raises": ("def make():\n    raise KeyError('k')\nFAMILY = make", "KeyError"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_family_is_one_line_naming_its_distribution(family_dist, case):
    source, fragment = MALFORMED[case]
    family_dist("bad-dist", {"fam": "badmod:FAMILY"}, {"badmod": source})
    with pytest.raises(PluginError) as err:
        model_family("fam")
    message = _one_line(err.value)
    assert "'fam' from" in message and "'bad-dist'" in message and fragment in message


def test_an_unknown_model_type_lists_families_and_says_how_to_get_one(tmp_path, capsys):
    hf = tmp_path / "hf"
    save_hf_llama(hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "falcon9"}))
    assert main(["convert", str(hf), str(tmp_path / "out"), "--to", "dcp", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model_type 'falcon9' has no installed model family" in err
    assert "Installed: hf from ckpt-core reads any causal LM model_type transformers knows" in err
    assert "; llama from ckpt-core reads llama" in err
    assert "'ckpt_core.model_families' group" in err
    assert "docs/writing-model-families.md" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_manifest_adapter_lists_the_installed_families():
    with pytest.raises(ConfigError) as err:
        model_family("mamba")
    message = _one_line(err.value)
    assert "No model family 'mamba' is installed" in message
    assert "llama from ckpt-core reads llama" in message


def test_model_flavors_resolve_through_their_family(family_dist):
    family, config = family_for_model("llama:tiny")
    assert family.name == "llama" and config["model_type"] == "llama"
    assert family_for_model("small")[0].name == "llama"  # offered by one family only
    # ckpt-core's qwen3 and moe offer tiny too: a bare flavor stays the Llama's, as in 0.1
    assert family_for_model("tiny")[0].name == "llama"
    assert family_for_model("qwen3:tiny")[1]["model_type"] == "qwen3"
    with pytest.raises(ConfigError) as err:
        family_for_model("huge")
    assert "llama: tiny, debug, small, 1b" in _one_line(err.value)
    family_dist("fam-dist", {"fam": "fammod:FAMILY"}, {"fammod": _family_module("fam", "famtype")})
    assert family_for_model("tiny")[0].name == "llama"
    assert family_for_model("fam:tiny")[1] == {"model_type": "famtype"}
    family_dist(
        "two-dist",
        {"one": "onemod:FAMILY", "two": "twomod:FAMILY"},
        {
            "onemod": _family_module("one", "onetype", flavors=("mini",)),
            "twomod": _family_module("two", "twotype", flavors=("mini",)),
        },
    )
    with pytest.raises(ConfigError) as err:  # no default family offers it: ambiguous
        family_for_model("mini")
    assert "pass one of one:mini, two:mini" in _one_line(err.value)


def test_with_autoload_off_no_family_is_discovered_until_registered_by_hand(monkeypatch):
    from ckpt_core.reference.family import llama_family

    monkeypatch.setenv("CKPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert discover_model_families() == {}
    with pytest.raises(ConfigError) as err:
        family_for_hf_config({"model_type": "llama"})
    assert "CKPT_DISABLE_PLUGIN_AUTOLOAD is set" in _one_line(err.value)
    register_model_family(llama_family())
    assert family_for_hf_config({"model_type": "llama"}).name == "llama"
    assert discover_model_families()["llama"].distribution == "<manual>"


def test_a_family_registered_by_hand_wins_over_an_installed_one():
    from ckpt_core.reference.family import llama_family

    mine = ModelFamily("mine", adapter=print, build_model=print, model_types=("llama",))
    register_model_family(mine)
    assert family_for_hf_config({"model_type": "llama"}) is mine
    replaced = ModelFamily("llama", adapter=print, build_model=print, model_types=("x",))
    register_model_family(replaced)
    assert model_family("llama") is replaced
    with pytest.raises(PluginError, match="model_types must be a tuple"):
        register_model_family(ModelFamily("bad", adapter=print, build_model=print, model_types="x"))
    assert llama_family().model_types == ("llama",)


# -- the library does not depend on the reference model --------------------------------

ALLOWED = {"reference", "trainer"}  # ckpt_core/<these>/ may import ckpt_core.reference


def _imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``tree``, relative ones resolved."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def test_no_library_module_outside_reference_and_trainer_imports_the_reference():
    root = REPO_ROOT / "ckpt_core"
    offenders = []
    checked = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ALLOWED:
            continue
        package = ".".join(("ckpt_core", *rel.parts[:-1]))
        for line, module in _imported_modules(ast.parse(path.read_text()), package):
            if module == "ckpt_core.reference" or module.startswith("ckpt_core.reference."):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {module}")
        checked += 1
    assert checked > 30  # the walk really covered the library
    assert not offenders, "\n".join(offenders)


def test_the_import_check_sees_absolute_relative_and_function_level_imports():
    source = (
        "def f():\n    from ckpt_core.reference import build_model\n"
        "from .. import reference\n"
        "import ckpt_core.reference.flavors\n"
    )
    found = [m for _, m in _imported_modules(ast.parse(source), "ckpt_core.cli")]
    assert "ckpt_core.reference.build_model" in found
    assert "ckpt_core.reference" in found
    assert "ckpt_core.reference.flavors" in found
