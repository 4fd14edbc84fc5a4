"""The gemm rules: QDQ conv2d / matmul lowered to int8 x int8 -> int32, requantized or dequantized."""
from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.errors import HyqError
from hyq_tvm.relax.integer import integerize, integerize_layers
from hyq_tvm.relax.integer.gemm import (
    dequantize_acc,
    qconv2d,
    qmatmul,
    requantize_primfunc,
)
from hyq_tvm.relax.integer.operand import consts
from hyq_tvm.relax.integer.requantize import requant_params, requantize_acc
from hyq_tvm.relax.verify import verify

from .qdq import (
    RNG,
    TARGET,
    assert_layers_bitexact,
    const,
    dq,
    int8,
    integerized,
    module,
    run,
    scales,
)

# -- the graph each rule emits --------------------------------------------------------------------

def test_quantized_conv2d_with_bias_and_relu_becomes_conv_offset_requantize_clamp():
    w = np.arange(-6, 6, dtype=np.int8).reshape(3, 2, 1, 2)
    s_w, bias = np.array([0.25, 0.5, 0.125], np.float32), np.array([1.0, -0.5, 0.25], np.float32)

    def before(bb, x):
        xd = bb.emit(dq(x, 0.5, 3, axis=1))
        wd = bb.emit(dq(const(w, "int8"), s_w, np.zeros(3, np.int8), axis=0))
        y = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(xd, wd)), const(bias.reshape(1, 3, 1, 1), "float32")))
        return relax.op.quantize(bb.emit(relax.op.nn.relu(y)), const(0.25, "float32"), const(-4, "int8"), axis=1)

    acc_scale = 0.5 * s_w.astype(np.float64)
    params = requant_params(acc_scale, np.float64(0.25), np.int64(-4), bias.astype(np.float64) / acc_scale,
                            np.int64(2 ** 12), "conv2d")
    offset = -3 * w.astype(np.int64).sum(axis=(1, 2, 3)).reshape(1, 3, 1, 1)  # -sum(w * z_a) per output channel
    out_ty = relax.TensorType((1, 3, 4, 3), "int8")

    def expected(bb, x, kernels):
        acc = bb.emit(relax.op.nn.conv2d(x, const(w, "int8"), out_dtype="int32"))
        acc = bb.emit(relax.op.add(acc, const(offset, "int32")))
        y = bb.emit(relax.call_tir(kernels["hyq_requantize0"], [acc, *consts(params)], out_ty))
        return relax.op.minimum(bb.emit(relax.op.maximum(y, const(-4, "int8"))), const(127, "int8"))

    inputs = {"x": ((1, 2, 4, 4), "int8")}
    kernel = requantize_primfunc((1, 3, 4, 3), 1, 3, bool(np.any(params[1])))
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)),
                                   module(inputs, expected, {"hyq_requantize0": kernel}))


def test_float_output_matmul_of_activations_becomes_int32_matmul_with_zero_point_terms():
    def before(bb, a, b):
        return relax.op.matmul(bb.emit(dq(a, 0.5, 2)), bb.emit(dq(b, 0.25, -1)))

    def expected(bb, a, b):
        acc = bb.emit(relax.op.matmul(a, b, out_dtype="int32"))
        col = bb.emit(relax.op.sum(bb.emit(relax.op.astype(b, "int32")), axis=[-2], keepdims=True))
        acc = bb.emit(relax.op.subtract(acc, bb.emit(relax.op.multiply(col, const(2, "int32")))))
        row = bb.emit(relax.op.sum(bb.emit(relax.op.astype(a, "int32")), axis=[-1], keepdims=True))
        acc = bb.emit(relax.op.subtract(acc, bb.emit(relax.op.multiply(row, const(-1, "int32")))))
        acc = bb.emit(relax.op.add(acc, const(4 * 2 * -1, "int32")))  # K * z_a * z_b
        return relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")), const(0.5 * 0.25, "float32"))

    inputs = {"a": ((1, 2, 4), "int8"), "b": ((1, 4, 3), "int8")}
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)), module(inputs, expected))


# -- conv2d ---------------------------------------------------------------------------------------

