"""The resize rule: nearest and bilinear image.resize2d of int8 tensors -> exact integer interpolation weights,
one requantization (or a pure gather)."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.relax.integer import integerize, integerize_layers
from hyq_tvm.relax.integer.operand import consts
from hyq_tvm.relax.integer.requantize import requant_params
from hyq_tvm.relax.integer.resize import axis_taps, gather_primfunc, resize_primfunc, resized

from .qdq import RNG, assert_layers_bitexact, const, dq, grid, int8, module, run, scales

# efficientformerv2_s0's two upsamplings (layout NCHW), as the torch frontend emits them
EFFICIENTFORMER = {"roi": [0.0, 0.0, 0.0, 0.0], "method": "linear",
                   "coordinate_transformation_mode": "half_pixel", "rounding_method": "round", "cubic_alpha": -0.75,
                   "cubic_exclude": 0, "extrapolation_value": 0.0}


def resize_module(shape, size, s_in, z_in, s_o, z_o, layout: str = "NCHW", **attrs) -> tvm.IRModule:
    """main(x) = quantize(resize2d(dequantize(x), size, layout, **attrs)), parameters along the channel axis."""
    axis = layout.index("C")

    def body(bb, x):
        y = bb.emit(relax.op.image.resize2d(bb.emit(dq(x, s_in, z_in, axis)), size, layout=layout, **attrs))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=axis)

    return module({"x": (shape, "int8")}, body)


def test_axis_taps_are_the_exact_interpolation_weights():
    """2x half_pixel bilinear: weights 3/4, 1/4 (d = 4), the clamped edges one input of weight 1; 2x nearest:
    a gather (ties half to even, or up); 5 -> 3 align_corners: coordinates 0, 2, 4; 3 -> 2 asymmetric linear: 0
    and 3/2 (d = 2)."""
    ih, wh, d = axis_taps(2, 4, "linear", "half_pixel", "round")
    assert d == 4 and ih.tolist() == [[0, 0], [0, 1], [0, 1], [1, 1]]
    assert wh.tolist() == [[4, 0], [3, 1], [1, 3], [4, 0]]
    ih, wh, d = axis_taps(3, 6, "nearest_neighbor", "half_pixel", "round")
    assert d == 1 and ih[:, 0].tolist() == [0, 0, 1, 1, 2, 2] and wh.tolist() == [[1]] * 6
    ih, wh, d = axis_taps(8, 4, "nearest_neighbor", "half_pixel", "round")  # ties 0.5, 2.5, ..: half to even
    assert ih[:, 0].tolist() == [0, 2, 4, 6]
    assert axis_taps(8, 4, "nearest_neighbor", "half_pixel", "round_prefer_ceil")[0][:, 0].tolist() == [1, 3, 5, 7]
    ih, wh, d = axis_taps(5, 3, "linear", "align_corners", "")
    assert d == 1 and ih[:, 0].tolist() == [0, 2, 4] and wh[:, 0].tolist() == [1, 1, 1]
    ih, wh, d = axis_taps(3, 2, "linear", "asymmetric", "")
    assert d == 2 and ih.tolist() == [[0, 1], [1, 2]] and wh.tolist() == [[2, 0], [1, 1]]
    assert axis_taps(4, 1, "linear", "align_corners", "") is None and axis_taps(4, 8, "cubic", "half_pixel", "") is None


def test_exact_weights_of_a_non_integer_factor():
    """5 -> 7 half_pixel: c = (10 o - 2) / 14, weights in 7ths; c = -1/7 and 29/7 read inputs 0 and 4 alone."""
    ih, wh, d = axis_taps(5, 7, "linear", "half_pixel", "")
    assert d == 7 and ih[[0, 6]].tolist() == [[0, 0], [4, 4]] and wh[[0, 6]].tolist() == [[7, 0], [7, 0]]
    for o in range(1, 6):
        c = Fraction(10 * o - 2, 14)
        low = c.numerator // c.denominator
        f = c - low
        assert ih[o].tolist() == [low, low + 1]
        assert wh[o].tolist() == [int((1 - f) * 7), int(f * 7)]


def test_quantized_bilinear_upsampling_becomes_one_resize_call():
    inputs = {"x": ((1, 3, 2, 2), "int8")}

    def before(bb, x):
        y = bb.emit(relax.op.image.resize2d(bb.emit(dq(x, 0.5, 3)), (4, 4), **EFFICIENTFORMER))
        return relax.op.quantize(y, const(0.375, "float32"), const(1, "int8"))

    ih, wh, _ = axis_taps(2, 4, "linear", "half_pixel", "round")
    params = requant_params(np.float64(0.5), np.float64(16 * 0.375), np.int64(1), None, np.int64(16 * 131), "test")

    def expected(bb, x, kernels):
        args = [ih, wh, ih, wh, np.array([3], np.int32), *params]
        return relax.call_tir(kernels["hyq_resize0"], [x, *consts(args)], relax.TensorType((1, 3, 4, 4), "int8"))

    kernel = resize_primfunc((1, 3, 2, 2), (1, 3, 4, 4), (2, 3), (2, 2), 1, 1, False)
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)),
                                   module(inputs, expected, {"hyq_resize0": kernel}))


def test_nearest_upsampling_onto_its_input_grid_is_a_gather():
    inputs = {"x": ((1, 2, 3, 2), "int8")}

    def before(bb, x):
        y = bb.emit(relax.op.image.resize2d(bb.emit(dq(x, 0.5, 3)), (6, 4), method="nearest_neighbor"))
        return relax.op.quantize(y, const(0.5, "float32"), const(3, "int8"))

    ih, _, _ = axis_taps(3, 6, "nearest_neighbor", "half_pixel", "round")
    iw, _, _ = axis_taps(2, 4, "nearest_neighbor", "half_pixel", "round")

    def expected(bb, x, kernels):
        return relax.call_tir(kernels["hyq_resize_gather0"], [x, *consts([ih, iw])],
                              relax.TensorType((1, 2, 6, 4), "int8"))

    kernel = gather_primfunc((1, 2, 3, 2), (1, 2, 6, 4), (2, 3))
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)),
                                   module(inputs, expected, {"hyq_resize_gather0": kernel}))


CASES = {  # (input shape, size, layout, attrs)
    "efficientformerv2": ((1, 1024, 2, 2), (4, 4), "NCHW", EFFICIENTFORMER),
    "bilinear_half_pixel": ((2, 6, 5, 4), (10, 8), "NCHW", {"method": "linear"}),
    "bilinear_align_corners": ((1, 5, 4, 6), (8, 12), "NCHW",
                               {"method": "linear", "coordinate_transformation_mode": "align_corners"}),
    "bilinear_non_integer": ((1, 4, 5, 6), (7, 9), "NCHW", {"method": "linear"}),
    "bilinear_pytorch_half_pixel_down": ((4, 9, 6, 8), (5, 1), "NHWC",
                                         {"method": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
    "bilinear_asymmetric_nhwc": ((1, 5, 3, 6), (7, 5), "NHWC",
                                 {"method": "linear", "coordinate_transformation_mode": "asymmetric"}),
    "nearest_half_pixel": ((1, 6, 4, 3), (8, 6), "NCHW", {"method": "nearest_neighbor"}),
    "nearest_asymmetric_floor": ((1, 6, 4, 3), (12, 9), "NCHW",
                                 {"method": "nearest_neighbor", "coordinate_transformation_mode": "asymmetric",
                                  "rounding_method": ""}),
    "nearest_align_corners_down": ((1, 6, 9, 7), (5, 4), "NCHW",
                                   {"method": "nearest_neighbor", "coordinate_transformation_mode": "align_corners",
                                    "rounding_method": ""}),
}


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_resize_of_int8_is_bit_exact_and_within_one_step_of_float(case, per_channel):
    """quantize(resize2d(dequantize(x))) -> one integer kernel: bit-exact with the reference (verify.py) and the
    numpy twin, within one step of TVM's float resize of the dequantized input, no float op left."""
    shape, size, layout, attrs = CASES[case]
    axis = layout.index("C")
    x = int8(shape)
    grids = (*grid(per_channel, shape[axis], 0.02, 0.05), *grid(per_channel, shape[axis], 0.015, 0.04, 6))
    mod = resize_module(shape, size, *grids, layout, **attrs)
    got = assert_layers_bitexact(mod, x, ["resize"])
    assert "R.dequantize" not in integerize(mod)["main"].script()
    (layer,) = integerize_layers(mod)[1]
    assert not layer.attrs["gather"]
    a = layer.attrs
    np.testing.assert_array_equal(got, resized(x, grids[1], a["indices"], a["weights"], a["denominator"], a["spatial"],
                                               grids[0], grids[2], grids[3], axis))
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1
    assert len(np.unique(got)) > 30  # not saturated


