import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyq_tvm import zoo
from hyq_tvm.quant.modules import QuantLayer, QuantMatMul, fold_batchnorm, prepare, quant_layers
from hyq_tvm.quant.quantizer import QuantSpec, minmax_params


def _with_bn_statistics(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("name,unfolded", [("mobilevit_xxs", []), ("efficientformerv2_s0", ["norm"])])
def test_prepare_keeps_the_float_function(name, unfolded):
    model = _with_bn_statistics(zoo.build_model(name, 10, 64))
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    prepare(model, x[:1])
    assert torch.allclose(model(x), expected, atol=1e-4)
    # only a BatchNorm that does not follow a convolution (v2's final norm after a residual add) stays
    assert [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d] == unfolded


def test_bn_after_conv_is_folded_and_act_kept():
    model = _with_bn_statistics(zoo.build_model("mobilevit_xxs", 10, 64))
    pairs = fold_batchnorm(model, torch.randn(1, 3, 64, 64))
    assert ("stem.conv", "stem.bn") in pairs
    assert isinstance(model.stem.bn, nn.Sequential) and any(isinstance(m, nn.SiLU) for m in model.stem.bn)


def test_attention_matmuls_are_named_in_call_order():
    model = zoo.build_model("mobilevit_xxs", 10, 64).eval()
    prepare(model, torch.randn(1, 3, 64, 64))
    layers = quant_layers(model)
    attn = "stages.2.1.transformer.0.attn"
    assert isinstance(layers[f"{attn}.matmul0"], QuantMatMul) and isinstance(layers[f"{attn}.matmul1"], QuantMatMul)
    assert f"{attn}.matmul2" not in layers
    assert isinstance(layers[f"{attn}.qkv"], QuantLayer)


def test_matmul_quantization_reaches_the_attention():
    model = zoo.build_model("mobilevit_xxs", 10, 64).eval()
    x = torch.randn(2, 3, 64, 64)
    prepare(model, x[:1])
    seen = []
    mm = quant_layers(model)["stages.2.1.transformer.0.attn.matmul0"]
    mm.register_forward_pre_hook(lambda _, args: seen.append(tuple(a.shape for a in args)))
    before = model(x)
    mm.acts = [minmax_params(QuantSpec(2, True), torch.ones(1)) for _ in range(2)]
    mm.enabled = True
    assert seen and len(seen[0]) == 2
    assert not torch.allclose(model(x), before)


def test_channelwise_activation_folds_into_weight():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
    layer = QuantLayer(conv)
    x = torch.randn(4, 8, 10, 10) * torch.logspace(-2, 1, 8).view(1, 8, 1, 1)
    act = minmax_params(QuantSpec(8, False, axis=1), x)
    weight = minmax_params(QuantSpec(8, True, 0), layer.folded_weight(act))
    out = layer.quantized(x, act, weight)
    # the integers the kernel multiplies are what a dequantized-input conv sees
    reference = F.conv2d(act.fake_quantize(x), conv.weight, conv.bias, padding=1, groups=8)
    assert (out - reference).abs().max() / reference.abs().max() < 0.01
    assert torch.equal(act.centered(x), act.centered(x).round())
    w_int = weight.quantize(layer.folded_weight(act))
    assert w_int.abs().max() <= 128 and torch.equal(w_int, w_int.round())


def test_grouped_conv_folds_per_group():
    conv = nn.Conv2d(6, 4, 1, groups=2)
    layer = QuantLayer(conv)
    act = minmax_params(QuantSpec(8, True, axis=1), torch.randn(2, 6, 3, 3) * torch.arange(1, 7).view(1, 6, 1, 1))
    folded = layer.folded_weight(act)
    assert torch.allclose(folded[:2], conv.weight[:2] * act.scale[:3].view(1, 3, 1, 1))
    assert torch.allclose(folded[2:], conv.weight[2:] * act.scale[3:].view(1, 3, 1, 1))


def test_full_mode_quantizes_norm_and_softmax_inputs():
    from collections import Counter
    from hyq_tvm.quant.modules import QuantAct
    from hyq_tvm.quant.baselines.minmax import calibrate_minmax
    model = zoo.build_model("mobilevit_xxs", 10, 64).eval()
    x = torch.randn(4, 3, 64, 64)
    expected = model(x)
    prepare(model, x[:1], mode="full")
    layers = quant_layers(model)
    assert Counter(layer.op for layer in layers.values()) == {
        "linear": 37, "conv2d": 35, "norm": 21, "matmul": 18, "softmax": 9}
    softmax = layers["stages.2.1.transformer.0.attn.softmax0"]
    assert isinstance(softmax, QuantAct) and softmax.act_axis is None
    assert layers["stages.2.1.transformer.0.norm1"].act_axis == -1
    assert torch.allclose(model(x), expected, atol=1e-5)
    calibrate_minmax(model, x, 8, 8)
    assert softmax.enabled and not torch.equal(model(x), expected)
