"""Float8 converter: options, conversion, training, and checkpoints that ignore float8.

Float8 runs emulated on CPU (torchao ``emulate=True``): the casts, scales and
float8 rounding are real, only the matmul runs in fp32.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from ckpt_plugins_float8.conversion import float8_gpu_present
from pydantic import ValidationError
from torch import nn

from ckpt_core import CheckpointConfig, CheckpointManager, ConverterSet, ModelWrapper
from ckpt_core.errors import ConfigError
from ckpt_core.reference import build_model
from ckpt_plugins_float8 import Float8Converter

pytest.importorskip("torchao.float8")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

no_float8_gpu = pytest.mark.skipif(float8_gpu_present(), reason="a float8 GPU is present")


def float8(**options) -> ConverterSet:
    options.setdefault("emulate", True)
    return ConverterSet([Float8Converter(Float8Converter.Config(**options))])


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny")


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 33), generator=gen) for _ in range(n)]


def train(model, opt, data, converters=None) -> list[float]:
    losses = []
    for tokens in data:
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if converters is not None:
            converters.post_optimizer_step([model])
        losses.append(loss.item())
    return losses


# -- options -------------------------------------------------------------------


def test_fsdp_float8_all_gather_with_rowwise_is_refused_naming_both_options():
    with pytest.raises(ValidationError) as info:
        Float8Converter.Config(recipe="rowwise", enable_fsdp_float8_all_gather=True)
    text = str(info.value)
    assert "enable_fsdp_float8_all_gather" in text and "tensorwise" in text


def test_unknown_recipe_and_emulate_values_are_config_errors_naming_option_and_values():
    with pytest.raises(ConfigError, match="option 'recipe'.*'tensorwise' or 'rowwise'"):
        ConverterSet.from_config(["float8"], {"float8": {"recipe": "blockwise"}})
    with pytest.raises(ConfigError) as err:
        ConverterSet.from_config(["float8"], {"float8": {"emulate": "sometimes"}})
    message = str(err.value)
    assert "option 'emulate'" in message and "'auto', true or false" in message
    assert message.count("\n") == 0  # one message, not one per union member
    assert Float8Converter.Config(emulate="false").emulate is False  # CLI strings parse


def test_rowwise_all_gather_error_is_reported_under_the_all_gather_option():
    options = {"recipe": "rowwise", "enable_fsdp_float8_all_gather": True}
    with pytest.raises(ConfigError, match="option 'enable_fsdp_float8_all_gather'"):
        ConverterSet.from_config(["float8"], {"float8": options})


@no_float8_gpu
def test_emulate_auto_emulates_without_a_float8_gpu_and_says_so_once(caplog):
    conv = Float8Converter(Float8Converter.Config())
    with caplog.at_level(logging.INFO, logger="ckpt_plugins_float8"):
        ConverterSet([conv]).convert([tiny(), tiny()])
    said = [r for r in caplog.records if "emulat" in r.getMessage() and "auto" in r.getMessage()]
    assert len(said) == 1
    assert conv.emulate is True


@no_float8_gpu
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_emulate_false_without_a_gpu_runs_real_float8_matmuls_on_the_cpu(caplog):
    emulated, real = tiny(), tiny()
    float8(emulate=True).convert(emulated)
    with caplog.at_level(logging.INFO, logger="ckpt_plugins_float8"):
        convs = float8(emulate=False)
        convs.convert(real)
    assert convs["float8"].emulate is False
    assert real.layers["0"].attention.wq.config.emulate is False
    assert any("torch._scaled_mm on the CPU" in r.getMessage() for r in caplog.records)
    tokens = batches(1)[0]
    with torch.no_grad():
        a, b = emulated(tokens), real(tokens)
    # Same float8 operands, another matmul kernel: nearly all logits agree to fp32 rounding;
    # a rare activation that lands on an fp8 rounding midpoint flips and moves a few more.
    diff = (a - b).abs()
    assert not torch.equal(a, b)
    assert diff.median().item() < 1e-6 and diff.max().item() < 0.05
    opt = torch.optim.AdamW(real.parameters(), lr=3e-3)
    losses = train(real, opt, batches(2) * 4)
    assert losses[-1] < losses[0]


def test_emulate_false_on_a_gpu_without_float8_is_a_config_error_naming_the_fix(monkeypatch):
    # An A100 (8.0) cannot be lent here: the CUDA queries are the one thing faked.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(ConfigError, match=r"emulate.*has 8\.0.*emulate = 'auto'"):
        float8(emulate=False).convert(tiny())


# -- conversion ----------------------------------------------------------------


class OddDims(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 32, bias=False)
        self.odd = nn.Linear(64, 24, bias=False)
        self.output = nn.Linear(32, 48, bias=False)


def test_convert_swaps_linears_but_skips_output_and_dims_not_divisible_by_16(caplog):
    model = OddDims()
    conv = Float8Converter(Float8Converter.Config(emulate=True))
    with caplog.at_level(logging.INFO, logger="ckpt_plugins_float8"):
        ConverterSet([conv]).convert(model)
    assert isinstance(model.proj, Float8Linear)
    assert type(model.odd) is nn.Linear and type(model.output) is nn.Linear
    assert set(conv.converted) == {"proj"}
    assert set(conv.skipped) == {"odd", "output"}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "odd" in logged and "24" in logged and "output" in logged


def test_convert_targets_every_reference_linear_except_output():
    model = tiny()
    conv = Float8Converter(Float8Converter.Config(emulate=True))
    ConverterSet([conv]).convert(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(conv.converted) == linears - {"output"}
    assert len(conv.converted) == 14  # 2 layers x (4 attention + 3 feed-forward)


def test_qat_linears_are_refused_before_any_swap_unless_filtered_out():
    qat = pytest.importorskip("ckpt_plugins_qat")
    model = tiny()
    options = {"group_size": 32, "targets": ["wq"]}
    qat.QATConverter(qat.QATConverter.Config(**options)).convert(model)
    fake_quantized = type(model.layers["0"].attention.wq)
    with pytest.raises(ConfigError) as err:
        float8().convert(model)
    message = str(err.value)
    assert "layers.0.attention.wq (FakeQuantizedLinear)" in message
    assert "filter_fqns" in message and "converters.qat.targets" in message
    assert not any(isinstance(m, Float8Linear) for m in model.modules())  # nothing swapped

    conv = Float8Converter(Float8Converter.Config(emulate=True, filter_fqns=["output", "wq"]))
    ConverterSet([conv]).convert(model)
    assert type(model.layers["0"].attention.wq) is fake_quantized  # QAT kept
    assert isinstance(model.layers["0"].attention.wk, Float8Linear)
    assert len(conv.converted) == 12


# -- training ------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_training_lowers_the_loss(recipe):
    model = tiny()
    float8(recipe=recipe).convert(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = batches(2) * 6
    losses = train(model, opt, data)
    assert losses[-1] < 0.75 * losses[0], losses


def test_float8_forward_differs_from_the_high_precision_forward():
    # Proves the converted model really runs float8 casts (not silently plain matmuls).
    plain, converted = tiny(), tiny()
    float8().convert(converted)
    tokens = batches(1)[0]
    with torch.no_grad():
        diff = (plain(tokens) - converted(tokens)).abs().max().item()
    assert 1e-4 < diff < 0.5


# -- checkpoints ---------------------------------------------------------------


def test_checkpoint_keys_shapes_and_dtypes_match_a_plain_run():
    plain, converted = tiny(), tiny()
    convs = float8()
    convs.convert(converted)
    a = ModelWrapper(plain).state_dict("full")
    b = ModelWrapper(converted, convs).state_dict("full")
    assert list(a) == list(b)
    for key in a:
        assert (a[key].shape, a[key].dtype) == (b[key].shape, b[key].dtype), key
        assert type(b[key]) is torch.Tensor, key
    assert ModelWrapper(converted, convs).state_dict("base").keys() == b.keys()
    assert not ModelWrapper(converted, convs).owned_keys()


def run(folder, converters, steps: range, data, seed: int = 0, save: bool = True):
    """Build a tiny model, resume through CheckpointManager, train ``steps``, save the last."""
    model = tiny(seed)
    if converters is not None:
        converters.convert(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = CheckpointConfig(folder=str(folder), interval=1000, export={"enable": False})
    manager = CheckpointManager(config, model, optimizers=opt, converters=converters)
    resumed = manager.load()
    losses = []
    for step in steps:
        losses += train(model, opt, [data[step - 1]], converters)
        if save:
            manager.save(step, last_step=step == steps[-1])
    manager.close()
    return model, opt, losses, resumed


@pytest.mark.parametrize("direction", ["float8_to_plain", "plain_to_float8"])
def test_checkpoint_resumes_with_float8_switched(direction, tmp_path):
    data = batches(2) * 4
    first, second = (float8(), None) if direction == "float8_to_plain" else (None, float8())
    src, src_opt, _, _ = run(tmp_path, first, range(1, 4), data)
    saved = {k: v.clone() for k, v in ModelWrapper(src).state_dict("full").items()}
    saved_opt = copy.deepcopy(src_opt.state_dict())

    dst, _, losses, resumed = run(tmp_path, second, range(4, 9), data, seed=123, save=False)
    assert resumed
    # The uninterrupted reference: the live weights and AdamW moments of step 3, carried
    # in memory into a model of the new kind. Steps 5.. use the moments, so a resume that
    # dropped the optimizer state fails here too.
    ref = tiny(seed=9)
    ref_convs = float8() if second is not None else None
    if ref_convs is not None:
        ref_convs.convert(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    ModelWrapper(ref).load_state_dict(saved)
    opt.load_state_dict(saved_opt)
    assert losses == train(ref, opt, data[3:8], ref_convs)
    assert losses[-1] < losses[0]
    assert set(ModelWrapper(dst).state_dict("full")) == set(saved)


def test_float8_save_and_resume_continue_bit_exactly(tmp_path):
    data = batches(6)
    _, _, expected, _ = run(tmp_path / "straight", float8(), range(1, 7), data, save=False)
    run(tmp_path / "split", float8(), range(1, 4), data)
    _, _, resumed_losses, resumed = run(
        tmp_path / "split", float8(), range(4, 7), data, seed=7, save=False
    )
    assert resumed
    assert resumed_losses == expected[3:]
