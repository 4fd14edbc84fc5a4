"""The pool rule: average pools, means and sums of int8 tensors -> window sums of x - z, requantized with the exact
multiplier of each output position's count."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.errors import HyqError
from hyq_tvm.relax.integer import integerize, integerize_layers
from hyq_tvm.relax.integer.operand import consts
from hyq_tvm.relax.integer.pool import IDENTITY, Pooling, pool_primfunc, pooled
from hyq_tvm.relax.integer.requantize import requant_params

from .qdq import RNG, assert_layers_bitexact, const, dq, int8, module, run, scales


def test_quantized_avg_pool_becomes_one_pool_call():
    def before(bb, x):
        y = bb.emit(relax.op.nn.avg_pool2d(bb.emit(dq(x, 0.5, 3)), (2, 2), (2, 2)))
        return relax.op.quantize(y, const(0.375, "float32"), const(1, "int8"))

    # M = 0.5 / (4 * 0.375); accumulators up to 4 * max(127 - 3, 3 + 128)
    params = requant_params(np.float64(0.5), np.float64(0.375) * 4, np.int64(1), None, np.int64(4 * 131), "test")

    def expected(bb, x, kernels):
        return relax.call_tir(kernels["hyq_pool0"], [x, *consts([np.array([3], np.int32), *params])],
                              relax.TensorType((1, 2, 2, 2), "int8"))

    inputs = {"x": ((1, 2, 4, 4), "int8")}
    pooling = Pooling((1, 2, 4, 4), (IDENTITY, IDENTITY, (2, 2, 1, 0), (2, 2, 1, 0)), (1, 2, 2, 2), (True,) * 4)
    kernel = pool_primfunc(pooling, 3, 1, (), 1, "int32", False)
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)), module(inputs, expected, {"hyq_pool0": kernel}))


@pytest.mark.parametrize("acc_dtype", ["int32", "int64"])
def test_the_kernel_accumulates_in_int32_or_int64_like_its_twin(acc_dtype):
    """A mean over the last axis: the window sum in either accumulator type, requantized, equals pooled (the
    rewrite takes int64 only when a window could pass 2^31)."""
    x, s_in, z_in, s_o, z_o = int8((2, 3, 7)), np.float32(0.03), np.int8(-9), np.float32(0.011), np.int8(2)
    pooling = Pooling((2, 3, 7), (IDENTITY, IDENTITY, (7, 1, 1, 0)), (2, 3, 1), (True, True, False))
    span = 128 - int(z_in)
    params = requant_params(np.float64(s_in), np.float64(s_o) * 7, np.int64(z_o), None, np.int64(7 * span), "test")
    kernel = pool_primfunc(pooling, 1, 1, (), 1, acc_dtype, bool(np.any(params[1])))
    got = run(kernel, x, np.array([z_in], np.int32), *params, np.zeros((2, 3), np.int8))
    np.testing.assert_array_equal(got, pooled(x, z_in, pooling, np.array([[7]]), s_in, s_o, z_o, 1))
    assert len(np.unique(got)) > 3


def _avg(kernel, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), ceil_mode=False, count_include_pad=True):
    return lambda v: relax.op.nn.avg_pool2d(v, kernel, strides, padding, dilation, ceil_mode, count_include_pad)


# name: (input shape, op, channel axis of the input and of the output or None (per tensor), output / input scale)
CASES = {
    "avg_pool_exclude_pad": ((1, 6, 7, 7), _avg((3, 3), padding=(1, 1, 1, 1), count_include_pad=False), (1, 1), 0.7),
    "avg_pool_ceil_include_pad": ((1, 6, 8, 8), _avg((3, 3), (2, 2), (1, 1, 1, 1), ceil_mode=True), (1, 1), 0.6),
    "avg_pool_ceil_exclude_pad_dilated": ((1, 4, 9, 8), _avg((3, 2), (2, 1), (1, 0, 2, 1), (2, 1), True, False),
                                          None, 0.6),
    "avg_pool_2x2": ((1, 6, 8, 8), _avg((2, 2), (2, 2)), (1, 1), 0.7),
    "adaptive_1x1": ((1, 6, 5, 5), lambda v: relax.op.nn.adaptive_avg_pool2d(v, (1, 1)), (1, 1), 0.2),
    "adaptive_2x3": ((1, 6, 4, 6), lambda v: relax.op.nn.adaptive_avg_pool2d(v, (2, 3)), None, 0.5),
    "mean_last_axis": ((1, 10, 12), lambda v: relax.op.mean(v, axis=[-1]), None, 0.3),
    "mean_last_axis_keepdims": ((1, 10, 12), lambda v: relax.op.mean(v, axis=[2], keepdims=True), (1, 1), 0.3),
    "mean_tokens_per_channel": ((1, 10, 12), lambda v: relax.op.mean(v, axis=[1]), (2, 1), 0.3),
    "mean_spatial_keepdims": ((1, 6, 5, 4), lambda v: relax.op.mean(v, axis=[2, 3], keepdims=True), (1, 1), 0.2),
    "sum_keepdims": ((1, 6, 5, 4), lambda v: relax.op.sum(v, axis=[2], keepdims=True), (1, 1), 4.0),
    "sum": ((2, 6, 5), lambda v: relax.op.sum(v, axis=[0, 2]), (1, 0), 6.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pool_of_int8_becomes_a_requantized_window_sum(case):
    """quantize(P(dequantize(x))): bit-exact with the reference, within one step of the float QDQ graph, no
    float op left; per-channel scales along the kept channel axis."""
    shape, op, channel_axes, ratio = CASES[case]
    x = int8(shape)
    if channel_axes is None:
        (in_axis, out_axis), s_in, z_in = (-1, -1), np.float32(0.03), np.int8(-7)
        s_o, z_o = np.float32(0.03 * ratio), np.int8(4)
    else:
        in_axis, out_axis = channel_axes
        n = shape[in_axis]
        s_in, z_in = scales(n, 0.01, 0.05), RNG.integers(-20, 20, n).astype(np.int8)
        s_o, z_o = (s_in * ratio * RNG.uniform(0.8, 1.2, n)).astype(np.float32), RNG.integers(-5, 5, n).astype(np.int8)

    def body(bb, xv):
        y = bb.emit(op(bb.emit(dq(xv, s_in, z_in, axis=in_axis))))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=out_axis)

    mod = module({"x": (shape, "int8")}, body)
    got = assert_layers_bitexact(mod, x, ["pool"])
    assert "R.dequantize" not in integerize(mod)["main"].script()
    assert len(np.unique(got)) > 5 or got.size <= 12  # not all saturated
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1


def test_counts_differ_at_the_borders_without_padding_in_the_count():
    """count_include_pad=False with padding: the corners average 4, the edges 6, the inside 9 elements, so a
    constant input stays constant."""
    x = np.full((1, 2, 5, 5), 40, np.int8)

    def body(bb, xv):
        y = bb.emit(_avg((3, 3), padding=(1, 1, 1, 1), count_include_pad=False)(bb.emit(dq(xv, 0.1, 0))))
        return relax.op.quantize(y, const(0.1, "float32"), const(0, "int8"))

    got = assert_layers_bitexact(module({"x": (x.shape, "int8")}, body), x, ["pool"])
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("case", ["scale_along_the_pooled_axis", "adaptive_not_dividing"])
def test_pools_that_stay_float(case):
    """Scales varying along a reduced axis, and adaptive pools whose windows differ in size, are not integerized."""
    shape = (1, 6, 5, 5)

    def body(bb, xv):
        if case == "scale_along_the_pooled_axis":
            y = bb.emit(relax.op.mean(bb.emit(dq(xv, scales(6), np.zeros(6, np.int8), axis=1)), axis=[1]))
        else:
            y = bb.emit(relax.op.nn.adaptive_avg_pool2d(bb.emit(dq(xv, 0.02, 0)), (2, 2)))
        return relax.op.quantize(y, const(0.02, "float32"), const(0, "int8"))

    out, layers = integerize_layers(module({"x": (shape, "int8")}, body))
    assert layers == [] and "R.dequantize" in out["main"].script()


def test_a_sum_whose_requantization_overflows_int64_is_refused_by_name():
    """M = s_in / s_o = 2^30 (q = 2^30, left shift 31): 64 summed steps of 255 pass 2^63."""
    def body(bb, xv):
        y = bb.emit(relax.op.sum(bb.emit(dq(xv, 1.0, 0)), axis=[-1]))
        return relax.op.quantize(y, const(2.0 ** -30, "float32"), const(0, "int8"))

    with pytest.raises(HyqError, match=r"relax\.sum '.*' in @main: the requantization overflows int64"):
        integerize(module({"x": ((1, 4, 64), "int8")}, body))
