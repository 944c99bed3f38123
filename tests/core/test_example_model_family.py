"""The documented third-party model family, installed by pip: listed, trained, converted,
and loaded by transformers' own GPT2LMHeadModel with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.core._examples import example_env, pip_install_example

# Runs in a fresh interpreter that sees the example only through its entry point.
CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from ckpt_core import CheckpointConfig
    from ckpt_core.content.families import model_family
    from ckpt_core.cli.main import main
    from ckpt_core.cli.plugins_cmd import collect_families
    from ckpt_core.policy.manager import CheckpointManager

    ckpts, hf, dcp, again = sys.argv[1:5]
    family = model_family("gpt2")
    config = family.config_for("tiny")
    torch.manual_seed(0)
    model = family.build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(
        CheckpointConfig(folder=ckpts, interval=2, export={"enable": False}),
        model, optimizers=optimizer, sd_adapter=family.adapter(config),
    )
    tokens = torch.randint(0, config["vocab_size"], (2, 16))
    for step in (1, 2):
        logits = model(tokens)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        manager.save(step, last_step=step == 2)
    manager.close()
    codes = [
        main(["convert", ckpts, hf, "--to", "hf", "--no-progress"]),
        main(["convert", hf, dcp, "--to", "dcp", "--no-progress"]),
        main(["convert", dcp, again, "--to", "hf", "--no-progress"]),
    ]

    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    loaded = GPT2LMHeadModel.from_pretrained(hf).eval()
    with torch.no_grad():
        diff = (loaded(tokens).logits - model(tokens)).abs().max().item()
    first = load_file(f"{hf}/model.safetensors")
    second = load_file(f"{again}/model.safetensors")
    listed = {r["name"]: r for r in collect_families()}
    print(json.dumps({
        "codes": codes,
        "listed": listed["gpt2"],
        "llama_listed": "llama" in listed,
        "diff": diff,
        "keys": sorted(first),
        "round_trip_equal": first.keys() == second.keys()
            and all(torch.equal(first[k], second[k]) for k in first),
        "module": type(family.adapter(config)).__module__,
    }))
    """
)


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    return pip_install_example("ckpt-example-gpt2", tmp_path_factory)


def test_pip_installed_example_family_is_listed_and_its_checkpoint_loads_in_transformers(
    installed_example, tmp_path
):
    env = example_env(installed_example)
    folders = [str(tmp_path / name) for name in ("ckpts", "hf", "dcp", "again")]
    out = subprocess.run(
        [sys.executable, "-c", CHECK, *folders],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["codes"] == [0, 0, 0]
    assert res["module"] == "ckpt_example_gpt2"
    assert res["listed"]["distribution"] == "ckpt-example-gpt2"
    assert res["listed"]["model_types"] == ["gpt2"] and res["listed"]["flavors"]
    assert res["llama_listed"]
    assert "transformer.h.1.attn.c_attn.weight" in res["keys"]
    assert not any(k.startswith("blocks.") for k in res["keys"])
    assert res["diff"] < 1e-5
    assert res["round_trip_equal"]
