"""Never silently wrong: torchtitan folders (renamed or not) are refused unless declared."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_core.cli.main import main
from tests.torchtitan import _titan


def _renamed(step: str, dst: str) -> None:
    """What a user renaming torchtitan's keys to ckpt's by hand writes (model entries only)."""
    import torch.distributed.checkpoint as dcp

    from ckpt_core.storage.dcp_entries import read_entries
    from ckpt_core.storage.safe_metadata import read_metadata

    names = [
        k
        for k in read_metadata(step).state_dict_metadata
        if not k.startswith(("optimizer", "lr_scheduler", "train_state", "dataloader"))
    ]
    raw = read_entries(step, names)
    renamed = {k.replace("qkv_linear.", "").replace("lm_head", "output"): v for k, v in raw.items()}
    dcp.save({"model": renamed}, checkpoint_id=dst, no_dist=True)


def _config_json(tmp_path) -> str:
    from ckpt_core.torchtitan import architecture

    path = tmp_path / "config.json"
    path.write_text(json.dumps(architecture.hf_config(_titan.ARGS)))
    return str(path)


def test_a_raw_torchtitan_step_is_refused_naming_torchtitan_and_the_option(titan, tmp_path, capsys):
    _, step = titan
    code = main(["convert", step, str(tmp_path / "out"), "--to", "hf",
                 "--model", _config_json(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "torchtitan checkpoint" in err and "--from torchtitan" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert main(["inspect", step]) == 0  # shown for what it is, its weights one model state
    shown = " ".join(capsys.readouterr().out.split())
    assert "a torchtitan checkpoint" in shown and "--from torchtitan" in shown
    assert "state model:" in shown and "state layers" not in shown


def test_renamed_keys_are_refused_by_convert_and_read_right_with_from_torchtitan(
    titan, tmp_path, capsys
):
    run, step = titan
    renamed = str(tmp_path / "renamed")
    _renamed(step, renamed)
    config = _config_json(tmp_path)
    assert main(["convert", renamed, str(tmp_path / "out"), "--to", "hf", "--model", config]) == 2
    err = capsys.readouterr().err
    assert "no ckpt manifest" in err and "--from torchtitan" in err
    assert not (tmp_path / "out").exists()
    # Declared, the same folder converts right: the permutation is applied.
    out = tmp_path / "ok"
    assert main(["convert", renamed, str(out), "--from", "torchtitan", "--to", "dcp",
                 "--model", config, "--no-progress"]) == 0  # fmt: skip
    from ckpt_core.content.families import model_family
    from ckpt_core.storage.dcp_entries import read_entries

    model = model_family("llama").build_model(json.loads(open(config).read()))
    model.load_state_dict({k[len("model.") :]: v for k, v in read_entries(str(out)).items()})
    probe = _titan.batch(torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(probe) - run.model(probe)).abs().max() < 1e-5


@pytest.mark.parametrize("which", ["raw", "renamed"])
def test_an_initial_load_of_a_torchtitan_folder_as_dcp_is_refused(titan, tmp_path, which):
    from ckpt_core import CheckpointConfig, CheckpointManager
    from ckpt_core.content.families import model_family
    from ckpt_core.errors import CheckpointError
    from ckpt_core.torchtitan import architecture

    _, step = titan
    path = step
    if which == "renamed":
        path = str(tmp_path / "renamed")
        _renamed(step, path)
    family, config = model_family("llama"), architecture.hf_config(_titan.ARGS)
    model = family.build_model(config)
    cfg = CheckpointConfig(
        folder=str(tmp_path / "run"), initial_load={"path": path}, export={"enable": False}
    )
    manager = CheckpointManager(cfg, model, sd_adapter=family.adapter(config))
    with pytest.raises(CheckpointError, match='format = "torchtitan"') as info:
        manager.load()
    assert "torchtitan" in str(info.value) and len(str(info.value).splitlines()) == 1
