"""The softmax rule: quantize(softmax(dequantize(x))) over the last axis -> the integer softmax kernel."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.relax.integer import integerize, integerize_layers
from hyq_tvm.relax.integer.operand import consts
from hyq_tvm.relax.integer.requantize import requant_params, requantize_acc
from hyq_tvm.relax.integer.softmax import (
    PROB_BITS,
    softmax_primfunc,
    softmax_probs,
    softmax_table,
)

from .qdq import RNG, const, dq, heavy_ops, int8, module, run


def test_quantized_softmax_becomes_one_kernel_call():
    s_in, s_o = np.float32(0.1), np.float32(1 / 256)

    def before(bb, x):
        y = bb.emit(relax.op.nn.softmax(bb.emit(dq(x, s_in, 0)), axis=-1))
        return relax.op.quantize(y, const(s_o, "float32"), const(-128, "int8"))

    params = requant_params(np.float64(2.0 ** -PROB_BITS), np.float64(s_o), np.int64(-128), None,
                                np.int64(1 << PROB_BITS), "softmax")

    def expected(bb, x, kernels):
        args = [x, *consts([softmax_table(float(s_in)), *params])]
        return relax.call_tir(kernels["hyq_softmax0"], args, relax.TensorType((2, 5), "int8"))

    inputs = {"x": ((2, 5), "int8")}
    kernel = softmax_primfunc((2, 5), 1, 1, bool(np.any(params[1])))
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)),
                                   module(inputs, expected, {"hyq_softmax0": kernel}))


@pytest.mark.parametrize("bits,out_axis", [(8, None), (4, None), (8, 1)])
def test_quantized_softmax_becomes_the_integer_kernel(bits, out_axis):
    """quantize(softmax(dequantize(x))) -> table exp, Q30 probabilities, requantized: bit-exact with numpy
    and within one step of the float QDQ graph it replaces."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = RNG.integers(lo, hi + 1, (2, 3, 9), dtype=np.int8)
    s_in, z_in = np.float32(0.9 if bits == 4 else 0.07), np.int8(2)
    s_o, z_o = np.float32(1 / (hi - lo)), np.int8(lo)
    if out_axis is not None:  # per channel along another axis (the heads of an attention)
        s_o = (s_o * RNG.uniform(0.5, 1, x.shape[out_axis])).astype(np.float32)
        z_o = RNG.integers(lo, lo + 8, x.shape[out_axis]).astype(np.int8)

    def body(bb, xv):
        y = bb.emit(relax.op.nn.softmax(bb.emit(dq(xv, s_in, z_in)), axis=-1))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=-1 if out_axis is None else out_axis)

    mod = module({"x": (x.shape, "int8")}, body)
    out, layers = integerize_layers(mod)
    assert [layer.op for layer in layers] == ["softmax"]
    assert not any("softmax" in str(op) for op in heavy_ops(out))
    assert "R.nn.softmax" not in out["main"].script()
    got = run(out, x)
    probs = softmax_probs(x, softmax_table(s_in))
    expected = requantize_acc(probs, 2.0 ** -PROB_BITS, s_o, z_o, 2 if out_axis is None else out_axis)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1
    assert np.all(np.abs(probs.astype(np.int64).sum(-1) - 2 ** PROB_BITS) <= x.shape[-1])  # sums to one


def test_softmax_over_another_axis_stays_float():
    x = int8((2, 5, 4))

    def body(bb, xv):
        y = bb.emit(relax.op.nn.softmax(bb.emit(dq(xv, np.float32(0.05), np.int8(0))), axis=1))
        return relax.op.quantize(y, const(np.float32(1 / 255), "float32"), const(np.int8(-128), "int8"))

    out, layers = integerize_layers(module({"x": (x.shape, "int8")}, body))
    assert layers == [] and "R.nn.softmax" in out["main"].script()


@pytest.mark.parametrize("n", [1, 7, 256, 1000])
def test_the_probabilities_are_the_floor_quotients_without_a_division_per_element(n):
    """(e << 30) // sum(e) from one division per row: equal to numpy's floor division on rows of every kind
    (one element, all equal, one far above the rest, random) and on tables from a flat to a steep exp."""
    rows = [np.full(n, 5), np.arange(n) % 256 - 128, RNG.integers(-128, 128, n)]
    rows.append(np.where(np.arange(n) == n // 2, 127, -128))
    x = np.stack(rows).astype(np.int8)
    for s_in in (1e-4, 0.05, 3.0):
        params = requant_params(np.float64(2.0 ** -PROB_BITS), np.float64(2.0 ** -PROB_BITS), np.int64(0), None,
                                np.int64(1 << PROB_BITS), "softmax")
        func = softmax_primfunc(x.shape, 1, 1, bool(np.any(params[1])), "int32")
        table = softmax_table(s_in)
        got = run(func, x, table, *params, np.zeros(x.shape, np.int32))
        np.testing.assert_array_equal(got, softmax_probs(x, table))
