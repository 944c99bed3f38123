"""Expert parallel (EP) and pipeline parallel (PP) in the reference trainer.

Four gloo ranks on CPU, tiny models. One spawn per layout pair runs, for each
converter set (none, lora, qat, qat+lora, float8), in the same processes:

* ``u``: an uninterrupted run of :data:`STEPS` steps on layout A (EP 2, or 2
  pipeline stages with two stages per rank), exporting the last step;
* ``chain``: ``u``'s step-2 checkpoint resumed on layout B (no EP / no PP,
  FSDP over 4) for step 3, then on layout A again for step 4: model,
  optimizer, scheduler, loader and train state cross both ways;
* ``same`` (no converters): ``u``'s step 2 resumed on layout A, bit-exact.

The parent then checks the chain's losses against ``u`` (within
:data:`LOSS_TOL`, the reduction order changed; :data:`QAT_LOSS_TOL` with QAT,
:data:`FLOAT8_LOSS_TOL` with Float8, emulated on CPU) and exports ``u``'s last
checkpoint on one rank: every tensor of that export (merged HF weights, PEFT
adapter, QAT integers and scales, Float8's weights) equals the EP/PP run's
export bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from tests.core._dist import run_on_ranks

STEPS = 4
#: Loss difference allowed after a layout change: EP sums expert outputs across
#: ranks in another order, PP accumulates microbatch gradients; AdamW turns those
#: float32 rounding differences (~1e-7 relative) into slightly different updates.
LOSS_TOL = 1e-4
#: With QAT a weight that moved by that rounding can land on the other side of a
#: quantization step, a visible change in the fake-quantized forward.
QAT_LOSS_TOL = 2e-3
#: Float8's dynamic activation scales follow the slice a rank or microbatch sees.
FLOAT8_LOSS_TOL = 1e-2

SETS = {
    "none": [],
    "lora": ["--converters.enabled", "lora", "--converters.lora.export", "both"],
    "qat": ["--converters.enabled", "qat"],
    "qat+lora": ["--converters.enabled", "qat,lora", "--converters.lora.export", "both"],
    "float8": ["--converters.enabled", "float8", "--converters.float8.emulate", "true"],
}
OWNED_ONLY = ["--converters.lora.trainable_only_checkpoints", "true"]
EP = ["--parallelism.expert_parallel_degree", "2"]
PP = ["--parallelism.pipeline_parallel_degree", "2"]


def _cfg(folder: str, model: str, steps: int, extra: list[str], export: bool) -> object:
    from ckpt_core.trainer.config import load_train_config

    return load_train_config(
        None,
        [
            "--job.folder", folder,
            "--job.device", "cpu",
            "--model.name", model,
            "--training.steps", str(steps),
            "--training.seq_len", "16",
            "--training.batch_size", "8",
            "--training.warmup_steps", "1",
            "--training.lr", "1e-3",
            "--checkpoint.interval", "2",
            "--checkpoint.export.enable", str(export).lower(),
            "--checkpoint.export.dtype", "float32",
            "--metrics.log_every", "100",
            *extra,
        ],
    )  # fmt: skip


def _train(cfg: object, rank: int, world: int) -> None:
    from ckpt_core.trainer.launch import Dist
    from ckpt_core.trainer.loop import train

    train(cfg, Dist(rank, world, rank, torch.device("cpu")))


def _ep_gradients(rank: int, world: int) -> float:
    """EP (2 of 4 FSDP ranks) against the plain model on the whole batch: the largest
    gradient difference over every parameter (experts, router, attention)."""
    import torch.nn.functional as F

    from ckpt_core.reference.moe import MOE_FLAVORS, MoETransformer
    from ckpt_core.trainer.parallel import build_mesh, parallelize

    torch.manual_seed(0)
    args = copy.deepcopy(MOE_FLAVORS["tiny"])
    plain = MoETransformer(args)
    plain.init_weights()
    model = copy.deepcopy(plain)
    mesh = build_mesh({"pp": 1, "dp_shard": world, "ep": 2, "tp": 1}, "cpu")
    parallelize(model, mesh)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(args.vocab_size, (world * 2, 8), generator=gen)
    mine = tokens[2 * rank : 2 * rank + 2]

    def loss_of(m: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
        logits = m(t[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten())

    loss_of(model, mine).backward()
    # The plain model: the mean of every rank's loss (what FSDP's mean gradient is).
    torch.stack([loss_of(plain, tokens[2 * r : 2 * r + 2]) for r in range(world)]).mean().backward()
    worst = 0.0
    sharded = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        grad = sharded[name].grad.full_tensor()
        worst = max(worst, float((grad - p.grad).abs().max()))
        assert float(p.grad.abs().max()) > 0, name
    return worst


def _fork(src: str, dst: str, step: int) -> None:
    """A run folder holding ``src``'s checkpoint ``step`` and its metrics up to it."""
    shutil.copytree(f"{src}/checkpoints/step-{step}", f"{dst}/checkpoints/step-{step}")
    lines = Path(f"{src}/metrics.jsonl").read_text().splitlines(keepends=True)
    Path(f"{dst}/metrics.jsonl").write_text("".join(lines[:step]))


