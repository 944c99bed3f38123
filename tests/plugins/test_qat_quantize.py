"""QAT export numerics: integers and scales are torchao's own, packing is compressed-tensors'."""

from __future__ import annotations

import pytest
import torch
from ckpt_plugins_qat.quantize import _pack_arithmetic, pack_int32, quantize_weight, unpack_int32
from ckpt_plugins_qat.schemes import SCHEMES

pack_to_int32 = pytest.importorskip(
    "compressed_tensors.compressors.pack_quantized.helpers"
).pack_to_int32


def awkward_weight(out: int = 48, inp: int = 128, seed: int = 0) -> torch.Tensor:
    """A weight with values sitting exactly on rounding ties of their group scale."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.05
    w[:, 0] = 0.3  # scale = 0.3 / 7.5: multiples of scale / 2 are ties
    w[:, 1:8] = 0.3 * torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5]) / 7.5
    return w


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_byte_equal_to_compressed_tensors(bits):
    gen = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    values = torch.randint(lo, hi, (24, 96), generator=gen, dtype=torch.int8)
    values[0, :] = lo  # extremes: all-ones and all-zeros bit fields
    values[1, :] = hi - 1
    ours = pack_int32(values, bits)
    theirs = pack_to_int32(values, bits)
    assert ours.dtype == torch.int32 and ours.shape == (24, 96 * bits // 32)
    assert ours.numpy().tobytes() == theirs.numpy().tobytes()
    # the byte-order independent fallback agrees too
    assert _pack_arithmetic(values, bits).numpy().tobytes() == theirs.numpy().tobytes()
    assert torch.equal(unpack_int32(ours, bits, 96), values)


def test_packing_refuses_a_row_that_does_not_fill_whole_words():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int32(torch.zeros(2, 12, dtype=torch.int8), 4)


@pytest.mark.parametrize("scheme_name", sorted(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integers_and_scales_equal_torchao_convert_bit_for_bit(scheme_name, dtype):
    from torchao.quantization import quantize_

    scheme = SCHEMES[scheme_name]
    weight = awkward_weight().to(dtype)
    linear = torch.nn.Linear(128, 48, bias=False, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    quantize_(linear, scheme.base_config(32), filter_fn=None)
    converted = linear.weight  # IntxUnpackedToInt8Tensor from torchao's PTQ (= QAT convert)

    ours = quantize_weight(weight, scheme, 32)
    assert torch.equal(ours.values, converted.qdata)
    assert torch.equal(ours.scale, converted.scale.reshape(ours.scale.shape))
    assert ours.scale.dtype == dtype
    assert int(ours.values.min()) >= scheme.qmin and int(ours.values.max()) <= scheme.qmax


@pytest.mark.parametrize("scheme_name", sorted(SCHEMES))
def test_dequantized_weight_equals_the_fake_quantized_training_weight(scheme_name):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    scheme = SCHEMES[scheme_name]
    weight = awkward_weight(seed=1)
    linear = torch.nn.Linear(128, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    model = torch.nn.Sequential(linear)
    quantize_(model, QATConfig(scheme.base_config(32), step="prepare"))
    prepared = model[0]
    with torch.no_grad():
        fake = prepared.weight_fake_quantizer(prepared.weight)

    ours = quantize_weight(weight, scheme, 32)
    assert torch.equal(ours.dequantize(), fake)


def test_division_would_flip_ties_that_the_fake_quantizer_rounds_by_reciprocal():
    # The rule matters: this weight has entries where round(w / s) != round(w * (1 / s)).
    scheme = SCHEMES["int4_weight_only"]
    found = False
    for seed in range(20):
        weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(seed))
        q = quantize_weight(weight, scheme, 32)
        scale = q.scale.repeat_interleave(32, dim=1)
        by_division = torch.clamp(torch.round(weight / scale), scheme.qmin, scheme.qmax)
        if not torch.equal(by_division.to(torch.int8), q.values):
            found = True
            break
    assert found, "expected at least one tie that division rounds differently"


def test_learned_scales_are_used_as_given():
    scheme = SCHEMES["int4_weight_only"]
    weight = awkward_weight(seed=2)
    scale = torch.full((48, 4), 0.01)
    q = quantize_weight(weight, scheme, 32, scale=scale)
    assert torch.equal(q.scale, scale)
    expected = torch.clamp(torch.round(weight * (1.0 / 0.01)), -8, 7).to(torch.int8)
    assert torch.equal(q.values, expected)
