"""Each bundled plugin declares exactly the dependencies DESIGN.md gives it, and LoRA runs
(convert, merge, PEFT adapter files) with peft unimportable."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The ckpt-core releases the bundled plugins and the documented examples are tested with.
CORE_PIN = "ckpt-core>=0.1,<0.2"


def test_the_pinned_ckpt_core_range_holds_this_ckpt_core_and_stops_at_the_next_minor():
    from packaging.requirements import Requirement

    import ckpt_core

    spec = Requirement(CORE_PIN).specifier
    assert ckpt_core.__version__ in spec
    major, minor = (int(p) for p in ckpt_core.__version__.split(".")[:2])
    assert f"{major}.{minor + 1}.0" not in spec
    for example in ("ckpt-example-ema", "ckpt-example-gpt2"):
        project = tomllib.loads(
            (ROOT / "docs" / "examples" / example / "pyproject.toml").read_text()
        )
        assert CORE_PIN in project["project"]["dependencies"], example


@pytest.mark.parametrize(
    "folder, dependencies",
    [
        ("ckpt_plugins_lora", [CORE_PIN]),
        ("ckpt_plugins_qat", [CORE_PIN, "torchao==0.18.0"]),
        ("ckpt_plugins_float8", [CORE_PIN, "torchao==0.18.0"]),
    ],
)
def test_each_plugin_pyproject_declares_its_dependencies_and_entry_point(folder, dependencies):
    project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == dependencies
    name = folder.removeprefix("ckpt_plugins_")
    entry = project["entry-points"]["ckpt_core.converters"]
    assert list(entry) == [name] and entry[name].startswith(f"{folder}:")
    assert (ROOT / folder / project["readme"]).is_file()


LORA_WITHOUT_PEFT = """
import sys
sys.modules["peft"] = None  # any 'import peft' now raises ImportError
import torch
from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.reference import LlamaStateDictAdapter, build_model
from ckpt_plugins_lora import LoRAConfig, LoRAConverter

model = build_model("tiny")
conv = LoRAConverter(LoRAConfig(rank=2, target_modules=["wq"]))
convs = ConverterSet([conv])
convs.convert(model)
export = ModelWrapper(model, convs).state_dict("export")
assert not any("lora" in k for k in export)
peft = conv.peft_adapter(LlamaStateDictAdapter(model.args))
owned = {k: v for k, v in model.state_dict().items() if convs.key_filter(k)}
keys = sorted(peft.to_hf(owned))
assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", keys
assert '"peft_type": "LORA"' in peft.extra_files()["adapter_config.json"]
assert "peft" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("ok")
"""


def test_lora_converts_merges_and_writes_peft_names_without_peft_importable():
    proc = subprocess.run(
        [sys.executable, "-c", LORA_WITHOUT_PEFT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
