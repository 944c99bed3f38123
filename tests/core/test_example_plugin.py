"""The documented third-party converter, installed by pip, listed and composed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.core._examples import example_env, pip_install_example

CHECK = textwrap.dedent(
    """
    import json, torch
    from torch import nn
    from ckpt_core import ConverterSet, ModelWrapper
    from ckpt_core.cli.plugins_cmd import collect

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    convs = ConverterSet.from_config(["ema"], {"ema": {"decay": 0.5}})
    convs.convert(model)
    w = ModelWrapper(model, converters=convs)
    with torch.no_grad():
        model[0].weight.add_(2.0)
    convs.post_optimizer_step([model])
    full, base, export = (w.state_dict(v) for v in ("full", "base", "export"))
    listed = {r["name"]: r for r in collect()}
    print(json.dumps({
        "module": type(convs["ema"]).__module__,
        "full": sorted(full), "base": sorted(base), "export": sorted(export),
        "ema_is_half_way": torch.allclose(
            full["0.weight_ema"], model[0].weight - 1.0),
        "export_uses_ema": torch.equal(export["0.weight"], full["0.weight_ema"]),
        "listed": listed["ema"]["distribution"],
        "options": [o["name"] for o in listed["ema"]["options"]],
    }))
    """
)


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    return pip_install_example("ckpt-example-ema", tmp_path_factory)


def test_pip_installed_example_converter_is_listed_and_composed(installed_example, tmp_path):
    env = example_env(installed_example)
    out = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["module"] == "ckpt_example_ema"
    assert res["listed"] == "ckpt-example-ema"
    assert res["options"] == ["decay", "export_ema"]
    assert "0.weight_ema" in res["full"] and "2.weight_ema" in res["full"]
    assert not any(k.endswith("weight_ema") for k in res["base"] + res["export"])
    assert res["base"] == res["export"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert res["ema_is_half_way"] and res["export_uses_ema"]


def test_pip_installed_example_converter_keeps_the_contract(installed_example, tmp_path):
    env = example_env(installed_example)
    code = (
        "from ckpt_core.testing import check_converter\n"
        "check_converter('ema')\n"
        "check_converter('ema', options={'decay': 0.5, 'export_ema': False})\n"
        "print('contract kept')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("contract kept")
