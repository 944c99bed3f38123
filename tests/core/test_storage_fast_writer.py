"""The O_DIRECT writer keeps DCP's format: torch's own reader loads what it writes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckpt_core.storage import fast_writer, manifest
from ckpt_core.storage.dcp_io import storage_writer, written_checksums


def _state() -> dict:
    torch.manual_seed(0)
    return {
        "model": {
            "big": torch.randn(301, 257),  # spans several (shrunk) buffers, odd length
            "ints": torch.arange(1001, dtype=torch.int64),
            "half": torch.randn(77, dtype=torch.bfloat16),
        },
        "meta": {"step": 12, "name": "run"},
    }


def _zeros_like(state: dict) -> dict:
    return {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "meta": {"step": 0, "name": ""},
    }


@pytest.fixture
def small_buffer(monkeypatch):
    monkeypatch.setattr(fast_writer, "BUFFER_BYTES", 64 << 10)


def test_direct_io_files_load_with_torchs_own_reader_and_match_the_manifest(tmp_path, small_buffer):
    state = _state()
    writer = storage_writer(str(tmp_path / "direct"), direct_io=True)
    dcp.save(state, storage_writer=writer, no_dist=True)
    plain = dcp.FileSystemWriter(str(tmp_path / "plain"))
    dcp.save(state, storage_writer=plain, no_dist=True)

    out = _zeros_like(state)
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(tmp_path / "direct")), no_dist=True)
    for key, value in state["model"].items():
        assert torch.equal(out["model"][key], value), key
    assert out["meta"] == state["meta"]

    records = written_checksums(writer)
    for name, (size, checksum) in records.items():
        path = tmp_path / "direct" / name
        assert path.stat().st_size == size  # the padded tail was truncated away
        assert manifest.file_checksum(str(path)) == checksum
    data = "__0_0.distcp"
    assert (tmp_path / "direct" / data).stat().st_size == (tmp_path / "plain" / data).stat().st_size


@pytest.mark.parametrize("refuse_direct", [False, True])
def test_unaligned_writes_round_trip_with_direct_io_or_its_buffered_fallback(
    tmp_path, monkeypatch, small_buffer, refuse_direct
):
    if refuse_direct:  # as on file systems without O_DIRECT (EINVAL at open)
        real_open = os.open

        def no_direct(path, flags, mode=0o777):
            if flags & os.O_DIRECT:
                raise OSError(22, "Invalid argument")
            return real_open(path, flags, mode)

        monkeypatch.setattr(fast_writer.os, "open", no_direct)
    path = str(tmp_path / "blob.bin")
    stream = fast_writer.DirectStream(path)
    assert stream.direct is not refuse_direct
    payload = os.urandom(200_001)  # > 3 buffers, odd tail
    for start in range(0, len(payload), 70_001):
        stream.write(payload[start : start + 70_001])
    assert stream.tell() == len(payload)
    os.fsync(stream.fileno())
    stream.close()
    with open(path, "rb") as f:
        assert f.read() == payload
