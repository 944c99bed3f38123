"""The fast DCP reader: torch-written checkpoints load exactly, fast path or not."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from ckpt_core.storage import fast_reader
from ckpt_core.storage.fast_reader import FastFileSystemReader, _region_start
from ckpt_core.storage.safe_metadata import SafeLoadPlanner


def _saved(tmp_path) -> dict:
    torch.manual_seed(0)
    state = {
        "w": torch.randn(33, 17),
        "half": torch.randn(9, dtype=torch.bfloat16),
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "transposed": torch.randn(5, 7).t(),  # strided on disk: torch's path
        "scalar": torch.tensor(3.5),
        "meta": {"step": 4},
    }
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    return state


def _load(tmp_path, dest: dict, monkeypatch) -> list[str]:
    slow: list[str] = []
    real = FastFileSystemReader._torch_path

    def counting(self, stream, req, item, planner):
        slow.append(req.storage_index.fqn)
        return real(self, stream, req, item, planner)

    monkeypatch.setattr(FastFileSystemReader, "_torch_path", counting)
    reader = FastFileSystemReader(str(tmp_path))
    dcp.load(dest, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return slow


def test_torch_written_checkpoints_load_exactly_with_contiguous_tensors_read_in_place(
    tmp_path, monkeypatch
):
    state = _saved(tmp_path)
    dest = {
        k: (torch.zeros_like(v).contiguous() if isinstance(v, torch.Tensor) else {"step": 0})
        for k, v in state.items()
    }
    pointers = {k: v.data_ptr() for k, v in dest.items() if isinstance(v, torch.Tensor)}
    slow = _load(tmp_path, dest, monkeypatch)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(dest[key], value), key
            assert dest[key].data_ptr() == pointers[key]  # loaded in place
    assert dest["meta"] == {"step": 4}
    assert sorted(slow) == ["meta.step", "transposed"]


def test_a_dtype_change_goes_through_torchs_path_and_casts(tmp_path, monkeypatch):
    state = _saved(tmp_path)
    dest = {"w": torch.zeros(33, 17, dtype=torch.bfloat16)}
    slow = _load(tmp_path, dest, monkeypatch)
    assert slow == ["w"]
    assert torch.equal(dest["w"], state["w"].to(torch.bfloat16))


def test_the_fast_path_can_be_switched_off(tmp_path, monkeypatch):
    state = _saved(tmp_path)
    monkeypatch.setenv("CKPT_FAST_READ", "0")
    assert not fast_reader.enabled()
    dest = {"w": torch.zeros(33, 17)}
    assert _load(tmp_path, dest, monkeypatch) == ["w"]
    assert torch.equal(dest["w"], state["w"])


def test_only_row_ranges_count_as_one_contiguous_region():
    size = (8, 4, 2)
    assert _region_start(size, (2, 0, 0), (3, 4, 2)) == 2 * 8  # rows 2..4
    assert _region_start(size, (5, 1, 0), (1, 2, 2)) == 5 * 8 + 1 * 2  # inside one row
    assert _region_start(size, (0, 1, 0), (8, 2, 2)) is None  # a column block
    assert _region_start((), (), ()) == 0
