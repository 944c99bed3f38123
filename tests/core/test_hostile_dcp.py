"""Crafted DCP checkpoints: no code runs, no byte is read outside the folder, one-line errors.

Each test saves a real checkpoint, then rewrites its ``.metadata`` the way an
attacker would (a real DCP ``Metadata`` object, unpickled, changed, pickled
again) and rewrites ``manifest.json`` to match, so only the readers stand in
the way. Payloads would create a marker file if they ran.
"""

from __future__ import annotations

import io
import os
import pickle
import resource
import shutil
import zipfile

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from ckpt_core import CheckpointConfig, CheckpointError
from ckpt_core.cli.main import main
from ckpt_core.policy.manager import CheckpointManager
from ckpt_core.storage import manifest
from ckpt_core.storage.metadata_checks import check_metadata
from ckpt_core.storage.safe_metadata import read_metadata, safe_load
from tests.core._manager_models import TinyNet
from tests.core.hf_helpers import save_hf_llama

STATES = ("model", "optimizer", "lr_scheduler", "train_state", "dataloader")


class Loader:
    """A dataloader's resumable state: a position (plain int) and an order (a tensor)."""

    def __init__(self) -> None:
        self.position = 0
        self.order = torch.arange(8)

    def state_dict(self) -> dict:
        return {"position": self.position, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.order = state["position"], state["order"]


class Payload:
    """Unpickling this creates ``marker`` (through ``open``): proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _manager(folder, **config) -> CheckpointManager:
    torch.manual_seed(0)
    model = TinyNet(8)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)
    model(torch.randn(2, 8)).sum().backward()
    optim.step()
    sched.step()
    return CheckpointManager(
        CheckpointConfig(folder=str(folder), **config),
        model,
        optimizers=optim,
        lr_schedulers=sched,
        dataloader=Loader(),
    )


def _saved(tmp_path) -> str:
    run = _manager(tmp_path / "ckpt", interval=1)
    run.save(1)
    run.close()
    return str(tmp_path / "ckpt" / "step-1")


def _tamper(step: str, edit) -> None:
    """Rewrite ``step``'s ``.metadata`` with ``edit(metadata)``, then its manifest to match."""
    path = os.path.join(step, ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # our own file: the test is the attacker here
    edit(metadata)
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    _rewrite_manifest(step)


def _rewrite_manifest(step: str, **fields) -> None:
    found = manifest.read(step) or {}
    found.update(files=manifest.file_entries(step), **fields)
    manifest.write(step, found)


def _archive(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _plant(step: str, key: str, data: bytes, name: str = "planted.distcp"):
    """An edit that stores ``key`` as a bytes entry holding ``data`` (in a new file)."""
    with open(os.path.join(step, name), "wb") as f:
        f.write(data)

    def edit(metadata):
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
        for index in [i for i in metadata.storage_data if i.fqn == key]:
            del metadata.storage_data[index]
        metadata.storage_data[MetadataIndex(key)] = _StorageInfo(name, 0, len(data))

    return edit


def _record(metadata, key: str):
    return next(i for i in metadata.storage_data if i.fqn == key)


def _redirect(key: str, **changes):
    """An edit that changes the storage record of ``key`` (relative_path, offset, length)."""

    def edit(metadata):
        index = _record(metadata, key)
        info = metadata.storage_data[index]
        fields = {"relative_path": info.relative_path, "offset": info.offset}
        fields.update({"length": info.length, **changes})
        metadata.storage_data[index] = _StorageInfo(**fields)

    return edit


def _one_line_refusal(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


#: A key of every state; those stored as tensors are turned into bytes entries.
PAYLOAD_KEYS = {
    "model": "model.inp.weight",
    "optimizer": "optimizer.state.inp.weight.exp_avg",
    "optimizer-bytes": "optimizer.param_groups.inp.weight.lr",
    "lr_scheduler": "lr_scheduler.gamma",
    "train_state": "train_state.step",
    "train_state-tensor": "train_state.rng.torch_cpu",
    "dataloader": "dataloader.position",
    "dataloader-tensor": "dataloader.order",
}


@pytest.mark.parametrize("key", PAYLOAD_KEYS.values(), ids=PAYLOAD_KEYS.keys())
def test_a_code_payload_on_any_state_never_runs_on_resume(tmp_path, key):
    step = _saved(tmp_path)
    marker = tmp_path / "payload-ran"
    _tamper(step, _plant(step, key, _archive(Payload(str(marker)))))
    with pytest.raises(CheckpointError) as info:
        _manager(tmp_path / "ckpt").load()
    assert key in _one_line_refusal(info)
    assert not marker.exists()


@pytest.mark.parametrize("state", STATES)
def test_a_code_payload_never_runs_on_an_initial_load(tmp_path, state):
    step = _saved(tmp_path)
    key = PAYLOAD_KEYS[state]
    marker = tmp_path / "payload-ran"
    _tamper(step, _plant(step, key, _archive(Payload(str(marker)))))
    fresh = _manager(tmp_path / "new", initial_load={"path": step, "model_only": False})
    with pytest.raises(CheckpointError) as info:
        fresh.load()
    assert key in _one_line_refusal(info)
    assert not marker.exists()


def test_a_tensor_stored_where_a_plain_value_lives_is_refused_naming_it(tmp_path):
    step = _saved(tmp_path)

    def edit(metadata):
        tensor = metadata.state_dict_metadata["model.scale"]
        metadata.state_dict_metadata["train_state.step"] = tensor
        info = metadata.storage_data[_record(metadata, "model.scale")]
        metadata.storage_data[MetadataIndex("train_state.step", [0])] = info

    _tamper(step, edit)
    with pytest.raises(CheckpointError, match="'train_state.step' stores a tensor") as info:
        _manager(tmp_path / "ckpt").load()
    _one_line_refusal(info)


def test_a_tensor_of_another_shape_is_refused_before_dcp_reads_a_region(tmp_path):
    step = _saved(tmp_path)

    def edit(metadata):  # a consistent 4-element tensor: DCP alone would fill half of 8
        entry = metadata.state_dict_metadata["dataloader.order"]
        entry.size = entry.chunks[0].sizes = torch.Size([4])

    _tamper(step, edit)
    with pytest.raises(CheckpointError) as info:
        _manager(tmp_path / "ckpt").load()
    assert "'dataloader.order'" in _one_line_refusal(info)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink", "symlinked-dir"])
def test_storage_paths_outside_the_folder_are_refused_before_opening(tmp_path, where):
    step = _saved(tmp_path)
    secret = tmp_path / "secret.distcp"
    shutil.copy(os.path.join(step, "__0_0.distcp"), secret)  # a valid item, outside
    os.chmod(secret, 0)  # opening it at all would fail differently (or read as root)
    name = {
        "absolute": str(secret),
        "dotdot": "../../secret.distcp",
        "symlink": "link.distcp",
        "symlinked-dir": "sub/secret.distcp",
    }[where]
    _tamper(step, _redirect("model.out.weight", relative_path=name))
    # Links made after the manifest: unlisted, so only the metadata check stands in the way.
    if where == "symlink":
        os.symlink(secret, os.path.join(step, "link.distcp"))
    if where == "symlinked-dir":
        os.symlink(tmp_path, os.path.join(step, "sub"))
    with pytest.raises(CheckpointError) as info:
        _manager(tmp_path / "ckpt").load()
    assert "'model.out.weight'" in _one_line_refusal(info)
    with pytest.raises(CheckpointError):
        read_metadata(step)  # inspect and convert read through the same check


def test_a_fifo_is_refused_without_blocking(tmp_path):
    step = _saved(tmp_path)
    _tamper(step, _redirect("model.out.weight", relative_path="pipe.distcp", offset=0))
    fifo = os.path.join(step, "pipe.distcp")
    os.mkfifo(fifo)
    # A writer holds the FIFO open, so a reader that opens it does not block: the test
    # fails (rather than hangs) if the FIFO is ever opened.
    keep = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(CheckpointError, match="a FIFO") as info:
            _manager(tmp_path / "ckpt").load()
        _one_line_refusal(info)
    finally:
        os.close(keep)


def test_a_device_behind_a_symlink_with_a_huge_length_allocates_nothing(tmp_path):
    step = _saved(tmp_path)
    _tamper(step, _redirect("model.out.weight", relative_path="zero.distcp", length=1 << 30))
    os.symlink("/dev/zero", os.path.join(step, "zero.distcp"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="leads out"):
        _manager(tmp_path / "ckpt").load()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 << 10


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"length": 1 << 30}, "holds only"),
        ({"offset": 1 << 40}, "holds only"),
        ({"offset": -1}, "offset -1"),
        ({"length": "10"}, "length '10'"),
        ({"transform_descriptors": ["zstd"]}, "stream transforms"),
    ],
    ids=["length", "offset", "negative", "string", "transform"],
)
def test_offsets_lengths_and_transforms_are_checked_against_the_file(tmp_path, changes, match):
    step = _saved(tmp_path)
    _tamper(step, _redirect("model.out.weight", **changes))
    with pytest.raises(CheckpointError, match=match) as info:
        _manager(tmp_path / "ckpt").load()
    _one_line_refusal(info)


def test_a_chunk_declaring_more_bytes_than_its_record_is_refused(tmp_path):
    step = _saved(tmp_path)
    metadata = read_metadata(step)
    entry = metadata.state_dict_metadata["model.out.weight"]
    assert isinstance(entry, TensorStorageMetadata)
    entry.size = torch.Size([1 << 20, 1 << 10])
    entry.chunks[0].sizes = torch.Size([1 << 20, 1 << 10])
    with pytest.raises(CheckpointError, match="4294967296 bytes"):
        check_metadata(metadata, step)
    entry.chunks[0].sizes = torch.Size([1 << 21, 8])  # outside the tensor
    with pytest.raises(CheckpointError, match="outside the tensor"):
        check_metadata(metadata, step)


def _deflated(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def test_compressed_records_are_refused_so_an_item_cannot_inflate(tmp_path):
    step = _saved(tmp_path)
    bomb = _deflated(_archive(torch.zeros(1 << 18)))  # 1 MiB of zeros in a few KiB
    _tamper(step, _plant(step, "lr_scheduler.gamma", bomb))
    with pytest.raises(CheckpointError, match="compressed record") as info:
        _manager(tmp_path / "ckpt").load()
    _one_line_refusal(info)


def test_the_safe_gate_still_loads_every_state_of_a_genuine_checkpoint(tmp_path):
    step = _saved(tmp_path)
    source = _manager(tmp_path / "unused")
    source.states["dataloader"].obj.position = 5
    loaded = _manager(tmp_path / "ckpt")
    assert loaded.load() is True
    for key, value in source.states["model"].state_dict().items():
        assert torch.equal(loaded.states["model"].state_dict()[key], value)
    assert loaded.states["dataloader"].obj.order.tolist() == list(range(8))
    state = {"model": {k: torch.zeros_like(v) for k, v in source.wrapper.state_dict().items()}}
    safe_load(state, step)
    assert torch.equal(state["model"]["inp.weight"], source.wrapper.state_dict()["inp.weight"])


def test_an_fsspec_checkpoint_gets_the_same_checks_on_names_and_sizes():
    import fsspec

    folder = "memory://hostile-dcp/run"
    fs = fsspec.filesystem("memory")
    try:
        run = _manager(folder, interval=1)
        run.save(1)
        run.close()
        meta_path = "/hostile-dcp/run/step-1/.metadata"
        metadata = pickle.loads(fs.cat(meta_path))
        _redirect("model.out.weight", relative_path="../../outside.distcp")(metadata)
        fs.pipe(meta_path, pickle.dumps(metadata))
        fs.pipe("/hostile-dcp/outside.distcp", fs.cat("/hostile-dcp/run/step-1/__0_0.distcp"))
        _rewrite_manifest(f"{folder}/step-1")
        with pytest.raises(CheckpointError, match="'\\.\\.'") as info:
            _manager(folder).load()
        _one_line_refusal(info)
        _redirect("model.out.weight", relative_path="__0_0.distcp", length=1 << 30)(metadata)
        fs.pipe(meta_path, pickle.dumps(metadata))
        _rewrite_manifest(f"{folder}/step-1")
        with pytest.raises(CheckpointError, match="holds only"):
            _manager(folder).load()
    finally:
        fs.rm("/hostile-dcp", recursive=True)


# --- ckpt convert: the same payloads through the CLI ---------------------------------


@pytest.fixture
def llama_dcp(tmp_path):
    save_hf_llama(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "dcp"), "--to", "dcp"]) == 0
    return str(tmp_path / "dcp")


