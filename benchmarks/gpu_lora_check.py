"""GPU check: LoRA over real (non-emulated) Float8Linear and QAT linears under torch.compile.

Run on a CUDA machine: ``PYTHONPATH=.:ckpt_plugins_lora python benchmarks/gpu_lora_check.py``.
Prints one line per check and exits non-zero on the first failure. ``--cpu`` runs the
same flow on CPU (tiny flavor, emulated float8, ``aot_eager``) to test the script.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
from torch import nn

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.reference import build_model
from ckpt_plugins_lora import LoRAConfig, LoRAConverter

CPU = "--cpu" in sys.argv
DEVICE = "cpu" if CPU else "cuda"
FLAVOR = "tiny" if CPU else "debug"
BACKEND = "aot_eager" if CPU else "inductor"


def swap_float8(model: nn.Module) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(
        model,
        config=Float8LinearConfig(emulate=CPU),
        module_filter_fn=lambda m, fqn: fqn != "output",
    )


def swap_qat(model: nn.Module) -> None:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(torch.int4, group_size=128, is_symmetric=True)
    quantize_(model, QATConfig(weight_config=weight, step="prepare"), filter_fn=_not_output)


def _not_output(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn != "output"


def check(kind: str, swap) -> None:
    torch._dynamo.reset()  # each check compiles the same block code afresh
    torch.manual_seed(0)
    model = build_model(FLAVOR, device=DEVICE, dtype=torch.bfloat16)
    swap(model)
    tokens = torch.randint(0, model.args.vocab_size, (4, 128), device=DEVICE)
    with torch.no_grad():
        before = model(tokens)
    conv = LoRAConverter(LoRAConfig(rank=8, alpha=16))
    convs = ConverterSet([conv])
    convs.convert(model)
    cls = type(model.layers["0"].attention.wq).__name__
    with torch.no_grad():
        assert torch.equal(model(tokens), before), "fresh LoRA changed the output"
    eager = copy.deepcopy(model)
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, backend=BACKEND)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt_e = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    t0 = time.perf_counter()
    for _ in range(12):
        data = torch.randint(0, 64, (4, 129), device=DEVICE, generator=None)
        for m, o in ((model, opt), (eager, opt_e)):
            logits = m(data[:, :-1])
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), data[:, 1:].flatten())
            loss.backward()
            o.step()
            o.zero_grad()
            if m is model:
                losses.append(loss.item())
    if not CPU:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert losses[-1] < losses[0], f"{kind}: loss did not go down: {losses}"
    with torch.no_grad():
        compiled_out, eager_out = model(tokens).float(), eager(tokens).float()
    diff = (compiled_out - eager_out).abs().max().item()
    export = ModelWrapper(model, convs).state_dict("export")
    plain = build_model(FLAVOR, device=DEVICE, dtype=torch.bfloat16)
    plain.load_state_dict(export)
    b = model.layers["0"]._orig_mod.attention.wq.lora_b.weight
    with torch.no_grad():
        merged_out = plain(tokens).float()
    merge_diff = (merged_out - compiled_out).abs().max().item()
    scale = compiled_out.abs().max().item()
    print(
        f"{kind}: linear class {cls}; loss {losses[0]:.3f} -> {losses[-1]:.3f} in 12 steps "
        f"({seconds:.1f}s incl. compile); |B|max {b.abs().max().item():.2e}; compiled vs eager "
        f"max diff {diff:.3e}; merged plain bf16 model vs {kind}+LoRA max diff {merge_diff:.3e} "
        f"(logit scale {scale:.2f}); export keys {len(export)}"
    )


def main() -> int:
    print("cpu" if CPU else torch.cuda.get_device_name(), torch.__version__)
    for kind, swap in (("float8", swap_float8), ("qat", swap_qat), ("plain", lambda m: None)):
        check(kind, swap)
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
