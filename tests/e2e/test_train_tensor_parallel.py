"""Tensor parallel in the reference trainer: save on one layout, resume and export on another.

One spawn of 4 gloo ranks (CPU) runs every converter set through ``train()``
in the same processes (``_layouts``):

* rank 0 alone (a one-rank group) first trains 2 steps, the source of 1 -> 2x2;
* the 4 ranks: an uninterrupted FSDP2 x TP (2 x 2) run of 4 steps (checkpoint at
  2), then resumes of its step 2 on 2x2 (same layout), FSDP only (4) and TP only
  (4), and of rank 0's one-rank step 2 on 2x2; each layout also loads step 2 and
  exports it;
* rank 0 alone again: resume of the 2x2 step 2 on one rank, and its export.

The model is the tiny Llama with 4 key/value heads, so TP 4 divides every head count.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import shutil
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from tests.e2e import _train as t

SETS = dict(t.CONVERTER_SETS)  # none, lora, qat, float8, qat+lora
LAYOUTS = {"2x2": (2, 2), "fsdp4": (4, 1), "tp4": (1, 4)}
#: Loss differences allowed after a change of layout: another reduction order in
#: fp32 (measured up to 1e-6); Float8 scales activations by the amax of each rank's
#: own slice, so its losses move with the split of the batch; QAT: a weight that lands
#: on a rounding boundary flips to the next integer (measured up to 5.3e-4; Float8 1.7e-3).
TOL = {"float8": 1e-2, "qat": 2e-3, "qat+lora": 2e-3}
TOL_DEFAULT = 1e-5
WORLD = 4
OWNED = ("--converters.lora.trainable_only_checkpoints", "true")
HANG_S = 400


def _overrides(
    job: Path,
    model: str,
    sets: list[str],
    steps: int,
    dp: int,
    tp: int,
    export: bool = False,
    extra: tuple[str, ...] = (),
) -> list[str]:
    args = [
        "--model.name", model, "--job.folder", str(job), "--training.steps", str(steps),
        "--training.seq_len", "16", "--training.batch_size", "4", "--training.warmup_steps", "2",
        "--training.lr", "1e-3", "--checkpoint.interval", "2", "--metrics.log_every", "100",
        "--checkpoint.export.enable", str(export).lower(),
        "--checkpoint.export.dtype", "float32",
        "--parallelism.data_parallel_shard_degree", str(dp),
        "--parallelism.tensor_parallel_degree", str(tp),
    ]  # fmt: skip
    if "lora" in sets:
        args += ["--converters.lora.export", "both"]  # merged model and PEFT adapter
    return args + t.converter_args(sets) + list(extra)


def _train(*args: Any, **kwargs: Any) -> dict:
    """``train()`` on this process's group with :func:`_overrides` ``(*args, **kwargs)``."""
    import torch.distributed as dist

    from ckpt_core.trainer.config import load_train_config
    from ckpt_core.trainer.launch import Dist
    from ckpt_core.trainer.loop import train

    cfg = load_train_config(None, _overrides(*args, **kwargs))
    rank, world = dist.get_rank(), dist.get_world_size()
    return train(cfg, Dist(rank, world, rank, torch.device("cpu")))