def conv_case(groups: int, quantized: bool, per_channel_act: bool, padding=(1, 1, 1, 1), strides=(1, 1)):
    """A QDQ conv2d module and its reference output for one random int8 input."""
    n, c, h, w, o, k = 1, 8, 7, 7, 8, 3
    x = int8((n, c, h, w))
    w_q = int8((o, c // groups, k, k))
    s_w = scales(o)
    bias = RNG.normal(0, 0.3, o).astype(np.float32)
    if per_channel_act:
        s_a = np.repeat(scales(groups, 0.01, 0.05), c // groups).astype(np.float32)
        z_a = RNG.integers(-20, 20, c).astype(np.int8)
    else:
        s_a, z_a = scales(1, 0.01, 0.05)[0], np.int8(-9)
    s_o, z_o = (scales(o, 0.05, 0.2), RNG.integers(-10, 10, o).astype(np.int8)) if quantized else (None, None)

    def body(bb, xv):
        xd = bb.emit(dq(xv, s_a, z_a, axis=1))
        wd = bb.emit(dq(const(w_q, "int8"), s_w, np.zeros(o, np.int8), axis=0))
        y = bb.emit(relax.op.nn.conv2d(xd, wd, strides=strides, padding=padding, groups=groups))
        if not quantized:  # the float island (and its float bias add) starts here
            return y
        y = bb.emit(relax.op.add(y, const(bias.reshape(1, o, 1, 1), "float32")))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"x": ((n, c, h, w), "int8")}, body)
    acc = qconv2d(x, z_a, w_q, strides, padding, (1, 1), groups)
    s_a_out = s_a.reshape(groups, -1)[:, 0].repeat(o // groups) if per_channel_act else s_a
    acc_scale = np.float64(s_a_out) * s_w.astype(np.float64)
    if quantized:
        expected = requantize_acc(acc, acc_scale, s_o, z_o, 1, bias=bias / acc_scale)
    else:
        expected = dequantize_acc(acc, acc_scale, 1)
    return mod, x, expected


@pytest.mark.parametrize("groups,per_channel_act,padding,strides", [
    (1, False, (1, 1, 1, 1), (2, 2)),   # normal conv, per-tensor asymmetric input
    (8, True, (1, 1, 1, 1), (1, 1)),    # depthwise, channel-wise input scales and zero points
    (2, True, (0, 1, 2, 0), (1, 2)),    # grouped, group-wise scales, uneven padding
])
def test_conv2d_requantized_is_bit_exact(groups, per_channel_act, padding, strides):
    mod, x, expected = conv_case(groups, True, per_channel_act, padding, strides)
    got = run(integerized(mod), x)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, expected)
    float_qdq = run(mod, x).astype(np.int32)  # the float graph it replaces: within one step
    assert np.abs(float_qdq - got).max() <= 1


def test_depthwise_conv2d_float_output_is_bit_exact():
    mod, x, expected = conv_case(8, False, True)
    np.testing.assert_array_equal(run(integerized(mod), x), expected)


def test_integer_kernels_fuse_with_relax_ops():
    """The kernels use int64 dims like TVM's own legalized ops, so FuseOps / FuseTIR (which MetaSchedule's
    task extraction runs) can fuse them with the conv2d and the zero-point add around them."""
    mod, x, expected = conv_case(2, True, True)
    fused = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                      relax.transform.FuseOps(), relax.transform.FuseTIR()])(integerized(mod))
    main = fused["main"].script()
    assert main.count("R.call_tir(") == 2 and re.search(r"fused_conv2d_add\d*_hyq_requantize", main)  # pad; conv + requantize
    np.testing.assert_array_equal(run(fused, x), expected)


# -- matmul ---------------------------------------------------------------------------------------

def test_linear_requantized_is_bit_exact():
    """matmul(dequantize(x), permute_dims(dequantize(W, axis=0))) + bias -> quantize: torch's linear."""
    t, k, n = 5, 16, 12
    x, w_q = int8((1, t, k)), int8((n, k))
    s_a, z_a = np.float32(0.03), RNG.integers(-30, 30, k).astype(np.int8)  # channel-wise zero points
    s_w, bias = scales(n), RNG.normal(0, 0.2, n).astype(np.float32)
    s_o, z_o = np.float32(0.15), np.int8(4)

    def body(bb, xv):
        xd = bb.emit(dq(xv, s_a, z_a, axis=-1))
        wd = bb.emit(dq(const(w_q, "int8"), s_w, np.zeros(n, np.int8), axis=0))
        y = bb.emit(relax.op.matmul(xd, bb.emit(relax.op.permute_dims(wd))))
        y = bb.emit(relax.op.add(y, const(bias, "float32")))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"))

    mod = module({"x": ((1, t, k), "int8")}, body)
    acc_scale = np.float64(s_a) * s_w.astype(np.float64)
    expected = requantize_acc(qmatmul(x, z_a, w_q.T, 0), acc_scale, s_o, z_o, -1, bias=bias / acc_scale)
    np.testing.assert_array_equal(run(integerized(mod), x), expected)


