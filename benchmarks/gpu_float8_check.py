#!/usr/bin/env python
"""Float8 on a real float8 GPU: train, save, resume bit-exactly, export fp8, time it.

Run from the repository root on a machine with an H100/H200 (needs torch with CUDA,
torchao 0.18, safetensors, pluggy, pydantic; the repo need not be pip-installed)::

    PYTHONPATH=.:ckpt_plugins_float8 python benchmarks/gpu_float8_check.py

What it does (one process, one GPU, < 3 minutes on an H200):

1. builds a reference Llama (every linear dim a multiple of 256) in bf16 and converts
   it with the ``float8`` converter, ``emulate=False`` (real float8 ``_scaled_mm``);
2. trains ``--steps`` AdamW steps, saving a DCP checkpoint (CheckpointManager) at
   ``--save-at``; a fresh model resumes from it and must reproduce the remaining
   losses exactly (deterministic algorithms on) and hold the saved weights bit for bit;
3. exports ``export = "fp8"`` with ``ckpt_core.policy.exporter.write_export``: every fp8
   weight must equal torchao's training cast of the master weight byte for byte, and
   the logits of a model rebuilt from the export (dequantized weights, dynamic
   per-tensor fp8 activations, as compressed-tensors runs it) must sit much closer
   to the float8 training forward than the plain bf16 forward does;
4. times training steps, float8 vs a bf16 baseline, eager and (unless ``--no-compile``)
   ``torch.compile``.

It prints one JSON summary line (prefixed ``SUMMARY``) and exits 0 when every check
passed, 1 when one failed, 2 when the environment cannot run it (no torchao, no
float8 GPU). ``--cpu-smoke`` runs the same flow on CPU with emulated float8 and a
tiny model, so the script can be tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(REPO, "ckpt_plugins_float8"), REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)
# Deterministic cuBLAS for the bit-exact resume check; must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, CPU, emulated float8")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 20; 6 smoke)")
    p.add_argument("--save-at", type=int, default=None, help="checkpoint step (default steps/2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    p.add_argument("--keep", default=None, help="keep outputs in this folder (default: temp)")
    p.add_argument("--time-budget", type=float, default=90.0, help="skip compile past this (s)")
    return p.parse_args(argv)


class Checks:
    """Named pass/fail results plus measured numbers."""

    def __init__(self) -> None:
        self.results: dict[str, bool] = {}
        self.numbers: dict[str, object] = {}

    def check(self, name: str, ok: bool, detail: object = None) -> bool:
        self.results[name] = bool(ok)
        if detail is not None:
            self.numbers[name] = detail
        print(
            f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail is not None else "")
        )
        return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        import torch
    except ImportError:
        print("ERROR: torch is not installed.")
        return 2
    try:
        import torchao  # noqa: F401
        import torchao.float8  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(
            "ERROR: torchao is not importable "
            f"({type(exc).__name__}: {exc}). Install it with: pip install 'torchao==0.18.0'"
        )
        return 2
    if not args.cpu_smoke:
        if not torch.cuda.is_available():
            print("ERROR: no CUDA GPU visible; use --cpu-smoke to test the script without one.")
            return 2
        cap = torch.cuda.get_device_capability()
        if cap < (8, 9):
            print(f"ERROR: GPU compute capability {cap} < (8, 9): no float8 matmuls.")
            return 2

    out = args.keep or tempfile.mkdtemp(prefix="gpu_float8_check_")
    os.makedirs(out, exist_ok=True)
    checks = Checks()
    summary: dict[str, object] = {}
    try:
        summary = run(args, out, checks, t_start)
    except Exception:  # noqa: BLE001 - report and fail
        traceback.print_exc()
        checks.check("script_completed", False)
    summary["checks"] = checks.results
    summary["numbers"] = checks.numbers
    summary["passed"] = all(checks.results.values()) and bool(checks.results)
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    summary["output_folder"] = out
    print("SUMMARY " + json.dumps(summary, default=str))
    if not args.keep:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return 0 if summary["passed"] else 1


# -- the flow --------------------------------------------------------------------------


def run(args, out: str, checks: Checks, t_start: float) -> dict[str, object]:
    import torch
    import torchao

    from ckpt_core import ConverterSet, ModelWrapper
    from ckpt_core.reference import ModelArgs, adapter_for
    from ckpt_plugins_float8 import Float8Converter

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    steps = args.steps or (6 if smoke else 20)
    save_at = args.save_at or steps // 2
    if smoke:
        margs = ModelArgs(
            dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=256
        )
        batch, seq = 4, 64
    else:
        margs = ModelArgs(
            dim=2048, n_layers=4, n_heads=16, n_kv_heads=8, vocab_size=16384, ffn_hidden_dim=8192
        )
        batch, seq = 8, 1024
    summary: dict[str, object] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "torchao": getattr(torchao, "__version__", "?"),
        "cuda": torch.version.cuda,
        "model": {
            "dim": margs.dim,
            "layers": margs.n_layers,
            "ffn": margs.ffn_hidden_dim,
            "vocab": margs.vocab_size,
            "params": margs.num_params(),
            "dtype": str(dtype),
        },
        "batch": [batch, seq],
        "steps": steps,
        "save_at": save_at,
    }
    emulate = True if smoke else False

    def converters(export: str = "high_precision") -> ConverterSet:
        cfg = Float8Converter.Config(emulate=emulate, export=export)
        return ConverterSet([Float8Converter(cfg)])

    def data(step: int) -> torch.Tensor:
        # A learnable stream: random starts, then a fixed bigram map over the first ids.
        ids = min(margs.vocab_size, 1024)
        gen = torch.Generator().manual_seed(1000 + step)
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, ids, (batch,), generator=gen)
        for t in range(seq):
            tokens[:, t + 1] = (tokens[:, t] * 5 + 3) % ids
        return tokens.to(device)

    def phase(name: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}", flush=True)

    phase(f"train float8 {steps} steps, save at {save_at}")
    # ---- 1+2: train, save, resume -------------------------------------------------
    torch.use_deterministic_algorithms(True, warn_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convs_a = converters(export="fp8")
        model_a, opt_a = build(margs, device, dtype, seed=0, convs=convs_a)
        summary["float8_linears"] = len(convs_a["float8"].converted)
        summary["high_precision_linears"] = sorted(convs_a["float8"].skipped)
        is_f8 = type(model_a.layers["0"].attention.wq).__name__ == "Float8Linear"
        checks.check("linears_converted_to_Float8Linear", is_f8 and summary["float8_linears"] > 0)
        mgr_a, how = checkpointer(os.path.join(out, "ckpt"), model_a, opt_a, convs_a)
        summary["checkpointer"] = how
        losses_a, saved = [], None
        for step in range(1, steps + 1):
            losses_a.append(train_step(model_a, opt_a, data(step), convs_a))
            if step == save_at:
                mgr_a.save(step, last_step=True)
                saved = {
                    k: v.detach().clone()
                    for k, v in ModelWrapper(model_a, convs_a).state_dict("full").items()
                }
        mgr_a.close()
        summary["losses_float8"] = [round(x, 5) for x in losses_a]
        checks.check(
            "float8_loss_falls",
            losses_a[-1] < (1.0 if smoke else 0.9) * losses_a[0],
            {"first": losses_a[0], "last": losses_a[-1]},
        )

        phase("resume into a fresh model")
        convs_b = converters()
        model_b, opt_b = build(margs, device, dtype, seed=123, convs=convs_b)
        mgr_b, _ = checkpointer(os.path.join(out, "ckpt"), model_b, opt_b, convs_b)
        resumed = mgr_b.load()
        checks.check("resume_found_checkpoint", bool(resumed))
        loaded = ModelWrapper(model_b, convs_b).state_dict("full")
        same = all(torch.equal(loaded[k], v) for k, v in saved.items())
        checks.check("resumed_weights_bit_identical", same and loaded.keys() == saved.keys())
        losses_b = [
            train_step(model_b, opt_b, data(s), convs_b) for s in range(save_at + 1, steps + 1)
        ]
        mgr_b.close()
        diff = max(abs(a - b) for a, b in zip(losses_a[save_at:], losses_b)) if losses_b else 0.0
        summary["losses_resumed"] = [round(x, 5) for x in losses_b]
        checks.check(
            "resumed_losses_equal_uninterrupted",
            losses_b == losses_a[save_at:],
            {"max_abs_diff": diff},
        )
        del model_b, opt_b
    summary["determinism_warnings"] = sorted(
        {str(w.message)[:160] for w in caught if "determinis" in str(w.message)}
    )
    torch.use_deterministic_algorithms(False)

    phase("fp8 export")
    # ---- 3: fp8 export --------------------------------------------------------------
    export_checks(
        model_a, convs_a, margs, adapter_for(model_a), data(steps + 1), out, checks, summary
    )
    del model_a, opt_a
    if device.type == "cuda":
        torch.cuda.empty_cache()

    phase("timing")
    # ---- 4: timing ------------------------------------------------------------------
    summary["timing_ms"] = timing(margs, device, dtype, data, converters, args, checks, t_start)
    if device.type == "cuda":
        summary["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return summary


def build(margs, device, dtype, seed: int, convs=None):
    import torch

    from ckpt_core.reference import build_model

    torch.manual_seed(seed)
    model = build_model(margs, device=device, dtype=dtype)
    if convs is not None:
        convs.convert(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), foreach=True)
    return model, opt


def train_step(model, opt, tokens, convs=None) -> float:
    import torch

    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if convs is not None:
        convs.post_optimizer_step([model])
    return loss.item()


class _DCPCheckpointer:
    """Fallback when ckpt_core.policy.manager cannot be imported: model + optimizer via DCP."""

    def __init__(self, folder, model, opt, convs) -> None:
        self.folder, self.model, self.opt, self.convs = folder, model, opt, convs

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from ckpt_core import ModelWrapper

        return {
            "model": ModelWrapper(self.model, self.convs).state_dict("full"),
            "optimizer": get_optimizer_state_dict(self.model, self.opt),
        }

    def save(self, step, last_step=False) -> bool:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=os.path.join(self.folder, f"step-{step}"))
        return True

    def load(self) -> bool:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        from ckpt_core import ModelWrapper

        steps = sorted(int(n[5:]) for n in os.listdir(self.folder) if n.startswith("step-"))
        if not steps:
            return False
        state = self._state()
        dcp.load(state, checkpoint_id=os.path.join(self.folder, f"step-{steps[-1]}"))
        ModelWrapper(self.model, self.convs).load_state_dict(state["model"])
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"])
        return True

    def close(self) -> None:
        pass


def checkpointer(folder, model, opt, convs):
    """CheckpointManager (sync, no export) or, if it cannot be imported, plain DCP."""
    try:
        from ckpt_core import CheckpointConfig, CheckpointManager
    except Exception as exc:  # noqa: BLE001
        print(f"note: CheckpointManager unavailable ({exc}); using dcp.save/dcp.load directly")
        return _DCPCheckpointer(folder, model, opt, convs), "dcp"
    config = CheckpointConfig(folder=folder, interval=10**6, export={"enable": False})
    return CheckpointManager(config, model, optimizers=opt, converters=convs), "CheckpointManager"


# -- export checks ---------------------------------------------------------------------


def export_checks(model, convs, margs, adapter, tokens, out, checks, summary) -> None:
    import torch
    from ckpt_plugins_float8.fp8_export import dequantize_weight
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig

    from ckpt_core import ModelWrapper
    from ckpt_core.policy.exporter import write_export

    folder = os.path.join(out, "export", "step-final")
    t0 = time.perf_counter()
    # dtype None keeps the float32 scales (an export dtype would cast them too).
    write_export(
        ModelWrapper(model, convs),
        folder,
        fmt="hf",
        dtype=None,
        sd_adapter=adapter,
        converters=convs,
    )
    summary["export_s"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(folder, "config.json")) as f:
        qcfg = json.load(f).get("quantization_config", {})
    checks.check(
        "export_has_compressed_tensors_config",
        qcfg.get("format") == "float-quantized" and "lm_head" in qcfg.get("ignore", []),
    )
    hf = read_safetensors_folder(folder)
    native = adapter.from_hf(hf)
    converted = convs["float8"].converted

    # Byte-exact fp8 weights: what torchao's training cast makes of the live master weight.
    mismatched = []
    for name in converted:
        weight = model.get_submodule(name).weight.detach()
        fp8 = hp_tensor_to_float8_dynamic(
            weight.t(), torch.float8_e4m3fn, LinearMMConfig(), gemm_input_role=GemmInputRole.WEIGHT
        )
        bits = native[f"{name}.weight"].to(weight.device)
        scale = native[f"{name}.weight_scale"].to(weight.device)
        same_bits = bits.dtype == torch.float8_e4m3fn and torch.equal(
            bits.view(torch.uint8), fp8._data.t().contiguous().view(torch.uint8)
        )
        same_scale = torch.equal(scale.reshape(()), torch.reciprocal(fp8._scale).reshape(()))
        if not (same_bits and same_scale):
            mismatched.append(name)
    checks.check(
        "export_fp8_bytes_equal_torchao_training_cast",
        not mismatched,
        {"weights": len(converted), "mismatched": mismatched[:5]},
    )

    # Logits: a model rebuilt from the export, run the way compressed-tensors runs it.
    from ckpt_core.reference import build_model

    param = next(model.parameters())
    rebuilt = build_model(margs, device=param.device, dtype=param.dtype)
    state = {}
    for key, value in native.items():
        if key.endswith(".weight_scale"):
            continue
        if value.dtype == torch.float8_e4m3fn:
            value = dequantize_weight(value, native[key + "_scale"], param.dtype)
        state[key] = value.to(param.device, param.dtype)
    ModelWrapper(rebuilt).load_state_dict(state)
    for name in converted:
        rebuilt.get_submodule(name).register_forward_pre_hook(_dynamic_fp8_input)
    plain = build_model(margs, device=param.device, dtype=param.dtype)
    ModelWrapper(plain).load_state_dict(ModelWrapper(model, convs).state_dict("full"))
    with torch.no_grad():
        train_logits = model(tokens[:, :-1]).float()
        export_logits = rebuilt(tokens[:, :-1]).float()
        plain_logits = plain(tokens[:, :-1]).float()
    d_export = (export_logits - train_logits).abs().max().item()
    d_plain = (plain_logits - train_logits).abs().max().item()
    scale = train_logits.abs().max().item()
    checks.check(
        "export_logits_track_float8_forward",
        d_export < 0.5 * d_plain,
        {
            "max_abs_diff_export_vs_float8_train": d_export,
            "max_abs_diff_bf16_vs_float8_train": d_plain,
            "max_abs_logit": scale,
        },
    )

    try:  # the real consumer, when installed (informational)
        import compressed_tensors  # noqa: F401
        import transformers

        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=param.dtype)
        hf_model.to(param.device).eval()
        with torch.no_grad():
            hf_logits = hf_model(tokens[:, :-1]).logits.float()
        summary["transformers_max_abs_diff_vs_float8_train"] = (
            (hf_logits - train_logits).abs().max().item()
        )
    except Exception as exc:  # noqa: BLE001
        summary["transformers_check"] = f"skipped: {type(exc).__name__}: {str(exc)[:200]}"


def _dynamic_fp8_input(module, inputs):
    """compressed-tensors' dynamic per-tensor fp8 QDQ of a linear's input (scale = amax/448)."""
    import torch

    (x,) = inputs
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    xf = x.float()
    scale = xf.abs().amax().clamp(min=torch.finfo(torch.float32).eps) / fp8_max
    q = (xf / scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def read_safetensors_folder(folder: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


# -- timing ----------------------------------------------------------------------------


def timing(margs, device, dtype, data, converters, args, checks, t_start) -> dict[str, object]:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def measure(convs, compile_: bool, warmup: int, n: int) -> float:
        model, opt = build(margs, device, dtype, seed=0, convs=convs)
        step_model = torch.compile(model) if compile_ else model
        for s in range(warmup):
            train_step(step_model, opt, data(s), convs)
        sync()
        t0 = time.perf_counter()
        for s in range(n):
            train_step(step_model, opt, data(s), convs)
        sync()
        ms = (time.perf_counter() - t0) / n * 1000
        del model, opt, step_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return round(ms, 2)

    n = 3 if args.cpu_smoke else 10
    result: dict[str, object] = {}
    result["eager_bf16" if device.type == "cuda" else "eager_plain"] = measure(None, False, 2, n)
    result["eager_float8"] = measure(converters(), False, 2, n)
    if args.cpu_smoke or args.no_compile:
        result["compiled"] = "skipped"
        return result
    if time.perf_counter() - t_start > args.time_budget:
        result["compiled"] = f"skipped: past the {args.time_budget:.0f}s budget"
        return result
    try:
        result["compiled_bf16"] = measure(None, True, 3, n)
        if time.perf_counter() - t_start > args.time_budget + 45:
            result["compiled_float8"] = "skipped: out of time"
        else:
            result["compiled_float8"] = measure(converters(), True, 3, n)
    except Exception as exc:  # noqa: BLE001 - timing is informational
        result["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if isinstance(result.get("compiled_float8"), float):
        result["speedup_compiled"] = round(result["compiled_bf16"] / result["compiled_float8"], 3)
    result["speedup_eager"] = round(result["eager_bf16"] / result["eager_float8"], 3)
    return result


if __name__ == "__main__":
    sys.exit(main())
