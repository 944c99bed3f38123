"""LoRA ``convert``: adapters on existing linears, frozen base, composition with other linears."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.errors import ConfigError
from ckpt_core.protocol.converter import Converter
from ckpt_plugins_lora import LoRAConfig, LoRAConverter
from tests.plugins.lora_support import DIM, VOCAB, TinyLlama, randomize_adapters, tokens


def lora(**options) -> tuple[LoRAConverter, ConverterSet]:
    conv = LoRAConverter(LoRAConfig(**options))
    return conv, ConverterSet([conv])


def test_base_view_keys_equal_a_plain_models_keys():
    torch.manual_seed(0)
    plain = TinyLlama()
    model = TinyLlama()
    conv, convs = lora(rank=4)
    convs.convert(model)
    wrapper = ModelWrapper(model, convs)
    assert list(wrapper.state_dict("base")) == list(plain.state_dict())
    full = wrapper.state_dict("full")
    adapter_keys = sorted(set(full) - set(plain.state_dict()))
    assert len(adapter_keys) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    assert full["layers.0.attention.wk.lora_a.weight"].shape == (4, DIM)
    assert full["layers.0.attention.wk.lora_b.weight"].shape == (16, 4)
    assert all(convs.owner(k) == "lora" for k in adapter_keys)
    assert not any(convs.key_filter(k) for k in plain.state_dict())


def test_fresh_adapters_are_a_no_op_with_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    model = TinyLlama()
    x = tokens()
    before = model(x)
    conv, convs = lora(rank=4)
    convs.convert(model)
    assert torch.equal(model(x), before)
    wq = model.layers["0"].attention.wq
    assert torch.count_nonzero(wq.lora_b.weight) == 0
    bound = 1 / math.sqrt(DIM)  # kaiming-uniform with a = sqrt(5)
    a = wq.lora_a.weight
    assert a.abs().max() <= bound and a.abs().max() > bound / 2


def test_convert_freezes_everything_but_the_factors():
    model = TinyLlama()
    conv, convs = lora(rank=2, target_modules=["wq", "w2"])
    convs.convert(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"layers.{i}.{m}.{f}.weight"
        for i in "01"
        for m in ("attention.wq", "feed_forward.w2")
        for f in ("lora_a", "lora_b")
    )
    model(tokens()).sum().backward()
    grads = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    assert grads == trainable
    assert conv.modules == {
        f"layers.{i}.{m}" for i in "01" for m in ("attention.wq", "feed_forward.w2")
    }


def test_update_is_alpha_over_rank_times_b_a_x():
    torch.manual_seed(0)
    model = TinyLlama()
    conv, convs = lora(rank=4, alpha=12, target_modules=["wq"])
    convs.convert(model)
    randomize_adapters(model)
    wq = model.layers["0"].attention.wq
    x = torch.randn(3, DIM)
    expected = x @ wq.weight.T + 3.0 * (x @ wq.lora_a.weight.T @ wq.lora_b.weight.T)
    torch.testing.assert_close(wq(x), expected)
    torch.testing.assert_close(wq(input=x), expected)


def test_dropout_applies_to_the_adapter_input_only_in_training():
    torch.manual_seed(0)
    model = TinyLlama()
    conv, convs = lora(rank=4, dropout=0.5, target_modules=["wq"])
    convs.convert(model)
    wq = model.layers["0"].attention.wq
    x = torch.randn(64, DIM)
    base = x @ wq.weight.T
    assert torch.equal(wq(x), base)  # B = 0: dropout is invisible
    randomize_adapters(model)
    model.eval()
    full_update = wq(x) - base
    model.train()
    torch.manual_seed(1)
    dropped_update = wq(x) - base
    assert not torch.allclose(dropped_update, full_update)


def test_unknown_target_is_a_config_error_listing_the_linear_names():
    _, convs = lora(target_modules=["wq", "q_proj"])
    with pytest.raises(ConfigError) as exc:
        convs.convert(TinyLlama())
    msg = str(exc.value)
    assert "['q_proj']" in msg
    for leaf in ("output", "w1", "w2", "w3", "wk", "wo", "wq", "wv"):
        assert f"'{leaf}'" in msg


def test_converting_twice_is_a_config_error():
    model = TinyLlama()
    lora()[1].convert(model)
    with pytest.raises(ConfigError, match="already attached"):
        lora()[1].convert(model)


@pytest.mark.parametrize("other", ["qat", "float8"])
def test_lora_listed_before_qat_or_float8_is_a_config_error_naming_both(other):
    class Other(Converter):
        name = other

    with pytest.raises(ConfigError) as exc:
        ConverterSet([LoRAConverter(), Other()])
    assert repr(other) in str(exc.value) and "'lora'" in str(exc.value)
    assert ConverterSet([Other(), LoRAConverter()]).names == [other, "lora"]


def test_meta_model_materializes_with_zero_b_even_after_init_weights():
    with torch.device("meta"):
        model = TinyLlama()
    conv, convs = lora(rank=4)
    convs.convert(model)
    model.to_empty(device="cpu")
    model.init_weights()  # re-inits every nn.Linear; the factors are not nn.Linear
    wq = model.layers["1"].attention.wq
    assert torch.count_nonzero(wq.lora_b.weight) == 0
    assert torch.isfinite(wq.lora_a.weight).all() and wq.lora_a.weight.abs().sum() > 0
    assert wq.lora_a.weight.abs().max() <= 1 / math.sqrt(DIM)


def _train(model: nn.Module, steps: int = 4) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-2)
    x = tokens(seed=3)
    target = torch.roll(x, 1, dims=1)
    losses = []
    for _ in range(steps):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _swap_linears(model: nn.Module, make) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name != "output":
                setattr(module, child_name, make(child))


def _qat_linear(linear: nn.Linear) -> nn.Linear:
    from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig

    cfg = IntxFakeQuantizeConfig(dtype=torch.int4, group_size=16, is_symmetric=True)
    return FakeQuantizedLinear.from_linear(linear, weight_config=cfg)


def _float8_linear(linear: nn.Linear) -> nn.Linear:
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear.from_float(linear, Float8LinearConfig(emulate=True))


@pytest.mark.parametrize("make", [_qat_linear, _float8_linear], ids=["qat", "float8"])
def test_lora_wraps_quantized_linears_keeps_their_class_and_trains(make):
    torch.manual_seed(0)
    model = TinyLlama()
    _swap_linears(model, make)
    kind = type(model.layers["0"].attention.wq)
    x = tokens()
    before = model(x)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    conv, convs = lora(rank=4, alpha=8)
    convs.convert(model)
    assert type(model.layers["0"].attention.wq) is kind and kind is not nn.Linear
    assert torch.equal(model(x), before)
    losses = _train(model)
    assert losses[-1] < losses[0]
    assert torch.count_nonzero(model.layers["0"].attention.wq.lora_b.weight) > 0
    for key, value in frozen.items():  # the quantized base never moves
        assert torch.equal(model.state_dict()[key], value), key
    export = ModelWrapper(model, convs).state_dict("export")
    assert set(export) == set(frozen)
    assert not torch.equal(
        export["layers.0.attention.wq.weight"], frozen["layers.0.attention.wq.weight"]
    )


def test_compiled_model_matches_eager_and_trains_the_factors():
    torch.manual_seed(0)
    model = TinyLlama()
    conv, convs = lora(rank=4)
    convs.convert(model)
    randomize_adapters(model)
    x = tokens()
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    keys = list(ModelWrapper(compiled, convs).state_dict("full"))
    assert keys == list(model.state_dict())  # _orig_mod. is dropped
    b_before = model.layers["0"].feed_forward.w2.lora_b.weight.detach().clone()
    losses = _train(compiled, steps=3)
    assert losses[-1] < losses[0]
    assert not torch.equal(model.layers["0"].feed_forward.w2.lora_b.weight, b_before)