def _copy_step(src: Path, dst: Path, step: int) -> None:
    """A job folder holding only ``src``'s checkpoint ``step`` and the metrics up to it."""
    shutil.copytree(src / "checkpoints" / f"step-{step}", dst / "checkpoints" / f"step-{step}")
    lines = [
        line
        for line in (src / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= step
    ]
    (dst / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _exports(job: Path, step: int) -> dict[str, dict[str, str]]:
    """Every safetensors file of the export of ``step``: relative path -> key -> digest.

    The digest covers dtype, shape and bytes: equal digests are equal tensors.
    """
    from safetensors.torch import load_file

    root = job / "export" / f"step-{step}"
    out = {}
    for path in sorted(root.rglob("*.safetensors")):
        out[str(path.relative_to(root))] = {
            key: _digest(value) for key, value in load_file(str(path)).items()
        }
    return out


def _mesh(job: Path, step: int) -> object:
    """The ``"mesh"`` record of ``job``'s checkpoint ``step`` (the layout it was saved with)."""
    man = json.loads((job / "checkpoints" / f"step-{step}" / "manifest.json").read_text())
    return man["mesh"]


def _digest(value: torch.Tensor) -> str:
    data = value.contiguous().view(torch.uint8).numpy().tobytes()
    return f"{value.dtype} {tuple(value.shape)} {hashlib.sha256(data).hexdigest()}"


def _one_rank(fn, *args):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def _layouts(rank: int, port: int, root: str, model: str, out) -> None:
    """One rank of the spawn (see the module docstring); rank 0 reports the results."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A hang shows every rank's stack and ends the rank instead of stalling the suite.
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.stderr)
    root_path = Path(root)
    res: dict = {name: {"losses": {}, "exports": {}, "mesh": {}} for name in SETS}
    try:
        if rank == 0:
            for name, sets in SETS.items():
                _one_rank(_train, root_path / f"one-{name}", model, sets, 2, 1, 1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
        )
        for name, sets in SETS.items():
            r = res[name]
            ref = root_path / f"ref-{name}"
            _train(ref, model, sets, 4, 2, 2)
            r["losses"]["ref"] = t.losses(ref)
            r["mesh"]["2x2"] = _mesh(ref, 2)
            sources = {f"{lay}": (ref, LAYOUTS[lay]) for lay in LAYOUTS}
            sources["1->2x2"] = (root_path / f"one-{name}", (2, 2))
            for lay, (src, (dp, tp)) in sources.items():
                job = root_path / f"resume-{lay.replace('>', '')}-{name}"
                if rank == 0:
                    _copy_step(src, job, 2)
                dist.barrier()
                _train(job, model, sets, 4, dp, tp)
                r["losses"][lay] = t.losses(job)
                r["mesh"][lay] = _mesh(job, 4)
                if lay in ("2x2", "tp4"):  # load step 2 on this layout and export it
                    job = root_path / f"export-{lay}-{name}"
                    if rank == 0:
                        _copy_step(ref, job, 2)
                    dist.barrier()
                    _train(job, model, sets, 2, dp, tp, export=True)
                    r["exports"][lay] = _exports(job, 2) if rank == 0 else None
        # LoRA with owned-only checkpoints (adapters only) on 2x2, from an HF base; its step
        # 2 loaded on TP 4 (here) and one rank (below) and exported.
        base = str(root_path / "export-2x2-none" / "export" / "step-2")
        _train(root_path / "owned-2x2", base, ["lora"], 2, 2, 2, extra=OWNED)
        job = root_path / "owned-export-tp4"
        if rank == 0:
            _copy_step(root_path / "owned-2x2", job, 2)
        dist.barrier()
        _train(job, base, ["lora"], 2, 1, 4, export=True, extra=OWNED)
        owned = {"tp4": _exports(job, 2) if rank == 0 else None, "manifest": None}
        if rank == 0:
            owned["manifest"] = json.loads(
                (root_path / "owned-2x2/checkpoints/step-2/manifest.json").read_text()
            )
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            for name, sets in SETS.items():
                r = res[name]
                job = root_path / f"resume-1-{name}"
                _copy_step(root_path / f"ref-{name}", job, 2)
                _one_rank(_train, job, model, sets, 4, 1, 1)
                r["losses"]["1"] = t.losses(job)
                r["mesh"]["1"] = _mesh(job, 4)
                job = root_path / f"export-1-{name}"
                _copy_step(root_path / f"ref-{name}", job, 2)
                _one_rank(_train, job, model, sets, 2, 1, 1, True)
                r["exports"]["1"] = _exports(job, 2)
            job = root_path / "owned-export-1"
            _copy_step(root_path / "owned-2x2", job, 2)
            _one_rank(_train, job, base, ["lora"], 2, 1, 1, True, OWNED)
            owned["1"] = _exports(job, 2)
            res["owned"] = owned
        out.put((rank, True, res if rank == 0 else None))
    except BaseException:  # noqa: BLE001 - every failure goes to the parent
        out.put((rank, False, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    """Rank 0's results of the spawn: per converter set, losses and exports per layout."""
    # Imported before the fork: every rank runs the same code.
    import ckpt_core.cli.main  # noqa: F401
    import ckpt_core.policy.manager  # noqa: F401
    from ckpt_core.trainer.loop import model_family_for

    for sets in SETS.values():
        assert t.plugin_missing(sets) is None
    root = tmp_path_factory.mktemp("tp")
    _, hf = model_family_for("tiny")
    hf = dict(hf, num_key_value_heads=4)
    model = root / "tiny-mha.json"
    model.write_text(json.dumps(hf))
    os.environ.pop("CKPT_DISABLE_PLUGIN_AUTOLOAD", None)
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_layouts, args=(r, port, str(root), str(model), out), daemon=True)
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(WORLD):
            rank, ok, value = out.get(timeout=600)
            if not ok:
                pytest.fail(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return dict(results[0], root=root)


@pytest.mark.parametrize("name", list(SETS))
def test_every_layout_resumes_the_2x2_step_with_the_uninterrupted_losses(layouts, name):
    losses = layouts[name]["losses"]
    ref = losses["ref"]
    assert sorted(ref) == [1, 2, 3, 4]
    # The same layout resumes bit-exactly.
    assert [losses["2x2"][s] for s in (3, 4)] == [ref[3], ref[4]]
    tol = TOL.get(name, TOL_DEFAULT)
    for lay in ("fsdp4", "tp4", "1", "1->2x2"):
        got = losses[lay]
        assert sorted(got) == [1, 2, 3, 4], lay
        diffs = [abs(got[s] - ref[s]) for s in (3, 4)]
        print(f"{name} {lay}: |loss - 2x2 loss| at steps 3, 4 = {diffs}")
        assert max(diffs) <= tol, (lay, diffs)


@pytest.mark.parametrize("name", list(SETS))
def test_exports_of_every_layout_equal_the_one_rank_export_tensor_for_tensor(layouts, name):
    exports = layouts[name]["exports"]
    one = exports["1"]
    assert one, "the one-rank run exported no safetensors"
    for lay in ("2x2", "tp4"):  # FSDP-only exports: tests/core/test_export_hf.py
        got = exports[lay]
        assert sorted(got) == sorted(one), lay
        for file, tensors in one.items():
            assert sorted(got[file]) == sorted(tensors), (lay, file)
            for key, value in tensors.items():
                assert got[file][key] == value, (lay, file, key)


def test_the_manifest_records_mesh_placements_per_family_and_the_split(layouts):
    mesh = layouts["lora"]["mesh"]
    m = mesh["2x2"]
    assert m["root"] == {"shape": [1, 2, 2], "dim_names": ["pp", "dp_shard", "tp"]}
    fam = m["families"]
    # FSDP2 over a TP row shard interleaves its rows: torch's _StridedShard.
    assert fam["layers.*.attention.wq.weight"] == ["dp_shard: StridedShard(0)", "tp: Shard(0)"]
    assert fam["layers.*.attention.wo.weight"] == ["dp_shard: Shard(0)", "tp: Shard(1)"]
    # LoRA factors: B split like a column-wise linear's rows, A like a row-wise one's columns.
    assert fam["layers.*.attention.wq.lora_b.weight"] == [
        "dp_shard: StridedShard(0)",
        "tp: Shard(0)",
    ]
    assert fam["layers.*.attention.wq.lora_a.weight"] == ["dp_shard: Shard(0)", "tp: Replicate()"]
    assert fam["layers.*.feed_forward.w2.lora_a.weight"] == ["dp_shard: Shard(0)", "tp: Shard(1)"]
    assert fam["tok_embeddings.weight"] == ["dp_shard: Shard(0)"]
    one_part = {"layers": ["0", "1"], "modules": ["norm", "output", "tok_embeddings"]}
    assert m["pipeline"] == [{"ranks": [0, 1, 2, 3], "parts": [one_part]}]
    assert mesh["tp4"]["families"]["layers.*.attention.wq.weight"] == ["tp: Shard(0)"]
    assert mesh["tp4"]["families"]["norm.weight"] == []
    assert mesh["fsdp4"]["families"]["layers.*.attention.wq.weight"] == ["dp_shard: Shard(0)"]
    assert mesh["1"] is None


def test_inspect_shows_the_layout_and_reads_old_manifests(layouts, capsys):
    from ckpt_core.cli.main import main
    from ckpt_core.policy.parallel_layout import layout_lines

    step = layouts["root"] / "ref-lora" / "checkpoints"
    assert main(["inspect", str(step), "--step", "2"]) == 0
    out = capsys.readouterr().out
    assert "mesh pp=1 x dp_shard=2 x tp=2 (cpu)" in out
    assert "layers.*.attention.wo.weight: dp_shard: Shard(0), tp: Shard(1)" in out
    assert "ranks [0, 1, 2, 3]: layers 0,1 + norm,output,tok_embeddings" in out
    # Manifests written before the layout record: no mesh, or the first DTensor's only.
    assert layout_lines(None) == ["layout: one process, no mesh"]
    old = {"shape": [2], "dim_names": [], "device_type": "cpu", "placements": ["Shard(dim=0)"]}
    assert layout_lines(old)[1] == "  placements ['Shard(dim=0)']"


def test_ckpt_convert_of_a_tp_checkpoint_equals_the_one_rank_export(layouts, tmp_path):
    """Offline, one process: the 2x2 step 2 to HF, as the one-rank run exported it."""
    from safetensors.torch import load_file

    from ckpt_core.cli.main import main

    src = layouts["root"] / "ref-none" / "checkpoints" / "step-2"
    args = ["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--no-progress"]
    assert main(args) == 0
    got = {}
    for path in (tmp_path / "hf").glob("*.safetensors"):
        got.update({k: _digest(v) for k, v in load_file(str(path)).items()})
    want = {k: v for f in layouts["none"]["exports"]["1"].values() for k, v in f.items()}
    assert got == want


def test_an_owned_only_tp_checkpoint_loads_and_exports_on_any_layout(layouts):
    """LoRA checkpoints holding the adapters only, saved on 2x2: TP 4 and one rank export
    the same merged model and PEFT adapter."""
    owned = layouts["owned"]
    assert "base" in owned["manifest"]  # an owned-only checkpoint
    assert owned["1"] and owned["tp4"] == owned["1"]
    assert any("adapter" in name for name in owned["1"]), sorted(owned["1"])
