"""An HF export that fails on rank 0 (which writes it) fails on every rank, with one line.

One launch of two gloo ranks over an FSDP2-sharded reference Llama (the export gathers
every tensor, a collective) checks three failures, each real:

* the export's parent turns out to be a file when rank 0 makes the temporary folder;
* the disk fills up while rank 0 writes the first of several files (``RLIMIT_FSIZE`` on
  rank 0 only): rank 0 keeps gathering with rank 1, then both raise;
* the same full disk during ``CheckpointManager.save``: both ranks raise the same
  one-line ``SaveError``, and no export is committed.

Before, rank 1 waited in a collective for a rank 0 that had given up.
"""

from __future__ import annotations

import errno
import os

import torch

from tests.core._dist import run_on_ranks

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=128)
FILE_LIMIT = 16 << 10  # bytes a file of rank 0 may reach while the disk is "full"


def _line(exc: BaseException) -> tuple[str, str, int | None]:
    return type(exc).__name__, str(exc), getattr(exc, "errno", None)


class _DiskFullOnRankZero:
    """Files of this process stop growing past FILE_LIMIT bytes (EFBIG), on rank 0 only."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __enter__(self) -> None:
        import resource
        import signal

        if self.rank == 0:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails instead
            self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, self.old[1]))

    def __exit__(self, *exc) -> None:
        import resource

        if self.rank == 0:
            resource.setrlimit(resource.RLIMIT_FSIZE, self.old)


def _failures(rank: int, world_size: int, folder: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from ckpt_core import CheckpointConfig, CheckpointManager, ModelWrapper, write_export
    from ckpt_core.reference import LlamaStateDictAdapter, ModelArgs, build_model

    args = ModelArgs(**ARGS)
    torch.manual_seed(0)
    model = build_model(args)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model.layers["0"].attention.wq.weight, DTensor)
    adapter = LlamaStateDictAdapter(args)
    out: dict = {}

    blocked = os.path.join(folder, "blocked")
    if rank == 0:
        open(blocked, "w").close()  # a file where the export's parent folder should be
    dist.barrier()
    try:
        write_export(
            ModelWrapper(model),
            os.path.join(blocked, "step-1"),
            fmt="hf",
            dtype=None,
            sd_adapter=adapter,
        )
    except Exception as exc:  # noqa: BLE001 - compared across ranks by the test
        out["folder"] = _line(exc)

    with _DiskFullOnRankZero(rank):
        try:
            write_export(
                ModelWrapper(model),
                os.path.join(folder, "full", "step-1"),
                fmt="hf",
                dtype=None,
                sd_adapter=adapter,
                max_shard_bytes=FILE_LIMIT,
            )
        except Exception as exc:  # noqa: BLE001
            out["disk"] = _line(exc)

    exports = os.path.join(folder, "exports")
    config = CheckpointConfig(
        folder=os.path.join(folder, "ckpt"),
        interval=100,
        preflight="off",
        export={"folder": exports, "interval": 1, "dtype": "float32"},
    )
    manager = CheckpointManager(config, model, sd_adapter=adapter)
    manager.acquire()
    with _DiskFullOnRankZero(rank):
        try:
            manager.save(1)
        except Exception as exc:  # noqa: BLE001
            out["manager"] = _line(exc)
    manager.close()
    dist.barrier()  # rank 0 has removed its temporary folder
    out["exports"] = sorted(os.listdir(exports)) if os.path.isdir(exports) else []
    return out


def test_an_export_failing_on_rank_zero_raises_the_same_error_on_every_rank(tmp_path):
    zero, one = run_on_ranks(_failures, 2, str(tmp_path), timeout=120)
    assert zero["folder"] == one["folder"], (zero["folder"], one["folder"])
    assert zero["folder"][0] == "NotADirectoryError" and "blocked" in zero["folder"][1]

    assert zero["disk"] == one["disk"], (zero["disk"], one["disk"])
    assert zero["disk"][2] == errno.EFBIG, zero["disk"]

    name, line, code = zero["manager"]
    assert (name, line, code) == one["manager"], (zero["manager"], one["manager"])
    assert name == "SaveError" and code == errno.EFBIG and "\n" not in line
    assert "exporting step 1" in line and "(EFBIG)" in line, line
    assert zero["exports"] == one["exports"] and not any(
        n.startswith(("step-", ".tmp-")) for n in zero["exports"]
    ), zero["exports"]
