"""The rescale rule: residual adds and concatenations of int8 tensors, rescaled in one int64 sum."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.relax.integer import integerize
from hyq_tvm.relax.integer.operand import consts
from hyq_tvm.relax.integer.rescale import (
    rescale_primfunc,
    rescaled_concat,
    rescaled_sum,
)
from hyq_tvm.relax.requant import rescale_params

from .qdq import RNG, assert_layers_bitexact, const, dq, int8, module, run, scales


def params_of(in_scales, zero_points, s_o, z_o) -> list[np.ndarray]:
    """The per-tensor arrays z, k, c, rs, zp of the rescale kernel."""
    k, c, rs = rescale_params([np.float64(s) for s in in_scales], np.float64(s_o))
    return [np.array(zero_points, np.int32).reshape(-1, 1), np.array(k, np.int64).reshape(-1, 1),
            *(np.asarray(v, dtype).reshape(1) for v, dtype in ((c, np.int64), (rs, np.int32), (z_o, np.int32)))]


def test_quantized_add_becomes_one_rescale_call():
    def before(bb, a, b):
        y = bb.emit(relax.op.add(bb.emit(dq(a, 0.5, 3)), bb.emit(dq(b, 0.25, -2))))
        return relax.op.quantize(y, const(0.375, "float32"), const(1, "int8"))

    params = params_of([0.5, 0.25], [3, -2], 0.375, 1)

    def expected(bb, a, b, kernels):
        return relax.call_tir(kernels["hyq_rescale0"], [a, b, *consts(params)], relax.TensorType((2, 3), "int8"))

    inputs = {"a": ((2, 3), "int8"), "b": ((2, 3), "int8")}
    kernel = rescale_primfunc((2, 3), 1, 1, 2)
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)), module(inputs, expected, {"hyq_rescale0": kernel}))


def test_quantized_concat_rescales_each_input_then_concatenates_int8():
    def before(bb, a, b):
        y = bb.emit(relax.op.concat([bb.emit(dq(a, 0.5, 3)), bb.emit(dq(b, 0.25, -2))], axis=1))
        return relax.op.quantize(y, const(0.375, "float32"), const(1, "int8"))

    def expected(bb, a, b, kernels):
        ya = bb.emit(relax.call_tir(kernels["hyq_rescale0"], [a, *consts(params_of([0.5], [3], 0.375, 1))],
                                    relax.TensorType((2, 3), "int8")))
        yb = bb.emit(relax.call_tir(kernels["hyq_rescale1"], [b, *consts(params_of([0.25], [-2], 0.375, 1))],
                                    relax.TensorType((2, 4), "int8")))
        return relax.op.concat([ya, yb], axis=1)

    inputs = {"a": ((2, 3), "int8"), "b": ((2, 4), "int8")}
    kernels = {"hyq_rescale0": rescale_primfunc((2, 3), 1, 1, 1), "hyq_rescale1": rescale_primfunc((2, 4), 1, 1, 1)}
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)), module(inputs, expected, kernels))


@pytest.mark.parametrize("per_channel", [False, True])
def test_residual_add_becomes_the_rescale_kernel(per_channel):
    """quantize(dequantize(a) + dequantize(b)): one rescaled int64 sum, rounded once; the float add is gone.
    b is a flipped a (one graph input, so that verify.py checks the layer from its own inputs)."""
    shape = (1, 6, 5, 5)
    a = int8(shape)
    if per_channel:
        s_a, z_a = scales(6, 0.01, 0.05), RNG.integers(-10, 10, 6).astype(np.int8)
        s_o, z_o = scales(6, 0.03, 0.08), RNG.integers(-5, 5, 6).astype(np.int8)
    else:
        s_a, z_a, s_o, z_o = np.float32(0.03), np.int8(7), np.float32(0.05), np.int8(-3)
    s_b, z_b = np.float32(0.011), np.int8(-20)

    def body(bb, av):
        bv = bb.emit(relax.op.flip(av, axis=3))
        y = bb.emit(relax.op.add(bb.emit(dq(av, s_a, z_a, axis=1)), bb.emit(dq(bv, s_b, z_b, axis=1))))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"a": (shape, "int8")}, body)
    got = assert_layers_bitexact(mod, a, ["add"])
    assert "R.add" not in integerize(mod)["main"].script()
    np.testing.assert_array_equal(got, rescaled_sum([a, a[..., ::-1]], [z_a, z_b], [s_a, s_b], s_o, z_o, 1))
    assert np.abs(run(mod, a).astype(np.int32) - got).max() <= 1


@pytest.mark.parametrize("out_per_channel", [False, True])
def test_concat_rescales_each_input_to_the_output_grid(out_per_channel):
    """quantize(concat([dequantize(a), dequantize(b)], axis=1)): each input rescaled, int8 concatenated;
    per-channel output parameters along the concatenated axis are split between the inputs (b: a's first
    three channels, flipped)."""
    a = int8((1, 5, 4, 4))
    s_a, z_a = scales(5, 0.01, 0.04), RNG.integers(-9, 9, 5).astype(np.int8)
    s_b, z_b = np.float32(0.02), np.int8(1)
    s_o, z_o = ((scales(8, 0.02, 0.05), RNG.integers(-4, 4, 8).astype(np.int8)) if out_per_channel
                else (np.float32(0.03), np.int8(2)))

    def body(bb, av):
        bv = bb.emit(relax.op.flip(bb.emit(relax.op.strided_slice(av, axes=[1], begin=[0], end=[3])), axis=2))
        y = bb.emit(relax.op.concat([bb.emit(dq(av, s_a, z_a, axis=1)), bb.emit(dq(bv, s_b, z_b, axis=1))], axis=1))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"a": (a.shape, "int8")}, body)
    got = assert_layers_bitexact(mod, a, ["concat"])
    assert "R.dequantize" not in integerize(mod)["main"].script()
    b = a[:, :3, ::-1]
    np.testing.assert_array_equal(got, rescaled_concat([a, b], [z_a, z_b], [s_a, s_b], s_o, z_o, 1, 1))
    assert np.abs(run(mod, a).astype(np.int32) - got).max() <= 1
