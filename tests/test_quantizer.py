import pytest
import torch

from hyq_tvm.errors import HyqError
from hyq_tvm.quant.quantizer import QuantSpec, check_bits, minmax_params, params_from_range, qrange


@pytest.mark.parametrize("bits,expected", [(8, (-128, 127)), (6, (-32, 31)), (4, (-8, 7)), (2, (-2, 1))])
def test_qrange(bits, expected):
    assert qrange(bits) == expected


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5])
def test_bits_out_of_range(bits):
    with pytest.raises(HyqError, match="from 2 to 8"):
        check_bits(bits)


def test_symmetric_error_within_half_step():
    x = torch.randn(1000)
    p = minmax_params(QuantSpec(8, True), x)
    assert int(p.zero_point) == 0
    assert float(p.scale) == pytest.approx(float(x.abs().max()) / 127)
    assert (p.fake_quantize(x) - x).abs().max() <= float(p.scale) / 2 + 1e-7


def test_asymmetric_maps_range_onto_grid():
    x = torch.linspace(-0.5, 3.0, 101)
    p = minmax_params(QuantSpec(4, False), x)
    q = p.quantize(x)
    assert q.min() == -8 and q.max() == 7
    assert (p.fake_quantize(x) - x).abs().max() <= float(p.scale) / 2 + 1e-6


def test_rounding_is_half_to_even():
    p = params_from_range(QuantSpec(8, True), torch.tensor(-127.0), torch.tensor(127.0))  # scale 1
    assert p.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])).tolist() == [0, 2, 2, -0, -2]


def test_values_beyond_range_clip():
    p = params_from_range(QuantSpec(8, True), torch.tensor(-1.0), torch.tensor(1.0))
    assert p.quantize(torch.tensor([5.0, -5.0])).tolist() == [127, -128]


def test_per_channel_scales_follow_axis():
    x = torch.stack([torch.linspace(-1, 1, 50), torch.linspace(-10, 10, 50)], dim=1)  # channels on axis 1
    p = minmax_params(QuantSpec(8, True, axis=1), x)
    assert p.scale.tolist() == pytest.approx([1 / 127, 10 / 127])
    assert (p.fake_quantize(x) - x).abs().max(dim=0).values[0] <= 0.5 / 127 + 1e-7


def test_zero_point_overflow_channelwise_asymmetric():
    # channel 0 spans negatives; channel 1 is all positive (r_min > 0) as in bridge blocks
    x = torch.stack([torch.linspace(-1, 1, 64), torch.linspace(4.0, 5.0, 64)], dim=1)
    channelwise = minmax_params(QuantSpec(8, False, axis=1), x)
    assert channelwise.overflow == 1
    assert channelwise.zero_point.tolist()[1] == -128  # ideal zero point is far below -128: clamped
    err_channelwise = (channelwise.fake_quantize(x) - x).abs()[:, 1].max()
    assert err_channelwise > 3.0  # the clamped zero point shifts the grid: the channel's top is lost

    layerwise = minmax_params(QuantSpec(8, False), x)
    assert layerwise.overflow == 0
    assert (layerwise.fake_quantize(x) - x).abs().max() <= float(layerwise.scale) / 2 + 1e-6

    symmetric = minmax_params(QuantSpec(8, True, axis=1), x)
    assert (symmetric.fake_quantize(x) - x).abs()[:, 1].max() <= float(symmetric.scale[1]) / 2 + 1e-6


def test_constant_tensor_keeps_its_value():
    """A tensor with one value (softmax over a single token: all ones) gets a usable grid, not a zero scale."""
    x = torch.ones(4, 1)
    p = minmax_params(QuantSpec(8, False), x)
    assert float(p.scale) == pytest.approx(1 / 255)
    assert torch.allclose(p.fake_quantize(x), x)
    assert p.overflow == 1  # its zero point lies below the grid, as for any all-positive range
