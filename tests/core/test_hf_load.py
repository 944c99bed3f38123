"""Initial loads from Hugging Face folders: any sharding, bf16 files, FSDP2 ranks, fp8 blocks."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from ckpt_core import ModelWrapper
from ckpt_core.errors import CheckpointError
from ckpt_core.policy.exporter import load_hf
from ckpt_core.reference import LlamaStateDictAdapter, build_model, from_pretrained
from ckpt_core.storage.hf_reader import dequantize_region, index_folder
from tests.core._dist import run_on_ranks
from tests.core.hf_helpers import hf_llama, hf_logits

TOKENS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))


def _bf16_sharded_folder(folder, tied=False):
    """A transformers Llama saved in bf16 across several safetensors files."""
    model = hf_llama(tied=tied).to(torch.bfloat16)
    model.save_pretrained(str(folder), max_shard_size="40KB")
    return model


def _fsdp2_load_body(rank, world_size, folder):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(100 + rank)  # the load must not depend on the init
    model = build_model(folder)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    load_hf(ModelWrapper(model), folder, fmt="hf", sd_adapter=LlamaStateDictAdapter(model.args))
    sd = model.state_dict()
    assert all(isinstance(v, DTensor) for v in sd.values())
    local = sd["tok_embeddings.weight"].to_local()
    assert local.shape[0] < sd["tok_embeddings.weight"].shape[0]  # really sharded
    full = {k: v.full_tensor() for k, v in sd.items()}
    with torch.no_grad():
        logits = model(TOKENS)
    out = f"{folder}/rank{rank}.pt"  # tensors travel by file, not through the queue
    torch.save({"full": full, "logits": logits}, out)
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_initial_load_from_sharded_bf16_folder_into_two_fsdp2_ranks(tmp_path, tied):
    hf = _bf16_sharded_folder(tmp_path, tied=tied)
    assert len({f for f in index_folder(str(tmp_path)).values()}) > 2
    results = run_on_ranks(_fsdp2_load_body, 2, str(tmp_path))
    want = LlamaStateDictAdapter(build_model(str(tmp_path)).args).from_hf(
        {k: v.float() for k, v in hf.state_dict().items()}
    )
    import transformers

    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    for path in results:
        saved = torch.load(path)
        full, logits = saved["full"], saved["logits"]
        assert full.keys() == want.keys()
        for key, value in full.items():
            assert value.dtype == torch.float32
            assert torch.equal(value, want[key]), key
        expected = hf_logits(reloaded, TOKENS)
        assert (logits - expected).abs().max().item() < 1e-4


def test_load_names_the_tensors_a_folder_lacks(tmp_path):
    hf = hf_llama()
    sd = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    hf.save_pretrained(str(tmp_path))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = build_model(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(ModelWrapper(model), str(tmp_path), sd_adapter=LlamaStateDictAdapter(model.args))


def _quantize_blocks(weight: torch.Tensor, block: int = 128):
    """Reference fp8 block quantization: one scale per block, amax mapped to 448."""
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            blk = weight[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale = blk.abs().max().clamp(min=1e-12) / 448.0
            scales[i, j] = scale
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / scale).to(
                torch.float8_e4m3fn
            )
    return q, scales


def _dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, block: int = 128):
    out = torch.empty(q.shape)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = q[sl].float() * scales[i, j]
    return out


def test_hf_quantized_fp8_blocks_are_dequantized_while_loading(tmp_path):
    hf = hf_llama(vocab=300)  # embeddings 300x64: three row blocks, the last partial
    hf.save_pretrained(str(tmp_path))
    quantized, reference = {}, {}
    for key, value in hf.state_dict().items():
        if value.dim() == 2:
            q, s = _quantize_blocks(value)
            quantized[key], quantized[key + "_scale_inv"] = q, s
            reference[key] = _dequantize_blocks(q, s)
        else:
            quantized[key] = reference[key] = value
    save_file(quantized, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = build_model(str(tmp_path))
    adapter = LlamaStateDictAdapter(model.args)
    load_hf(ModelWrapper(model), str(tmp_path), fmt="hf_quantized", sd_adapter=adapter)
    want = adapter.from_hf(reference)
    got = model.state_dict()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert not torch.equal(got["output.weight"], adapter.from_hf(hf.state_dict())["output.weight"])


def test_dequantizing_a_shard_equals_the_same_rows_of_the_whole_tensor():
    weight = torch.randn(300, 200)
    q, s = _quantize_blocks(weight)
    whole = _dequantize_blocks(q, s)
    for r0, rows, c0, cols in [(0, 300, 0, 200), (150, 75, 0, 200), (37, 100, 130, 50)]:
        region = q[r0 : r0 + rows, c0 : c0 + cols]
        got = dequantize_region(region, s, (r0, c0))
        assert torch.equal(got, whole[r0 : r0 + rows, c0 : c0 + cols])


def test_from_pretrained_reads_a_sharded_bf16_folder_into_fp32(tmp_path):
    hf = _bf16_sharded_folder(tmp_path)
    model = from_pretrained(str(tmp_path))
    assert model.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(model.norm.weight, hf.model.norm.weight.float())


def test_hf_base_load_leaves_converter_owned_keys_as_initialized(tmp_path):
    from ckpt_core import ConverterSet
    from tests.core._export_converters import SidecarConverter

    hf = hf_llama()
    hf.save_pretrained(str(tmp_path))
    model = build_model(str(tmp_path))
    converters = ConverterSet([SidecarConverter()])
    converters.convert(model)
    sidecar = model.layers["0"].attention.wq.sidecar.weight.clone()
    adapter = LlamaStateDictAdapter(model.args)
    load_hf(ModelWrapper(model, converters), str(tmp_path), sd_adapter=adapter)
    assert torch.equal(model.layers["0"].attention.wq.sidecar.weight, sidecar)
    assert torch.equal(
        model.layers["1"].feed_forward.w2.weight, hf.model.layers[1].mlp.down_proj.weight
    )


def test_tensors_the_model_has_no_key_for_are_named_in_a_warning(tmp_path, caplog):
    hf_llama(layers=3).save_pretrained(str(tmp_path))
    model = build_model(str(tmp_path))
    model.layers.pop("2")  # a model with fewer layers than the folder
    load_hf(ModelWrapper(model), str(tmp_path), sd_adapter=LlamaStateDictAdapter(model.args))
    assert "9 tensors match no key of the model" in caplog.text
    assert "model.layers.2." in caplog.text
