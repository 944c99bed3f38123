"""The layout shows the stages: storage stays I/O, plugins use public names, old paths alias."""

from __future__ import annotations

import ast
import importlib

import pytest

import ckpt_core
import ckpt_core.plugin_api
from tests.conftest import REPO_ROOT
from tests.core.test_model_families import _imported_modules

# What ckpt_core/storage/ may import from ckpt: itself and the stage-free helpers.
STORAGE_MAY_IMPORT = (
    "ckpt_core.storage",
    "ckpt_core.errors",
    "ckpt_core.dtensor_utils",
    "ckpt_core.rank_zero",
    "ckpt_core.export_spec",
    "ckpt_core._version",
)

# Old flat module → the module it moved to; the old path stays an alias for one release.
MOVED = {
    "adapter": "protocol.state_dict_adapter",
    "hookspecs": "protocol.hookspecs",
    "converter": "protocol.converter",
    "plugins": "protocol.plugin_host",
    "discovery": "protocol.discovery",
    "adapters": "content.families",
    "model_wrapper": "content.model_wrapper",
    "transforms": "content.transforms",
    "quantization_config": "content.quantization_config",
    "owned_only": "content.owned_only",
    "hf_native": "content.hf_native",
    "hf_native_family": "content.hf_native_family",
    "experts": "content.experts",
    "model_layout": "content.model_layout",
    "hf_config_checks": "content.hf_config_checks",
    "states": "content.states",
    "train_state": "content.train_state",
    "convert_plan": "convert.plan",
    "convert_sources": "convert.sources",
    "streaming_convert": "convert.streaming",
    "manager": "policy.manager",
    "loading": "policy.load_policy",
    "resume": "policy.load_mechanics",
    "exporter": "policy.exporter",
    "preemption": "policy.preemption",
    "preflight": "policy.preflight",
    "save_errors": "policy.save_errors",
    "async_save": "storage.async_writer",
}


def _storage_offenders(path, source: str) -> list[str]:
    out = []
    for line, module in _imported_modules(ast.parse(source), "ckpt_core.storage"):
        if module != "ckpt_core" and not module.startswith("ckpt_core."):
            continue
        if any(module == ok or module.startswith(ok + ".") for ok in STORAGE_MAY_IMPORT):
            continue
        out.append(f"{path}:{line} imports {module}")
    return out


def test_storage_imports_nothing_from_content_policy_protocol_or_the_package_root():
    files = sorted((REPO_ROOT / "ckpt_core" / "storage").glob("*.py"))
    assert len(files) > 10
    offenders = []
    for path in files:
        offenders += _storage_offenders(path.name, path.read_text())
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "source",
    [
        "from ckpt_core.content.transforms import cast_dtype\n",
        "from ckpt_core import __version__\n",
        "def f():\n    from ckpt_core.policy import manager\n",
        "import ckpt_core.transforms\n",
    ],
)
def test_the_storage_check_catches_a_forbidden_import(source):
    assert _storage_offenders("x.py", source)


def _plugin_sources():
    roots = [
        REPO_ROOT / d for d in ("ckpt_plugins_float8", "ckpt_plugins_lora", "ckpt_plugins_qat")
    ]
    roots += sorted((REPO_ROOT / "docs" / "examples").glob("ckpt-example-*"))
    files = []
    for root in roots:
        files += [p for p in root.rglob("*.py") if "tests" not in p.relative_to(root).parts]
    return files


def test_plugins_and_examples_import_only_public_names():
    public = {
        "ckpt_core": set(ckpt_core.__all__),
        "ckpt_core.plugin_api": set(ckpt_core.plugin_api.__all__),
    }
    files = _plugin_sources()
    assert len(files) > 15
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckpt_core"):
                names = {a.name for a in node.names}
                if node.module not in public or not names <= public[node.module]:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.module}")
            elif isinstance(node, ast.Import):
                offenders += [
                    f"{path.relative_to(REPO_ROOT)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("ckpt_core")
                ]
    assert not offenders, "\n".join(offenders)


def test_every_public_name_resolves_and_hookspec_is_not_exported():
    assert "hookspec" not in ckpt_core.__all__
    for module in (ckpt_core, ckpt_core.plugin_api):
        for name in module.__all__:
            assert getattr(module, name) is not None, name


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_an_old_import_path_is_the_moved_module(old, new):
    moved = importlib.import_module(f"ckpt_core.{new}")
    assert importlib.import_module(f"ckpt_core.{old}") is moved
    assert (REPO_ROOT / "ckpt_core" / f"{old}.py").stat().st_size < 400  # an alias, not a copy