def _chains(
    rank: int, world: int, root: str, runs: dict[str, tuple[str, list[str]]], layout: list[str]
) -> float:
    """Every converter set: ``u`` on layout A, then the A -> B -> A chain."""
    import time

    import torch.distributed as dist

    t0 = time.perf_counter()
    worst = _ep_gradients(rank, world) if layout == EP else 0.0
    for name, (model, conv) in runs.items():
        base = os.path.join(root, name)
        _train(_cfg(f"{base}/u", model, STEPS, layout + conv, True), rank, world)
        chain = f"{base}/chain"
        same = f"{base}/same"  # u's step 2 resumed on its own layout (no converters only)
        if rank == 0:  # steps 1-2 on layout A are u's: start the chain from its step 2
            _fork(f"{base}/u", chain, 2)
            if not conv:
                _fork(f"{base}/u", same, 2)
        dist.barrier()
        _train(_cfg(chain, model, 3, conv, False), rank, world)
        _train(_cfg(chain, model, 4, layout + conv, False), rank, world)
        if not conv:
            _train(_cfg(same, model, 4, layout, False), rank, world)
    if rank == 0:
        print(f"{layout}: {time.perf_counter() - t0:.1f}s")
    return worst


def _losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {
        str(f.relative_to(folder)): load_file(str(f)) for f in sorted(folder.rglob("*.safetensors"))
    }


def _same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return sorted(a) == sorted(b) and all(
        sorted(a[f]) == sorted(b[f]) and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a
    )


def _check(root: Path, runs: dict[str, tuple[str, list[str]]]) -> None:
    from ckpt_core.trainer.launch import Dist
    from ckpt_core.trainer.loop import train

    for name, (model, conv) in runs.items():
        u, chain = _losses(root / name / "u"), _losses(root / name / "chain")
        assert sorted(chain) == list(range(1, STEPS + 1)), (name, sorted(chain))
        for step in range(3, STEPS + 1):
            tol = {"qat": QAT_LOSS_TOL, "float8": FLOAT8_LOSS_TOL}.get(name.split("+")[0], LOSS_TOL)
            assert abs(chain[step] - u[step]) < tol, (name, step, chain[step], u[step])
        if not conv:  # the same layout resumes bit-exact
            assert _losses(root / name / "same") == u, name
            # ckpt convert of the EP/PP checkpoint, offline on one process: the same tensors.
            from ckpt_core.cli.convert_cmd import convert

            dst = root / name / "converted"
            convert(str(root / name / "u" / "checkpoints"), str(dst), to="hf", dtype="float32")
            exported = _tensors(root / name / "u" / "export" / f"step-{STEPS}")
            assert _same(_tensors(dst), exported), name
        print(f"{name}: largest loss difference {max(abs(chain[s] - u[s]) for s in chain):.2e}")
        # One rank loads u's last checkpoint and exports it: the same tensors.
        one = root / name / "one"
        cfg = _cfg(str(one), model, STEPS, conv, True)
        cfg.checkpoint.folder = str(root / name / "u" / "checkpoints")
        train(cfg, Dist(0, 1, 0, torch.device("cpu")))
        mine = _tensors(root / name / "u" / "export" / f"step-{STEPS}")
        single = _tensors(one / "export" / f"step-{STEPS}")
        assert sorted(mine) == sorted(single) and mine, (name, sorted(mine), sorted(single))
        if "lora" in name:
            assert any("adapter" in f for f in mine), sorted(mine)  # the PEFT adapter too
        for file, tensors in mine.items():
            assert sorted(tensors) == sorted(single[file]), (name, file)
            for key, value in tensors.items():
                assert torch.equal(value, single[file][key]), (name, file, key)


def _hf_base(folder: Path, model: str) -> str:
    """An HF folder of ``model``'s fresh weights (one step on one rank, exported)."""
    from ckpt_core.trainer.launch import Dist
    from ckpt_core.trainer.loop import train

    train(_cfg(str(folder), model, 1, [], True), Dist(0, 1, 0, torch.device("cpu")))
    return str(folder / "export" / "step-1")


def _four_layer_llama(folder: Path) -> str:
    from ckpt_core.reference.flavors import FLAVORS
    from ckpt_core.reference.hf_config import to_hf_config

    args = copy.deepcopy(FLAVORS["tiny"])
    args.n_layers = 4  # two stages per rank on two pipeline ranks
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(to_hf_config(args)))
    return str(path)


def test_expert_parallel_resumes_without_ep_and_back_and_exports_match(tmp_path: Path) -> None:
    runs = {name: ("moe:tiny", conv) for name, conv in SETS.items()}
    worst = run_on_ranks(_chains, 4, str(tmp_path), runs, EP, timeout=500)
    assert max(worst) < 1e-6, worst  # EP gradients equal the plain model's
    _check(tmp_path, runs)


def test_pipeline_resumes_on_one_stage_and_back_and_exports_match(tmp_path: Path) -> None:
    model = _four_layer_llama(tmp_path / "model")
    runs = {name: (model, conv) for name, conv in SETS.items()}
    # LoRA with owned-only checkpoints: the base comes from an HF folder on every load
    # (each stage reads its own tensors), the checkpoints hold the adapters only.
    runs["lora"] = (_hf_base(tmp_path / "base", model), [*SETS["lora"], *OWNED_ONLY])
    run_on_ranks(_chains, 4, str(tmp_path), runs, PP, timeout=500)
    _check(tmp_path, runs)
    saved = json.loads((tmp_path / "lora/u/checkpoints/step-2/manifest.json").read_text())
    assert "base" in saved, sorted(saved)  # an owned-only checkpoint