@pytest.mark.parametrize("case", ["nearest_half_pixel", "nearest_asymmetric_floor", "nearest_align_corners_down"])
def test_nearest_resize_onto_its_input_grid_gathers_int8_exactly(case):
    """Equal input and output grids (as calibration gives a nearest resize): the gather kernel, equal to the float
    resize."""
    shape, size, layout, attrs = CASES[case]
    s, z = scales(shape[1], 0.02, 0.05), RNG.integers(-10, 10, shape[1]).astype(np.int8)
    mod = resize_module(shape, size, s, z, s, z, layout, **attrs)
    x = int8(shape)
    got = assert_layers_bitexact(mod, x, ["resize"])
    assert integerize_layers(mod)[1][0].attrs["gather"]
    np.testing.assert_array_equal(got, run(mod, x))


@pytest.mark.parametrize("attrs,shape,size", [
    ({"method": "cubic"}, (1, 2, 3, 3), (6, 6)),
    ({"method": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "roi": [0.1, 0.1, 0.9, 0.9]},
     (1, 2, 3, 3), (6, 6)),
    ({"method": "linear", "coordinate_transformation_mode": "align_corners"}, (1, 2, 3, 3), (1, 6)),
])
def test_resizes_the_rule_does_not_lower_stay_in_float(attrs, shape, size):
    """Cubic, tf_crop_and_resize, align_corners onto one row: no layer, the float resize kept."""
    mod = resize_module(shape, size, np.float32(0.04), np.int8(0), np.float32(0.04), np.int8(0), **attrs)
    assert "R.image.resize2d" in integerize(mod)["main"].script()
    assert integerize_layers(mod)[1] == []


def test_weights_with_a_large_common_denominator_stay_in_float():
    """251 -> 257 half_pixel: weights in 257ths along each axis, D = 257^2 > 2^16."""
    assert axis_taps(251, 257, "linear", "half_pixel", "")[2] == 257
    mod = resize_module((1, 1, 251, 251), (257, 257), np.float32(0.04), np.int8(0), np.float32(0.04), np.int8(0),
                        method="linear")
    assert "R.image.resize2d" in integerize(mod)["main"].script()


def test_scales_along_a_spatial_axis_stay_in_float():
    def body(bb, x):
        y = bb.emit(relax.op.image.resize2d(bb.emit(dq(x, scales(4), np.zeros(4, np.int8), axis=2)), (8, 8)))
        return relax.op.quantize(y, const(0.03, "float32"), const(0, "int8"))

    mod = module({"x": ((1, 2, 4, 4), "int8")}, body)
    assert "R.image.resize2d" in integerize(mod)["main"].script()