def test_monkeypatching_an_old_path_reaches_the_code(monkeypatch):
    from ckpt_core import adapters
    from ckpt_core.content import families

    monkeypatch.setattr(adapters, "_manual", {"x": None})
    assert families._manual == {"x": None}


# Renamed public names: (module that exported the old name, old name, new name).
RENAMED = [
    ("ckpt_core", "Converters", "ConverterSet"),
    ("ckpt_core", "ConverterConfig", "ConverterOptions"),
    ("ckpt_core.plugin_api", "ConverterConfig", "ConverterOptions"),
    ("ckpt_core.protocol.plugin_host", "Converters", "ConverterSet"),
    ("ckpt_core.protocol.converter", "ConverterConfig", "ConverterOptions"),
    ("ckpt_core.plugins", "Converters", "ConverterSet"),
    ("ckpt_core.converter", "ConverterConfig", "ConverterOptions"),
]


@pytest.mark.parametrize("module, old, new", RENAMED)
def test_an_old_name_warns_with_the_new_one_and_is_the_same_object(module, old, new):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{old} is renamed \S*\.{new};"):
        value = getattr(mod, old)
    assert value is getattr(ckpt_core, new)
    assert old not in getattr(mod, "__all__", ())


def test_code_written_against_the_old_names_still_runs():
    with pytest.warns(DeprecationWarning):
        from ckpt_core import ConverterConfig, Converters

    class Tag(ckpt_core.Converter):
        name = "tag"

        class Config(ConverterConfig):
            suffix: str = "x"

    convs = Converters([Tag(Tag.Config(suffix="y"))])
    assert isinstance(convs, ckpt_core.ConverterSet) and convs.names == ["tag"]
    with pytest.raises(ValueError, match="bogus"):
        Tag.Config(bogus=1)  # still the strict options base


def test_a_name_that_was_never_exported_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="Converters"):
        ckpt_core.plugin_api.Converters  # noqa: B018
    with pytest.raises(AttributeError, match="Nope"):
        ckpt_core.Nope  # noqa: B018


# Where ckpt_core may unpickle, and why that place is safe. Anything else that unpickles
# (pickle.load/loads/Unpickler, torch.load without weights_only=True) fails the test below.
UNPICKLE_ALLOWED = {
    "storage/safe_metadata.py": "the restricted DCP .metadata unpickler; weights_only loads",
    "storage/fast_reader.py": "an Unpickler whose find_class resolves only a tensor's layout",
}
_PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
_UNPICKLERS = ("load", "loads", "Unpickler")


def _unpickles(source: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in _PICKLE_MODULES
            and node.attr in _UNPICKLERS
        ):
            out.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in _PICKLE_MODULES:
            out += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) == "torch.load"
            and not any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value
                for k in node.keywords
            )
        ):
            out.append(f"{node.lineno}: torch.load without weights_only=True")
    return out


def test_the_library_unpickles_only_in_its_restricted_readers():
    root = REPO_ROOT / "ckpt_core"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative not in UNPICKLE_ALLOWED:
            offenders += [f"ckpt_core/{relative}:{hit}" for hit in _unpickles(path.read_text())]
    assert not offenders, "\n".join(offenders)
    for relative in UNPICKLE_ALLOWED:  # an entry for a file that no longer unpickles goes
        assert _unpickles((root / relative).read_text()), relative


@pytest.mark.parametrize(
    "source",
    [
        "def f(s):\n    import pickle\n    return pickle.loads(s)\n",
        "import pickle\nx = pickle.load(open('f', 'rb'))\n",
        "from pickle import loads\n",
        "import pickle\nclass U(pickle.Unpickler):\n    pass\n",
        "import torch\ntorch.load('f')\n",
        "import torch\ntorch.load('f', weights_only=False)\n",
    ],
)
def test_the_pickle_check_catches_an_unpickling_call(source):
    assert _unpickles(source)


def test_the_pickle_check_lets_dumping_and_weights_only_loads_pass():
    source = "import pickle, torch\npickle.dumps(1)\ntorch.load('f', weights_only=True)\n"
    assert not _unpickles(source)
