"""A run moves from torchtitan to ckpt with its optimizer state, and back."""

from __future__ import annotations

import torch

from ckpt_core.cli.main import main
from tests.torchtitan import _titan
from tests.torchtitan.conftest import STEPS


def _config() -> dict:
    from ckpt_core.torchtitan import architecture

    return architecture.hf_config(_titan.ARGS)


def _ckpt_run(folder, *, initial=None, lr_lambda=None):
    """ckpt's reference Llama with AdamW, LambdaLR and a CheckpointManager."""
    from ckpt_core import CheckpointConfig, CheckpointManager
    from ckpt_core.content.families import model_family

    family, config = model_family("llama"), _config()
    torch.manual_seed(7)
    model = family.build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)  # the checkpoint's groups replace these
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda or (lambda step: 1.0))
    cfg = CheckpointConfig(folder=str(folder), initial_load=initial or {}, export={"enable": False})
    manager = CheckpointManager(
        cfg, model, optimizers=opt, lr_schedulers=sched, sd_adapter=family.adapter(config)
    )
    return model, opt, sched, manager


def _step_ckpt(model, opt, sched, tokens) -> None:
    _titan.loss_of(model(tokens), tokens).backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _resumed_titan(folder: str) -> _titan.Run:
    """A fresh torchtitan run resumed by its own manager from ``folder``/checkpoint."""
    run = _titan.build(seed=3)
    manager = _titan.manager(run, folder, exclude_from_loading=["dataloader"])
    assert manager.load()
    manager.close()
    return run


def _as_ckpt(run: _titan.Run) -> dict[str, torch.Tensor]:
    """torchtitan's weights under ckpt's names and layout."""
    from ckpt_core.torchtitan import Heads, from_torchtitan

    heads = Heads.from_hf_config(_config())
    entries = from_torchtitan(run.model.state_dict(), heads, source="live").entries
    return {k.removeprefix("model."): v for k, v in entries.items()}


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def test_a_ckpt_run_continues_a_torchtitan_step_with_its_adam_state_and_goes_back(titan, tmp_path):
    run, step = titan
    lam = run.schedulers.schedulers[0].lr_lambdas[0]  # the same schedule, to compare steps
    initial = {"path": step, "format": "torchtitan", "model_only": False}
    model, opt, sched, manager = _ckpt_run(tmp_path / "ckpt", initial=initial, lr_lambda=lam)
    assert manager.load()
    assert manager.train_state.step == STEPS
    assert manager.train_state.tokens_seen == run.state.ntokens_seen
    assert sched.last_epoch == STEPS
    assert opt.param_groups[0]["lr"] == run.optimizers.optimizers[0].param_groups[0]["lr"]

    # torchtitan resumes its own step; both take the same next step: Adam's moments,
    # step counts, learning rate and weight decay must all have come across.
    titan_run = _titan.build(seed=3)
    tm = _titan.manager(titan_run, str(tmp_path / "tt-resume"), initial_load_path=step,
                        initial_load_model_only=False)  # fmt: skip
    assert tm.load()
    tm.close()
    probe = _titan.batch(torch.Generator().manual_seed(5))
    tokens = _titan.batch(torch.Generator().manual_seed(9))
    assert (_logits(model, probe) - _logits(titan_run.model, probe)).abs().max() < 1e-5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _titan.train_step(titan_run, tokens)
    _step_ckpt(model, opt, sched, tokens)
    theirs = _as_ckpt(titan_run)
    for name, param in model.named_parameters():
        # Moments lost or misplaced would move a tensor by about a whole step; float noise in
        # the gradients (GQA sums in another order) moves Adam's update by far less.
        step_size = (param - before[name]).abs().max()
        assert (param - theirs[name]).abs().max() < 0.01 * step_size, name

    # ... and back: ckpt saves its step, which converts to a step torchtitan resumes.
    manager.train_state.step = STEPS + 1
    manager.save(STEPS + 1, last_step=True)
    manager.close()
    back = tmp_path / "back" / "checkpoint" / f"step-{STEPS + 1}"
    assert main(["convert", str(tmp_path / "ckpt"), str(back), "--to", "torchtitan"]) == 0
    again = _resumed_titan(str(tmp_path / "back"))
    assert (_logits(again.model, probe) - _logits(model, probe)).abs().max() < 1e-5
    assert again.state.step == STEPS + 1 and again.schedulers.schedulers[0].last_epoch == STEPS + 1
    ours, theirs = again.optimizers.state_dict(), titan_run.optimizers.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:  # the same Adam state torchtitan reached itself, up to float noise
        if isinstance(ours[key], torch.Tensor):
            assert torch.allclose(ours[key], theirs[key], atol=1e-6, rtol=1e-4), key
        else:
            assert ours[key] == theirs[key], key


def test_moments_are_bit_equal_after_torchtitan_to_ckpt_to_torchtitan(titan, tmp_path):
    run, step = titan
    ckpt_step = tmp_path / "ckpt" / f"step-{STEPS}"
    args = _titan.args_file(tmp_path / "args.json")
    assert main(["convert", step, str(ckpt_step), "--from", "torchtitan", "--to", "dcp",
                 "--model", args, "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "tt" / "checkpoint" / f"step-{STEPS}"
    assert main(["convert", str(ckpt_step), str(out), "--to", "torchtitan"]) == 0
    again = _resumed_titan(str(tmp_path / "tt"))
    before, after = run.optimizers.state_dict(), again.optimizers.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
    assert again.state.state_dict() == run.state.state_dict()
    assert again.schedulers.state_dict() == run.schedulers.state_dict()

    # torchtitan's initial_load_path reads the same folder (weights only, its default).
    fresh = _titan.build(seed=4)
    tm = _titan.manager(fresh, str(tmp_path / "fresh"), initial_load_path=str(out))
    assert tm.load()
    tm.close()
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, fresh.model.state_dict()[key]), key


def test_an_hf_export_of_ckpt_is_read_by_torchtitans_initial_load_in_hf(titan, tmp_path):
    from torchtitan.models.llama3 import Llama3StateDictAdapter

    run, step = titan
    initial = {"path": step, "format": "torchtitan"}
    model, _, _, manager = _ckpt_run(tmp_path / "ckpt", initial=initial)
    assert manager.load()
    from ckpt_core.policy.exporter import write_export

    export = tmp_path / "export"
    write_export(manager.wrapper, str(export), fmt="hf", dtype="float32",
                 sd_adapter=manager.sd_adapter)  # fmt: skip
    manager.close()
    fresh = _titan.build(seed=5)
    adapter = Llama3StateDictAdapter(_titan.model_config(), None)
    tm = _titan.manager(fresh, str(tmp_path / "tt"), sd_adapter=adapter,
                        initial_load_path=str(export), initial_load_in_hf=True)  # fmt: skip
    assert tm.load()
    tm.close()
    probe = _titan.batch(torch.Generator().manual_seed(5))
    assert (_logits(fresh.model, probe) - _logits(run.model, probe)).abs().max() < 1e-5
