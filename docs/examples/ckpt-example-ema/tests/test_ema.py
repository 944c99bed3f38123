import torch
from torch import nn

from ckpt_core import ConverterSet, ModelWrapper
from ckpt_core.testing import check_converter


def test_ema_keeps_the_converter_contract():
    check_converter("ema")
    check_converter("ema", options={"decay": 0.5, "export_ema": False})


def test_the_base_view_leaves_the_averages_out_and_the_export_uses_them():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    convs = ConverterSet.from_config(["ema"], {"ema": {"decay": 0.5}})
    convs.convert(model)
    wrapper = ModelWrapper(model, converters=convs)
    assert not any(k.endswith("weight_ema") for k in wrapper.state_dict("base"))
    with torch.no_grad():
        model[0].weight.add_(2.0)
    convs.post_optimizer_step([model])
    assert torch.allclose(wrapper.state_dict("export")["0.weight"], model[0].weight - 1.0)
