"""Real quantization of trained weights, bit for bit as the fake quantizer saw them.

Training runs torchao's fake quantizer: it picks symmetric scales per group (or
per output channel), rounds ``w * (1 / scale)`` to integers, clamps them and
multiplies back. The export must store exactly those integers and scales: a
different rounding rule (``round(w / scale)`` flips ties) gives a model that is
not the one that was trained. So :func:`quantize_weight` takes the scales from
the torchao function the fake quantizer calls (:func:`choose_qparams`) and the
integers from torchao's ``quantize_affine`` (the quantize half of that fake
quantizer), and never re-derives either by another rule; tests check both
against the fake quantizer and torchao's ``convert`` step bit for bit.

:func:`pack_int32` stores signed sub-byte integers the way compressed-tensors'
``pack-quantized`` format does: each value is offset to unsigned, and value
``i`` of a row lands at bits ``num_bits * i`` of the row's int32 words.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ckpt_plugins_qat.schemes import Scheme


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight as integers and scales: ``weight ≈ values * scale`` per group."""

    #: int8 tensor ``[out, in]`` with values in ``[scheme.qmin, scheme.qmax]``.
    values: torch.Tensor
    #: ``[out, in / group]`` in the master weight's dtype.
    scale: torch.Tensor
    #: Inputs per scale.
    group_size: int

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``values * scale`` per group, in ``dtype`` (default: the scale's dtype)."""
        out_dtype = dtype or self.scale.dtype
        rows, cols = self.values.shape
        grouped = self.values.to(out_dtype).view(rows, cols // self.group_size, self.group_size)
        return (grouped * self.scale.to(out_dtype).unsqueeze(-1)).view(rows, cols)


@torch.no_grad()
def choose_qparams(
    weight: torch.Tensor, scheme: Scheme, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points ``[out, in / group]`` as the fake quantizer's forward picks them.

    ``IntxFakeQuantizer`` (per group or per channel, symmetric) calls torchao's
    ``get_group_qparams_symmetric`` with its config's bit width, scale precision
    and eps, then casts the zero points to the config's zero-point precision;
    this does the same without computing the fake-quantized weight.
    """
    from torchao.quantization.utils import get_group_qparams_symmetric

    config = scheme.weight_fake_quantize_config(group)
    scale, zero_point = get_group_qparams_symmetric(
        weight, scheme.weight_bits, group, config.scale_precision, eps=config.eps
    )
    return scale, zero_point.to(config.zero_point_precision)


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor,
    scheme: Scheme,
    group_size: int,
    scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a 2-D master weight exactly as the scheme's fake quantizer does.

    Args:
        weight: the trained ``[out, in]`` weight (plain tensor, any float dtype).
        scheme: the QAT scheme the model trained with.
        group_size: the configured group size (ignored by per-channel schemes).
        scale: learned scales ``[out, in / group]`` (range learning); ``None``
            lets the fake quantizer choose them from ``weight``.
    """
    from torchao.quantization import quantize_affine

    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {list(weight.shape)}")
    group = scheme.group_size_for(weight.shape[1], group_size)
    if scale is None:
        scale, zero_point = choose_qparams(weight, scheme, group)
    else:
        scale = scale.detach().reshape(weight.shape[0], -1)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    values = quantize_affine(
        weight,
        (1, group),
        scale,
        zero_point,
        torch.int8,
        quant_min=scheme.qmin,
        quant_max=scheme.qmax,
    )
    if torch.count_nonzero(zero_point):
        raise RuntimeError("symmetric fake quantizer produced a non-zero zero point")
    return QuantizedWeight(values=values, scale=scale.detach().clone(), group_size=group)


def pack_int32(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack signed ``num_bits`` integers (int8, ``[rows, cols]``) into int32 words.

    ``num_bits`` must divide 32 (4 or 8 here) and ``cols`` must be a multiple of
    ``32 / num_bits``; the result is ``[rows, cols * num_bits / 32]``, byte-equal
    to compressed-tensors' ``pack_to_int32``.
    """
    if values.dtype != torch.int8 or values.dim() != 2:
        raise ValueError(f"expected a 2-D int8 tensor, got {values.dtype} {list(values.shape)}")
    if 32 % num_bits:
        raise ValueError(f"num_bits must divide 32, got {num_bits}")
    per_word = 32 // num_bits
    rows, cols = values.shape
    if cols % per_word:
        raise ValueError(f"columns ({cols}) must be a multiple of {per_word} to pack")
    offset = 1 << (num_bits - 1)
    if num_bits in (4, 8) and sys.byteorder == "little":
        # Byte-wise: value 2k in the low nibble of byte k, value 2k+1 in the high one;
        # four little-endian bytes are one int32 word with value 0 at bit 0.
        unsigned = (values.to(torch.int16) + offset).to(torch.uint8)
        if num_bits == 4:
            pairs = unsigned.view(rows, cols // 2, 2)
            unsigned = pairs[..., 0] | (pairs[..., 1] << 4)
        return unsigned.contiguous().view(torch.int32).clone()
    return _pack_arithmetic(values, num_bits)


def _pack_arithmetic(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """:func:`pack_int32` by integer arithmetic (any ``num_bits`` dividing 32, any byte order)."""
    rows, cols = values.shape
    per_word = 32 // num_bits
    offset = 1 << (num_bits - 1)
    unsigned = (values.to(torch.int64) + offset).view(rows, cols // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * num_bits
    words = (unsigned << shifts).sum(dim=-1)  # disjoint bit fields: the sum is an OR
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement
    return words.to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[rows, words]`` → int8 ``[rows, cols]``."""
    per_word = 32 // num_bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * num_bits
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    values = fields.reshape(packed.shape[0], -1)[:, :cols] - (1 << (num_bits - 1))
    return values.to(torch.int8)
