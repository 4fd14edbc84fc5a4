"""The norm rule: quantized LayerNorm / GroupNorm(1) of int8 tensors -> the integer norm kernel."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.relax.integer import integerize, integerize_layers
from hyq_tvm.relax.integer.norm import integer_norm, norm_params, norm_primfunc

from .qdq import RNG, assert_layers_bitexact, const, dq, int8, module, run, scales


def test_quantized_layer_norm_becomes_one_kernel_call():
    s_in, z_in = np.array([0.1, 0.2, 0.05, 0.1], np.float32), np.array([1, 0, -2, 3], np.int8)
    gamma, beta = np.array([1.0, 0.5, 2.0, 1.5], np.float32), np.array([0.0, 0.1, -0.2, 0.3], np.float32)

    def before(bb, x):
        y = bb.emit(relax.op.nn.layer_norm(bb.emit(dq(x, s_in, z_in, axis=1)), const(gamma, "float32"),
                                           const(beta, "float32"), axes=[-1]))
        return relax.op.quantize(y, const(0.03, "float32"), const(-1, "int8"))

    params = norm_params(s_in.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64),
                         np.float64(np.float32(0.03)), 1e-5, 4, 4)

    def expected(bb, x, kernels):
        arrays = [const(z_in, "int32"), const(params.multiplier, "int64"), const(params.gain, "int64"),
                  const(params.offset, "int64"), const(np.full(4, -1), "int32"), const([params.eps], "int64")]
        return relax.call_tir(kernels["hyq_norm0"], [x, *arrays], relax.TensorType((2, 4), "int8"))

    inputs = {"x": ((2, 4), "int8")}
    kernel = norm_primfunc((2, 4), 1, (1,), params.shift)
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)), module(inputs, expected, {"hyq_norm0": kernel}))


@pytest.mark.parametrize("kind,bits", [("layer_norm", 8), ("layer_norm", 4), ("group_norm", 8)])
def test_quantized_norm_becomes_the_integer_kernel(kind, bits):
    """quantize(norm(dequantize(x))) with channel-wise input scales (as Q-HyViT picks them) and channel-wise
    output scales -> the integer norm: bit-exact with numpy, and within one step of the float QDQ graph."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    shape, axis = ((2, 7, 24), 2) if kind == "layer_norm" else ((1, 12, 5, 6), 1)
    channels = shape[axis]
    x = RNG.integers(lo, hi + 1, shape, dtype=np.int8)
    s_in = scales(channels, 0.01, 0.2) * (8 if bits == 4 else 1)
    z_in = RNG.integers(lo // 4, hi // 4, channels).astype(np.int8)
    gamma, beta = RNG.uniform(0.5, 2, channels).astype(np.float32), RNG.normal(0, 0.5, channels).astype(np.float32)
    s_o = scales(channels, 0.02, 0.04) * (16 if bits == 4 else 1)
    z_o = RNG.integers(-3, 3, channels).astype(np.int8)

    def body(bb, xv):
        xd = bb.emit(dq(xv, s_in, z_in, axis=axis))
        g, b = const(gamma, "float32"), const(beta, "float32")
        y = bb.emit(relax.op.nn.layer_norm(xd, g, b, axes=[-1]) if kind == "layer_norm" else
                    relax.op.nn.group_norm(xd, g, b, num_groups=1, channel_axis=1, axes=[2, 3]))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=axis)

    mod = module({"x": (shape, "int8")}, body)
    got = assert_layers_bitexact(mod, x, ["norm"])
    float_qdq = run(mod, x).astype(np.int32)
    assert np.abs(float_qdq - got).max() <= 1
    assert np.mean(float_qdq == got) > 0.98


def test_integer_norm_square_root_is_exact():
    """The kernel's isqrt (floor of the correctly rounded float64 sqrt) equals math.isqrt below 2^52."""
    values = np.concatenate([np.arange(0, 5000), RNG.integers(0, 2 ** 52, 20000), 2 ** 52 - np.arange(1, 50),
                             np.array([k * k - 1 for k in RNG.integers(1, 2 ** 26, 2000)] +
                                      [k * k for k in RNG.integers(1, 2 ** 26, 2000)])]).astype(np.int64)
    got = np.floor(np.sqrt(values.astype(np.float64))).astype(np.int64)
    assert all(int(g) == math.isqrt(int(v)) for g, v in zip(got, values))


def test_norm_over_other_axes_stays_float():
    x = int8((2, 6, 8))

    def body(bb, xv):
        xd = bb.emit(dq(xv, np.float32(0.05), np.int8(0)))
        y = bb.emit(relax.op.nn.layer_norm(xd, const(np.ones((6, 8)), "float32"), const(np.zeros((6, 8)), "float32"),
                                           axes=[-2, -1]))
        return relax.op.quantize(y, const(np.float32(0.03), "float32"), const(np.int8(0), "int8"))

    out, layers = integerize_layers(module({"x": (x.shape, "int8")}, body))
    assert layers == [] and "R.nn.layer_norm" in out["main"].script()


@pytest.mark.parametrize("out_scale", [0.002, 0.05, 3.0])   # most outputs clipped, some, none
def test_the_norm_quotient_without_a_division_per_element_is_the_floor_quotient(out_scale):
    """The kernel's guessed-and-corrected quotient equals numpy's floor division (integer_norm) on rows of every
    kind: constant rows (sigma from eps alone), outliers, gains of both signs, zero points at both ends, and
    numerators that are exact multiples of the divisor (where the guess is one short)."""
    channels, shape = 24, (4, 6, 24)
    x = RNG.integers(-128, 128, shape, dtype=np.int8)
    x[0, 0] = 7                       # a constant row
    x[1, 1] = -128
    x[1, 1, 3] = 127                  # one outlier
    s_in = scales(channels, 0.001, 0.5)
    z_in = RNG.integers(-128, 128, channels).astype(np.int8)
    gamma = RNG.uniform(-4, 4, channels)
    beta = RNG.normal(0, 2, channels)
    s_o = scales(channels, out_scale, 2 * out_scale).astype(np.float64)
    z_o = RNG.integers(-128, 128, channels).astype(np.int8)
    params = norm_params(s_in.astype(np.float64), gamma, beta, s_o, 1e-5, channels, channels)
    k = np.array([1, 5, 60, -3])      # channels 0-3: gain 0, numerators exact multiples k * (sigma << shift)
    z_o[:4] = 0
    params = dataclasses.replace(params, gain=np.concatenate([np.zeros(4, np.int64), params.gain[4:]]),
                                 offset=np.concatenate([(k << params.shift) - (1 << (params.shift - 1)),
                                                        params.offset[4:]]))
    func = norm_primfunc(shape, 2, (2,), params.shift)
    arrays = [z_in.astype(np.int32), params.multiplier, params.gain, params.offset, z_o.astype(np.int32),
              np.array([params.eps], np.int64)]
    got = run(func, x, *arrays, np.zeros(shape, np.int8))
    want = integer_norm(x, z_in, params, z_o, 2, (2,))
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 10 and (got[..., :4] == k).all()
