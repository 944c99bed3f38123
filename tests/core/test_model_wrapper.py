"""The full/base/export views and loading through ModelWrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from ckpt_core import CheckpointError, Converter, ConverterSet, ModelWrapper, hookimpl


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("counter", torch.arange(3), persistent=True)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


class Adapter(Converter):
    """Adds an owned ``extra`` parameter per Linear and folds it into the weight on export."""

    name = "adapter"

    @hookimpl
    def convert(self, model):
        for mod in list(model.modules()):
            if isinstance(mod, nn.Linear):
                mod.extra = nn.Parameter(torch.ones(mod.out_features, 1))

    @hookimpl
    def key_filter(self, fqn):
        return fqn.endswith(".extra")

    @hookimpl
    def state_dict_transform(self, state_dict):
        out = {k: v for k, v in state_dict.items() if not k.endswith(".extra")}
        for k, v in state_dict.items():
            if k.endswith(".extra"):
                w = k[: -len("extra")] + "weight"
                out[w] = state_dict[w] * (v + 1)
        return out


def test_views_split_converter_keys_and_skip_non_persistent_buffers():
    model = Block()
    convs = ConverterSet([Adapter()])
    convs.convert(model)
    wrapper = ModelWrapper(model, converters=convs)
    full, base, export = (wrapper.state_dict(v) for v in ("full", "base", "export"))
    assert set(full) == {"lin.weight", "lin.bias", "lin.extra", "counter"}
    assert set(base) == {"lin.weight", "lin.bias", "counter"}
    assert set(export) == {"lin.weight", "lin.bias", "counter"}
    torch.testing.assert_close(export["lin.weight"], model.lin.weight * 2)
    assert wrapper.owned_keys() == {"adapter": ["lin.extra"]}


def test_full_view_shares_storage_with_live_parameters():
    model = Block()
    wrapper = ModelWrapper(model)
    sd = wrapper.state_dict("full")
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    assert torch.equal(sd["lin.weight"], model.lin.weight)


def test_canonical_names_drop_compile_and_checkpoint_wrapper_prefixes():
    inner = nn.Sequential(checkpoint_wrapper(Block()), Block())
    compiled = torch.compile(inner)  # no forward: nothing is compiled, only wrapped
    raw = compiled.state_dict()
    assert any("_orig_mod." in k for k in raw)
    sd = ModelWrapper(compiled).state_dict()
    assert set(sd) == {
        f"{i}.{name}" for i in (0, 1) for name in ("lin.weight", "lin.bias", "counter")
    }
    # Loading by canonical names reaches the wrapped modules.
    new = {k: torch.full_like(v, 3) for k, v in sd.items()}
    ModelWrapper(compiled).load_state_dict(new)
    assert torch.all(inner[0]._checkpoint_wrapped_module.lin.weight == 3)


def test_several_model_parts_merge_and_load():
    a, b = nn.Linear(2, 2), nn.Sequential(nn.Identity(), nn.Linear(2, 3))
    wrapper = ModelWrapper([a, b])
    sd = wrapper.state_dict()
    assert set(sd) == {"weight", "bias", "1.weight", "1.bias"}
    wrapper.load_state_dict({k: torch.zeros_like(v) for k, v in sd.items()})
    assert torch.all(b[1].weight == 0) and torch.all(a.weight == 0)


def test_duplicate_keys_across_parts_are_an_error():
    with pytest.raises(CheckpointError, match="two model parts"):
        ModelWrapper([nn.Linear(2, 2), nn.Linear(2, 2)]).state_dict()


def test_load_lists_missing_and_unexpected_keys_by_name():
    wrapper = ModelWrapper(Block())
    sd = wrapper.state_dict()
    sd.pop("lin.bias")
    sd["lin.gamma"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        wrapper.load_state_dict(sd)
    assert "Missing keys (1): lin.bias" in str(err.value)
    assert "Unexpected keys (1): lin.gamma" in str(err.value)
    missing, unexpected = wrapper.load_state_dict(sd, strict=False)
    assert missing == ["lin.bias"] and unexpected == ["lin.gamma"]


def test_shape_mismatch_names_key_and_both_shapes():
    wrapper = ModelWrapper(Block())
    sd = {k: v.clone() for k, v in wrapper.state_dict().items()}
    sd["lin.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError, match=r"'lin.weight'.*\[4, 4\].*\[5, 4\]"):
        wrapper.load_state_dict(sd)


def test_unknown_view_is_refused():
    with pytest.raises(ValueError, match="full"):
        ModelWrapper(Block()).state_dict("everything")
