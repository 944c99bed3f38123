"""The two tensor layouts of attention weights, and moving rows between them.

torchtitan computes rotary embeddings on *interleaved* pairs: rows ``2i`` and
``2i + 1`` of each head of ``wq``/``wk`` are the real and imaginary parts of
pair ``i`` (Meta's original Llama layout). ckpt's reference models use
*rotate-half* (Hugging Face's): the first half of each head holds the real
parts, the second half the imaginary ones. The weights are the same numbers
with the rows of each head reordered; converting is a row permutation per
head, with ``n_heads`` for ``wq`` and ``n_kv_heads`` for ``wk``.

The permutation moves whole rows, so it applies unchanged to anything laid out
like the weight: Adam's ``exp_avg`` and ``exp_avg_sq`` included.

torchtitan 0.3 also *fuses* ``wq``, ``wk``, ``wv`` into one ``wqkv`` parameter
(its optimizer state is kept for that fused tensor), grouped by KV head: for
each KV head, its ``n_heads // n_kv_heads`` query heads, then its key head, then
its value head.
"""

from __future__ import annotations

import torch


def _rows(w: torch.Tensor, n_heads: int) -> tuple[int, tuple[int, ...]]:
    """``(head_dim, trailing shape)`` of a ``[n_heads * head_dim, ...]`` tensor."""
    if w.dim() < 1 or w.shape[0] % (2 * n_heads):
        raise ValueError(
            f"a q/k tensor of shape {list(w.shape)} does not split into {n_heads} heads of an "
            "even size"
        )
    return w.shape[0] // n_heads, tuple(w.shape[1:])


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from interleaved pairs to rotate-half (torchtitan → ckpt/HF)."""
    hd, tail = _rows(w, n_heads)
    return w.reshape(n_heads, hd // 2, 2, *tail).transpose(1, 2).reshape(w.shape).contiguous()


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half to interleaved pairs (ckpt/HF → torchtitan)."""
    hd, tail = _rows(w, n_heads)
    return w.reshape(n_heads, 2, hd // 2, *tail).transpose(1, 2).reshape(w.shape).contiguous()


def split_qkv(
    wqkv: torch.Tensor, n_heads: int, n_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``wq, wk, wv`` of a fused ``wqkv`` (rows grouped by KV head, as torchtitan 0.3 fuses)."""
    per_kv = n_heads // n_kv_heads
    rows = wqkv.shape[0]
    if n_heads % n_kv_heads or rows % (n_heads + 2 * n_kv_heads):
        raise ValueError(
            f"a fused qkv tensor of shape {list(wqkv.shape)} does not split into {n_heads} query "
            f"and {n_kv_heads} key/value heads"
        )
    hd = rows // (n_heads + 2 * n_kv_heads)
    tail = tuple(wqkv.shape[1:])
    grouped = wqkv.reshape(n_kv_heads, per_kv + 2, hd, *tail)
    q = grouped[:, :per_kv].reshape(n_heads * hd, *tail).contiguous()
    k = grouped[:, per_kv].reshape(n_kv_heads * hd, *tail).contiguous()
    v = grouped[:, per_kv + 1].reshape(n_kv_heads * hd, *tail).contiguous()
    return q, k, v


def fuse_qkv(
    wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, n_heads: int, n_kv_heads: int
) -> torch.Tensor:
    """The fused ``wqkv`` of ``wq, wk, wv`` (inverse of :func:`split_qkv`)."""
    per_kv = n_heads // n_kv_heads
    hd = wq.shape[0] // n_heads
    tail = tuple(wq.shape[1:])
    if wk.shape != wv.shape or wk.shape[0] != n_kv_heads * hd or tuple(wk.shape[1:]) != tail:
        raise ValueError(
            f"wq {list(wq.shape)}, wk {list(wk.shape)} and wv {list(wv.shape)} do not fuse with "
            f"{n_heads} query and {n_kv_heads} key/value heads"
        )
    q = wq.reshape(n_kv_heads, per_kv, hd, *tail)
    k = wk.reshape(n_kv_heads, 1, hd, *tail)
    v = wv.reshape(n_kv_heads, 1, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail).contiguous()
