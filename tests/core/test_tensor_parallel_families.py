"""FSDP2 x TP (2 x 2) on the qwen3 and moe families: the math of the unsplit model.

One spawn of 4 gloo ranks; per family the split model's logits and every
parameter's gradient (made whole) are compared with the plain model's on the
whole global batch (Qwen3's per-head q/k norms see all heads, so their
gradients are whole; the MoE's dense layers split like the Llama's).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tests.core._dist import run_on_ranks

# (family, degrees): FSDP2 x TP on both families, and on the MoE also EP 2 borrowed
# from the two FSDP ranks beside TP 2 (experts split over ep, dense layers over tp).
CASES = (
    ("qwen3:tiny", {"pp": 1, "dp_shard": 2, "tp": 2}),
    ("moe:tiny", {"pp": 1, "dp_shard": 2, "tp": 2}),
    ("moe:tiny", {"pp": 1, "dp_shard": 2, "tp": 2, "ep": 2}),
)


def _compare(rank: int, world_size: int) -> dict[str, tuple[float, float]]:
    from torch.distributed.tensor import DTensor

    from ckpt_core.trainer.loop import model_family_for
    from ckpt_core.trainer.parallel import build_mesh, clip_grad_norm, data_parallel, parallelize

    out = {}
    for name, degrees in CASES:
        family, hf = model_family_for(name)
        torch.manual_seed(0)
        model = family.build_model(hf)
        ref = copy.deepcopy(model)
        mesh = build_mesh(degrees, "cpu")
        model = parallelize(model, mesh)
        assert model.layers["0"].attention.wq.weight.placements[-1].is_shard(0)
        if degrees.get("ep", 1) > 1:
            w1 = model.layers["0"].moe.experts.w1
            assert "ep" in w1.device_mesh.mesh_dim_names and w1.to_local().shape[0] < w1.shape[0]
        tokens = torch.randint(
            0, hf["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1)
        )
        dp_rank, dp = data_parallel(mesh)
        local = tokens.chunk(dp)[dp_rank]
        logits = model(local)
        F.cross_entropy(logits.flatten(0, 1), local.flatten()).backward()
        norm = clip_grad_norm(list(model.parameters()), 1e9)
        ref_logits = ref(tokens)
        F.cross_entropy(ref_logits.flatten(0, 1), tokens.flatten()).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1e9)
        grads = dict(ref.named_parameters())
        worst = 0.0
        for fqn, p in model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            worst = max(worst, float((g - grads[fqn].grad).abs().max()))
        logit_diff = float((logits - ref_logits.chunk(dp)[dp_rank]).abs().max())
        key = name + (" ep 2" if degrees.get("ep", 1) > 1 else "")
        out[key] = (logit_diff, worst, abs(float(norm) - float(ref_norm)))
    return out


def test_qwen3_and_moe_under_fsdp_x_tp_compute_the_plain_models_logits_and_gradients():
    """Also EP x TP on the MoE: experts over ep, attention and dense MLPs over tp."""
    for rank_result in run_on_ranks(_compare, 4):
        assert len(rank_result) == len(CASES)
        for name, (logits, grads, norm) in rank_result.items():
            assert logits < 1e-5, (name, logits)
            assert grads < 1e-5, (name, grads)
            assert norm < 1e-5, (name, norm)
