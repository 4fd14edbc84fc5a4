"""The product rule: products of two int8 activations -> int32 (a - z_a) * (b - z_b), requantized."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.relax.integer import integerize, integerize_layers
from hyq_tvm.relax.integer.operand import consts
from hyq_tvm.relax.integer.product import PRODUCT, product_primfunc
from hyq_tvm.relax.integer.requantize import requant_params
from hyq_tvm.relax.integer.rule import Lowering

from .qdq import RNG, assert_layers_bitexact, const, dq, int8, module, run, scales


def test_quantized_product_becomes_one_product_call():
    def before(bb, a, b):
        y = bb.emit(relax.op.multiply(bb.emit(dq(a, 0.5, 3)), bb.emit(dq(b, 0.25, -2))))
        return relax.op.quantize(y, const(0.375, "float32"), const(1, "int8"))

    # M = 0.5 * 0.25 / 0.375; products up to max(127 - 3, 3 + 128) * max(127 + 2, 128 - 2)
    params = requant_params(np.float64(0.5 * 0.25), np.float64(0.375), np.int64(1), None, np.int64(131 * 129), "test")

    def expected(bb, a, b, kernels):
        zs = [np.array([3], np.int32), np.array([-2], np.int32)]
        return relax.call_tir(kernels["hyq_product0"], [a, b, *consts([*zs, *params])],
                              relax.TensorType((2, 3), "int8"))

    inputs = {"a": ((2, 3), "int8"), "b": ((2, 3), "int8")}
    kernel = product_primfunc((2, 3), (2, 3), (2, 3), 1, 1, False)
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)),
                                   module(inputs, expected, {"hyq_product0": kernel}))


def _row(v):
    """x[:, :, :1, ::-1]: a (1, C, 1, N) operand broadcast against x."""
    return relax.op.flip(relax.op.strided_slice(v, axes=[2], begin=[0], end=[1]), axis=3)


def _vector(v):
    """x[0, 0, 0, ::-1]: an (N,) operand of lower rank."""
    return relax.op.flip(relax.op.reshape(relax.op.strided_slice(v, axes=[1, 2], begin=[0, 0], end=[1, 1]), (5,)), 0)


# name: (the second operand from x, the channel axis of the scales or None (per tensor))
CASES = {
    "broadcast_row_per_channel": (_row, 1),
    "broadcast_row_per_tensor": (_row, None),
    "lower_rank_per_channel": (_vector, 1),
    "same_shape": (lambda v: relax.op.flip(v, axis=2), None),
    "square": (None, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_product_of_int8_activations_becomes_a_requantized_int32_product(case):
    """quantize(dequantize(a) * dequantize(b)) with numpy broadcasting: bit-exact with the reference, within one step
    of the float QDQ graph, the float multiply gone; per-channel scales along the shared channel axis."""
    other, axis = CASES[case]
    shape = (1, 4, 3, 5)
    x = int8(shape)
    if axis is None:
        s_a, z_a, s_b, z_b = np.float32(0.03), np.int8(5), np.float32(0.02), np.int8(-9)
        s_o, z_o, axis = np.float32(0.03 * 0.02 * 120), np.int8(-3), -1
    else:
        s_a, z_a = scales(4, 0.01, 0.04), RNG.integers(-20, 20, 4).astype(np.int8)
        s_b, z_b = np.float32(0.02), np.int8(-9)
        s_o = (s_a * s_b * RNG.uniform(100, 140, 4)).astype(np.float32)
        z_o = RNG.integers(-5, 5, 4).astype(np.int8)

    def body(bb, xv):
        a = bb.emit(dq(xv, s_a, z_a, axis=axis))
        b = a if other is None else bb.emit(dq(bb.emit(other(xv)), s_b, z_b, axis=0))
        y = bb.emit(relax.op.multiply(b, a) if other is _vector else relax.op.multiply(a, b))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=axis)

    mod = module({"x": (shape, "int8")}, body)
    got = assert_layers_bitexact(mod, x, ["product"])
    assert "R.multiply" not in integerize(mod)["main"].script()
    assert len(np.unique(got)) > 20
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1


def test_a_product_with_a_constant_operand_is_left_to_other_rules():
    def body(bb, xv):
        w = bb.emit(dq(const(RNG.integers(-127, 128, (1, 5)), "int8"), 0.01, 0))
        y = bb.emit(relax.op.multiply(bb.emit(dq(xv, 0.02, 3)), w))
        return relax.op.quantize(y, const(0.01, "float32"), const(0, "int8"))

    main = module({"x": ((2, 5), "int8")}, body)["main"]
    tvm.ir.assert_structural_equal(PRODUCT.apply(Lowering(tvm.IRModule({})), "main", main), main)


def test_scales_along_two_axes_stay_float():
    def body(bb, xv):
        a = bb.emit(dq(xv, scales(4), np.zeros(4, np.int8), axis=1))
        b = bb.emit(dq(xv, scales(5), np.zeros(5, np.int8), axis=3))
        return relax.op.quantize(bb.emit(relax.op.multiply(a, b)), const(0.01, "float32"), const(0, "int8"))

    out, layers = integerize_layers(module({"x": ((1, 4, 3, 5), "int8")}, body))
    assert layers == [] and "R.multiply" in out["main"].script()