def test_transposed_weight_float_output_is_bit_exact():
    """matmul(dequantize(x), dequantize(W^T, axis=1)) feeding a float island (GELU here)."""
    t, k, n = 4, 8, 6
    x, w_t = int8((t, k)), int8((k, n))
    s_a, z_a, s_w = np.float32(0.02), np.int8(-3), scales(n)

    def matmul(bb, xv):
        w = bb.emit(dq(const(w_t, "int8"), s_w, np.zeros(n, np.int8), axis=1))
        return relax.op.matmul(bb.emit(dq(xv, s_a, z_a)), w)

    expected = dequantize_acc(qmatmul(x, z_a, w_t, 0), np.float64(s_a) * s_w.astype(np.float64), -1)
    np.testing.assert_array_equal(run(integerized(module({"x": ((t, k), "int8")}, matmul)), x), expected)
    with_gelu = module({"x": ((t, k), "int8")}, lambda bb, xv: relax.op.nn.gelu(bb.emit(matmul(bb, xv))))
    assert run(integerized(with_gelu), x).shape == (t, n)


@pytest.mark.parametrize("transposed,quantized", [(True, True), (False, False)])
def test_attention_matmuls_are_bit_exact(transposed, quantized):
    """q @ k^T (k transposed after dequantize, requantized) and attn @ v (float out), asymmetric operands."""
    h, t, d = 2, 6, 8
    a, b = int8((1, h, t, d)), int8((1, h, t, d) if transposed else (1, h, d, t))
    (s_a, z_a), (s_b, z_b) = (np.float32(0.04), np.int8(7)), (np.float32(0.05), np.int8(-11))
    s_o, z_o = np.float32(0.9), np.int8(-2)

    def body(bb, av, bv):
        bd = bb.emit(dq(bv, s_b, z_b))
        bd = bb.emit(relax.op.permute_dims(bd, [0, 1, 3, 2])) if transposed else bd
        y = bb.emit(relax.op.matmul(bb.emit(dq(av, s_a, z_a)), bd))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8")) if quantized else y

    mod = module({"a": (a.shape, "int8"), "b": (b.shape, "int8")}, body)
    acc = qmatmul(a, z_a, np.swapaxes(b, -1, -2) if transposed else b, z_b)
    acc_scale = np.float64(s_a) * np.float64(s_b)
    expected = requantize_acc(acc, acc_scale, s_o, z_o, -1) if quantized else dequantize_acc(acc, acc_scale, -1)
    np.testing.assert_array_equal(run(integerized(mod), a, b), expected)


# -- ReLU / clip ----------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["relu", "clip"])
def test_relu_and_clip_after_a_layer_are_integer_clamps(act):
    """quantize(relu / clip(linear(x))) -> requantize, then max / min on int8: equal to the float QDQ graph
    up to its rounding (one step), and the clamp really bites (many outputs at the bounds)."""
    t, k, n = 6, 16, 10
    x, w_q = int8((1, t, k)), int8((n, k))
    s_a, s_w, s_o, z_o = np.float32(0.03), scales(n), np.float32(0.02), np.int8(-100)

    def body(bb, xv):
        y = bb.emit(relax.op.matmul(bb.emit(dq(xv, s_a, 0)), bb.emit(relax.op.permute_dims(
            bb.emit(dq(const(w_q, "int8"), s_w, np.zeros(n, np.int8), axis=0))))))
        y = bb.emit(relax.op.nn.relu(y) if act == "relu" else relax.op.clip(y, -0.5, 1.5))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"))

    mod = module({"x": ((1, t, k), "int8")}, body)
    got = assert_layers_bitexact(mod, x, ["matmul"])
    low, high = (-100, 127) if act == "relu" else (-125, -25)
    assert got.min() == low and got.max() == high
    assert np.mean((got == low) | (got == high)) > 0.2
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1


