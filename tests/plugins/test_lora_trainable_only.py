"""``trainable_only_checkpoints``: interval checkpoints hold only the adapters and their
optimizer state; resume loads the recorded base, then the adapters, bit-exactly.

The runs use the real CheckpointManager (DCP on disk, manifests) on a small random
HF Llama saved by transformers as the base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ckpt_core import CheckpointConfig, ConverterSet, ModelWrapper
from ckpt_core.config import ExportConfig, InitialLoadConfig
from ckpt_core.errors import CheckpointError, ConfigError
from ckpt_core.policy.manager import CheckpointManager
from ckpt_core.reference import LlamaStateDictAdapter, build_model
from ckpt_core.storage import layout
from ckpt_core.storage.safe_metadata import read_metadata
from ckpt_plugins_lora import LoRAConfig, LoRAConverter
from tests.plugins.lora_support import save_tiny_hf_llama

transformers = pytest.importorskip("transformers")

VOCAB = 96
STEPS = 6


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> str:
    return save_tiny_hf_llama(str(tmp_path_factory.mktemp("hf") / "base"), VOCAB)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(100 + step))


def run(
    base: str,
    folder: Path,
    *,
    trainable_only: bool = True,
    stop_after: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Train (or resume) to STEPS, saving every 2 steps; ``stop_after`` plays a kill."""
    torch.manual_seed(seed)  # a resumed run starts from other random weights
    model = build_model(base)
    options = {"rank": 4, "alpha": 8, "trainable_only_checkpoints": trainable_only}
    converters = ConverterSet([LoRAConverter(LoRAConfig(**options))])
    converters.convert(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    config = CheckpointConfig(
        folder=str(folder),
        interval=2,
        initial_load=InitialLoadConfig(path=base, format="hf"),
        export=ExportConfig(enable=False),
    )
    manager = CheckpointManager(
        config,
        [model],
        optimizer,
        scheduler,
        converters=converters,
        sd_adapter=LlamaStateDictAdapter(model.args),
    )
    manager.load()
    for step in range(manager.train_state.step + 1, STEPS + 1):
        data = batch(step)
        logits = model(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        manager.train_state.step = step
        manager.save(step, last_step=step == STEPS)
        if step == stop_after:
            break
    manager.close()
    return model


def tensor_bytes(folder: Path, step: int) -> int:
    """Bytes of tensor data a step holds (its files add per-entry metadata on top)."""
    total = 0
    for meta in read_metadata(str(folder / f"step-{step}")).state_dict_metadata.values():
        if isinstance(meta, TensorStorageMetadata):
            total += meta.size.numel() * meta.properties.dtype.itemsize
    return total


def test_trainable_only_steps_hold_adapters_and_their_optimizer_state_and_name_the_base(
    hf_base, tmp_path
):
    run(hf_base, tmp_path / "owned")
    run(hf_base, tmp_path / "full", trainable_only=False)
    metadata = read_metadata(str(tmp_path / "owned" / "step-2"))
    model_keys = [k for k in metadata.state_dict_metadata if k.startswith("model.")]
    assert len(model_keys) == 2 * 7 * 2
    assert all(".lora_a." in k or ".lora_b." in k for k in model_keys)
    optim = [k for k in metadata.state_dict_metadata if k.startswith("optimizer.state.")]
    assert optim and all(".lora_a." in k or ".lora_b." in k for k in optim)

    manifest = json.loads((tmp_path / "owned" / "step-2" / "manifest.json").read_text())
    assert manifest["base"]["path"] == hf_base and manifest["base"]["format"] == "hf"
    assert manifest["base"]["checksum"].startswith("crc32:")
    full_manifest = json.loads((tmp_path / "full" / "step-2" / "manifest.json").read_text())
    assert "base" not in full_manifest

    ratio = tensor_bytes(tmp_path / "owned", 2) / tensor_bytes(tmp_path / "full", 2)
    assert ratio < 0.3  # rank 4 on hidden size 64: adapters + 2 Adam moments vs all of it


def test_kill_and_resume_from_trainable_only_steps_is_bit_exact(hf_base, tmp_path):
    straight = run(hf_base, tmp_path / "straight")
    run(hf_base, tmp_path / "killed", stop_after=3)
    assert layout.committed_steps(str(tmp_path / "killed")) == [2]
    resumed = run(hf_base, tmp_path / "killed", seed=7)  # other random init: all from disk
    expected = straight.state_dict()
    got = resumed.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # The adapters really trained (so equality means something).
    assert torch.count_nonzero(got["layers.0.attention.wq.lora_b.weight"]) > 0


def test_resume_refuses_a_changed_base(hf_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(hf_base, base)
    run(str(base), tmp_path / "ckpt", stop_after=2)
    model = transformers.LlamaForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(str(base))
    with pytest.raises(CheckpointError, match="checksum"):
        run(str(base), tmp_path / "ckpt")


def test_trainable_only_without_an_initial_load_is_a_config_error(tmp_path):
    model = build_model("tiny")
    converters = ConverterSet([LoRAConverter(LoRAConfig(trainable_only_checkpoints=True))])
    converters.convert(model)
    config = CheckpointConfig(folder=str(tmp_path), export=ExportConfig(enable=False))
    with pytest.raises(ConfigError, match="initial_load.path"):
        CheckpointManager(config, [model], converters=converters)


@pytest.mark.parametrize("trainable_only", [False, True], ids=["full", "trainable_only"])
def test_lora_run_starts_from_a_plain_dcp_base(hf_base, tmp_path, trainable_only):
    from ckpt_core.policy.exporter import write_export
    from ckpt_core.reference import from_pretrained

    plain = from_pretrained(hf_base)
    dcp_base = tmp_path / "dcp-base"
    write_export(
        ModelWrapper(plain), str(dcp_base), fmt="dcp", dtype=None,
        sd_adapter=LlamaStateDictAdapter(plain.args),
    )  # fmt: skip
    torch.manual_seed(5)
    model = build_model(hf_base)
    converters = ConverterSet(
        [LoRAConverter(LoRAConfig(rank=4, trainable_only_checkpoints=trainable_only))]
    )
    converters.convert(model)
    a_before = model.layers["0"].attention.wq.lora_a.weight.detach().clone()
    config = CheckpointConfig(
        folder=str(tmp_path / "ckpt"),
        initial_load=InitialLoadConfig(path=str(dcp_base), format="dcp"),
        export=ExportConfig(enable=False),
    )
    manager = CheckpointManager(config, [model], converters=converters)
    assert manager.load()
    base = ModelWrapper(model, converters).state_dict("base")
    for key, value in plain.state_dict().items():
        assert torch.equal(base[key], value), key
    assert torch.equal(model.layers["0"].attention.wq.lora_a.weight, a_before)