def _convert_refuses(src, dst, capsys) -> str:
    code = main(["convert", str(src), str(dst), "--to", "hf", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and not os.path.exists(dst), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_convert_never_runs_a_payload_stored_as_a_model_entry(tmp_path, llama_dcp, capsys):
    marker = tmp_path / "payload-ran"
    key = "model.norm.weight"
    _tamper(llama_dcp, _plant(llama_dcp, key, _archive(Payload(str(marker)))))
    assert main(["verify", llama_dcp]) == 0  # the attacker rewrote the manifest too
    err = _convert_refuses(llama_dcp, tmp_path / "out", capsys)
    assert key in err
    assert not marker.exists()


def test_convert_never_copies_an_outside_file_into_the_weights(tmp_path, llama_dcp, capsys):
    outside = tmp_path / "outside.distcp"
    shutil.copy(os.path.join(llama_dcp, "__0_0.distcp"), outside)
    _tamper(llama_dcp, _redirect("model.norm.weight", relative_path=str(outside)))
    assert "absolute path" in _convert_refuses(llama_dcp, tmp_path / "out", capsys)


def test_convert_refuses_a_fifo_without_blocking(tmp_path, llama_dcp, capsys):
    _tamper(llama_dcp, _redirect("model.norm.weight", relative_path="pipe.distcp"))
    fifo = os.path.join(llama_dcp, "pipe.distcp")
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        assert "a FIFO" in _convert_refuses(llama_dcp, tmp_path / "out", capsys)
    finally:
        os.close(keep)


# --- owned-only checkpoints: the base they name is read through the same gate ----------


def _base_with_payload(step: str, key: str, tmp_path) -> str:
    """Make ``step`` owned-only: its manifest names a copy of it, with a payload, as base."""
    from ckpt_core.content.owned_only import base_checksum

    base = str(tmp_path / "base")
    shutil.copytree(step, base)
    marker = tmp_path / "payload-ran"
    _tamper(base, _plant(base, key, _archive(Payload(str(marker)))))
    _rewrite_manifest(step, base={"path": base, "format": "dcp", "checksum": base_checksum(base)})
    return str(marker)


def test_an_owned_only_base_with_a_payload_is_refused_on_resume(tmp_path):
    marker = _base_with_payload(_saved(tmp_path), "model.inp.weight", tmp_path)
    with pytest.raises(CheckpointError) as info:
        _manager(tmp_path / "ckpt").load()
    assert "'model.inp.weight'" in _one_line_refusal(info)
    assert not os.path.exists(marker)


def test_an_owned_only_base_with_a_payload_is_refused_by_convert(tmp_path, llama_dcp, capsys):
    marker = _base_with_payload(llama_dcp, "model.norm.weight", tmp_path)
    assert "model.norm.weight" in _convert_refuses(llama_dcp, tmp_path / "out", capsys)
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    "record",
    [["not", "a", "dict"], {"path": 5, "checksum": "crc32:0"}, {"path": "x", "format": "pickle"}],
    ids=["list", "path-type", "format"],
)
def test_a_malformed_base_record_is_one_line(tmp_path, record, capsys):
    step = _saved(tmp_path)
    _rewrite_manifest(step, base=record)
    with pytest.raises(CheckpointError) as info:
        _manager(tmp_path / "ckpt").load(step=1)
    assert "base" in _one_line_refusal(info)
