"""Integer mode's tensor quantizers: where they go, what they do, and the graph they make."""
from collections import Counter

import pytest
import torch
from torch import nn

from hyq_tvm import zoo
from hyq_tvm.quant.baselines.minmax import calibrate_minmax
from hyq_tvm.quant.modules import QuantAct, QuantLayer, prepare, quant_layers
from hyq_tvm.quant.tensors import add_tensor_quantizers, compute_kind


class _Block(nn.Module):
    """conv -> SiLU -> conv, a residual add, a reshape into a linear, and a scaled pooled output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.conv1(x)
        z = self.conv2(self.act(y)) + y
        tokens = z.flatten(2).transpose(1, 2)
        return self.fc(tokens).mean(1) * 0.5


def _integer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    prepare(model, x[:1], mode="integer")
    add_tensor_quantizers(model, x[:1])
    return model


def test_compute_functions_are_told_from_layout_ones():
    assert [compute_kind(f) for f in (torch.Tensor.__add__, torch.Tensor.__iadd__, torch.Tensor.__rmul__,
                                      torch.Tensor.__truediv__, torch.nn.functional.silu, torch.cat,
                                      torch.nn.functional.adaptive_avg_pool2d)] == [
        "add", "add", "mul", "truediv", "silu", "cat", "adaptiveavgpool2d"]
    assert [compute_kind(f) for f in (torch.Tensor.reshape, torch.Tensor.transpose, torch.Tensor.__getitem__,
                                      torch.flatten, torch.Tensor.size)] == [None] * 5


def test_a_producer_is_quantized_unless_only_layers_take_its_value_as_is():
    model = _integer(_Block().eval(), torch.randn(2, 3, 8, 8))
    tensors = sorted(n for n, m in quant_layers(model).items() if m.op == "tensor")
    # conv1's output feeds the SiLU (float) and the add; the SiLU feeds conv2 only; conv2 feeds the add; the
    # add reaches fc through a reshape; fc feeds the mean, the mean the product, the product the model output
    assert tensors == ["add0", "conv1.output", "conv2.output", "fc.output", "mean0", "mul0"]
    assert all(isinstance(quant_layers(model)[n], QuantAct) for n in tensors)


def test_tensor_quantizers_change_nothing_until_enabled_then_quantize_what_they_name():
    model, x = _Block().eval(), torch.randn(4, 3, 8, 8)
    expected = model(x)
    _integer(model, x)
    assert torch.allclose(model(x), expected, atol=1e-6)
    calibrate_minmax(model, x, 8, 8)
    seen = {}
    add = quant_layers(model)["add0"]
    add.register_forward_hook(lambda _, __, out: seen.setdefault("add", out))
    out = model(x)
    assert not torch.equal(out, expected) and torch.allclose(out, expected, atol=0.1)
    steps = (seen["add"] / add.act.scale).round() * add.act.scale
    assert torch.allclose(seen["add"], steps, atol=1e-5)  # on add0's grid
    assert (out / quant_layers(model)["mul0"].act.scale).round().sub(
        out / quant_layers(model)["mul0"].act.scale).abs().max() < 1e-3  # the output is quantized too


def test_modules_called_on_their_own_quantize_their_tensors():
    """Q-HyViT replays blocks and layers outside the model's forward: the quantizers apply there too."""
    model, x = _Block().eval(), torch.randn(4, 3, 8, 8)
    _integer(model, x)
    calibrate_minmax(model, x, 8, 8)
    conv1 = model.conv1
    assert isinstance(conv1, QuantLayer)
    out = conv1(x)
    scale = conv1.output.act.scale
    assert torch.allclose(out, (out / scale).round() * scale, atol=1e-5)


def test_mobilevit_xxs_in_integer_mode():
    model = zoo.build_model("mobilevit_xxs", 10, 64).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    _integer(model, x)
    layers = quant_layers(model)
    counts = Counter(layer.op for layer in layers.values())
    assert counts == {"tensor": 106, "linear": 37, "conv2d": 35, "norm": 21, "matmul": 18, "softmax": 9}
    attn = "stages.2.1.transformer.0"
    # the qkv output reaches its matmuls through reshapes: quantized; the softmax feeds its matmul directly: not
    assert f"{attn}.attn.qkv.output" in layers and f"{attn}.attn.softmax0.output" not in layers
    assert f"{attn}.add0" in layers and f"{attn}.add1" in layers
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_other_modes_have_no_tensor_quantizers(mode):
    model = zoo.build_model("mobilevit_xxs", 10, 64).eval()
    prepare(model, torch.randn(1, 3, 64, 64), mode=mode)
    assert not any(layer.op == "tensor" for layer in quant_layers(model).values())