# -- what cannot be integerized, shared results ---------------------------------------------------

def test_unsupported_quantization_names_the_op():
    x_shape, w_q = (1, 4, 5, 5), int8((4, 4, 1, 1))

    def body(bb, xv):  # channel-wise input scales on a dense conv cannot leave the sum
        xd = bb.emit(dq(xv, scales(4), np.zeros(4, np.int8), axis=1))
        return relax.op.nn.conv2d(xd, bb.emit(dq(const(w_q, "int8"), scales(4), np.zeros(4, np.int8), axis=0)))

    with pytest.raises(HyqError, match=r"relax.nn.conv2d '\w+' in @main: the input scale varies"):
        integerize(module({"x": (x_shape, "int8")}, body))

    def float_conv(bb, xv):
        return relax.op.nn.conv2d(relax.op.astype(xv, "float32"), const(w_q, "float32"))

    with pytest.raises(HyqError, match=r"relax.nn.conv2d '\w+' in @main still computes in float32"):
        integerize(module({"x": (x_shape, "int8")}, float_conv))


def test_a_requantization_that_could_overflow_int64_is_refused():
    """An output scale 2^20 times finer than the accumulator's: 16 int8 products of up to 128 * 127 reach 2^18,
    times 2^20 (q = 2^30 << 21) that is 2^69."""
    k, n = 16, 4
    w_q = np.full((n, k), 127, np.int8)

    def body(bb, xv):
        y = bb.emit(relax.op.matmul(bb.emit(dq(xv, 1.0, 0)), bb.emit(relax.op.permute_dims(
            bb.emit(dq(const(w_q, "int8"), np.float32(1.0), np.int8(0)))))))
        return relax.op.quantize(y, const(2.0 ** -20, "float32"), const(0, "int8"))

    with pytest.raises(HyqError, match=r"relax.matmul '\w+' in @main: the requantization overflows int64 in 4 of 4"
                                       r" channel\(s\); in channel 0 accumulators up to 260096 times the multiplier"
                                       r" 1.049e\+06 reach 2\^69.0"):
        integerize(module({"x": ((2, k), "int8")}, body))


def test_an_int32_accumulator_that_could_overflow_is_refused():
    """Two int8 activations with 2^17 products of up to 128 * 128 each: the int32 accumulator could reach 2^31."""
    k = 2 ** 17

    def body(bb, a, b):
        return relax.op.matmul(bb.emit(dq(a, 0.1, 0)), bb.emit(dq(b, 0.1, 0)))

    with pytest.raises(HyqError, match=r"relax.matmul '\w+' in @main: the int32 accumulator can reach 2147483648"):
        integerize(module({"a": ((1, k), "int8"), "b": ((k, 1), "int8")}, body))


def test_two_consumers_with_equal_quantizers_share_one_requantization():
    """A conv2d requantized alike for two consumers (equal plan quantizers): the rewrite keeps one integer
    layer, and both consumers read its result; every layer stays bit-exact."""
    x, w_q = int8((1, 4, 5, 5)), int8((6, 4, 1, 1))
    w1, w2 = int8((3, 6, 1, 1)), int8((3, 6, 1, 1))
    s_a, z_a, s_w, s_o, z_o = np.float32(0.02), np.int8(3), scales(6), np.float32(0.3), np.int8(-1)

    def body(bb, xv):
        wd = bb.emit(dq(const(w_q, "int8"), s_w, np.zeros(6, np.int8), axis=0))
        y = bb.emit(relax.op.nn.conv2d(bb.emit(dq(xv, s_a, z_a, axis=1)), wd))
        outs = []
        for w in (w1, w2):
            q = bb.emit(relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1))
            wd2 = bb.emit(dq(const(w, "int8"), scales(3), np.zeros(3, np.int8), axis=0))
            outs.append(bb.emit(relax.op.nn.conv2d(bb.emit(dq(q, s_o, z_o, axis=1)), wd2)))
        return relax.op.add(*outs)

    out, layers = integerize_layers(module({"x": ((1, 4, 5, 5), "int8")}, body))
    assert [layer.out_scale is not None for layer in layers] == [True, False, False]
    assert layers[1].inputs == layers[2].inputs == (layers[0].result,)
    checks = verify(out, layers, x, TARGET)
    assert len(checks) == 3 and all(c.exact for c in checks)
