"""The rescale rules: residual adds, subtractions and concatenations of int8 tensors, requantizations and constant
affine chains, rescaled in one int64 sum."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.errors import HyqError
from hyq_tvm.relax.integer import integerize, integerize_layers
from hyq_tvm.relax.integer.operand import consts
from hyq_tvm.relax.integer.rescale import (
    rescale_primfunc,
    rescaled_concat,
    rescaled_difference,
    rescaled_sum,
)
from hyq_tvm.relax.requant import rescale_params

from .qdq import RNG, assert_layers_bitexact, const, dq, grid, int8, module, run, scales


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


@pytest.mark.parametrize("op,twin", [("add", rescaled_sum), ("subtract", rescaled_difference)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_residual_add_and_subtract_become_the_rescale_kernel(per_channel, op, twin):
    """quantize(dequantize(a) +- dequantize(b)): one rescaled int64 sum (b's multiplier negated for a difference),
    rounded once; the float op is gone. b is a flipped a (one graph input, so that verify.py checks the layer from
    its own inputs)."""
    shape = (1, 6, 5, 5)
    a = int8(shape)
    (s_a, z_a), (s_o, z_o) = grid(per_channel, 6), grid(per_channel, 6, 0.03, 0.08, 5)
    s_b, z_b = np.float32(0.011), np.int8(-20)

    def body(bb, av):
        bv = bb.emit(relax.op.flip(av, axis=3))
        y = bb.emit(getattr(relax.op, op)(bb.emit(dq(av, s_a, z_a, axis=1)), bb.emit(dq(bv, s_b, z_b, axis=1))))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"a": (shape, "int8")}, body)
    got = assert_layers_bitexact(mod, a, [op])
    assert f"R.{op}" not in integerize(mod)["main"].script()
    np.testing.assert_array_equal(got, twin([a, a[..., ::-1]], [z_a, z_b], [s_a, s_b], s_o, z_o, 1))
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


def test_quantized_subtract_becomes_one_rescale_call_with_the_second_multiplier_negated():
    def before(bb, a, b):
        y = bb.emit(relax.op.subtract(bb.emit(dq(a, 0.5, 3)), bb.emit(dq(b, 0.25, -2))))
        return relax.op.quantize(y, const(0.375, "float32"), const(1, "int8"))

    z, k, *rest = params_of([0.5, 0.25], [3, -2], 0.375, 1)
    k = k * np.array([[1], [-1]], np.int64)

    def expected(bb, a, b, kernels):
        return relax.call_tir(kernels["hyq_rescale0"], [a, b, *consts([z, k, *rest])],
                              relax.TensorType((2, 3), "int8"))

    inputs = {"a": ((2, 3), "int8"), "b": ((2, 3), "int8")}
    kernel = rescale_primfunc((2, 3), 1, 1, 2)
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)), module(inputs, expected, {"hyq_rescale0": kernel}))


def test_requantization_becomes_a_one_input_rescale_call():
    def before(bb, x):
        return relax.op.quantize(bb.emit(dq(x, 0.5, 3)), const(0.375, "float32"), const(1, "int8"))

    def expected(bb, x, kernels):
        return relax.call_tir(kernels["hyq_rescale0"], [x, *consts(params_of([0.5], [3], 0.375, 1))],
                              relax.TensorType((2, 3), "int8"))

    inputs = {"x": ((2, 3), "int8")}
    kernel = rescale_primfunc((2, 3), 1, 1, 1)
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)), module(inputs, expected, {"hyq_rescale0": kernel}))


def test_a_constant_chain_folds_into_one_rescale_call():
    """(0.5 (x - 3) * 0.125 + 0.75) / 0.25: M = 1/4 (q = 2^30, shift -1: R = 32), B = 3 output steps."""
    def before(bb, x):
        y = bb.emit(relax.op.multiply(bb.emit(dq(x, 0.5, 3)), const(0.125, "float32")))
        y = bb.emit(relax.op.add(y, const(0.75, "float32")))
        return relax.op.quantize(y, const(0.25, "float32"), const(1, "int8"))

    params = [np.array([[3]], np.int32), np.array([[2 ** 30]], np.int64),
              np.array([2 ** 31 + 3 * 2 ** 32], np.int64), np.array([32], np.int32), np.array([1], np.int32)]

    def expected(bb, x, kernels):
        return relax.call_tir(kernels["hyq_rescale0"], [x, *consts(params)], relax.TensorType((2, 3), "int8"))

    inputs = {"x": ((2, 3), "int8")}
    kernel = rescale_primfunc((2, 3), 1, 1, 1)
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)), module(inputs, expected, {"hyq_rescale0": kernel}))


@pytest.mark.parametrize("per_channel_in,per_channel_out", [(False, False), (True, False), (False, True), (True, True)])
def test_requantization_becomes_the_one_input_rescale(per_channel_in, per_channel_out):
    """quantize(dequantize(x)) onto another grid, per tensor or per channel (axis 1) on either side."""
    x = int8((2, 5, 4))
    (s_x, z_x), (s_o, z_o) = grid(per_channel_in, 5), grid(per_channel_out, 5)

    def body(bb, xv):
        y = bb.emit(dq(xv, s_x, z_x, axis=1))
        return relax.op.quantize(y, const(s_o * 1.7, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"x": (x.shape, "int8")}, body)
    got = assert_layers_bitexact(mod, x, ["requantize"])
    assert "R.dequantize" not in integerize(mod)["main"].script()
    np.testing.assert_array_equal(got, rescaled_sum([x], [z_x], [s_x], s_o * 1.7, z_o, 1))
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1


def chain_module(shape, s_x, z_x, steps, out_per_channel: bool, z_o) -> tuple[tvm.IRModule, np.ndarray]:
    """quantize(steps(dequantize(x))) (each step (op, constant, constant on the left); the grids along axis 1) with an
    output scale spreading the float result of a random x over about +-100 steps; and that x."""
    x = int8(shape)
    v = (x.astype(np.float64) - np.asarray(z_x, np.float64).reshape(-1, 1, 1)) * np.asarray(s_x).reshape(-1, 1, 1)
    for op, c, left in steps:
        v = getattr(np, op)(*((c, v) if left else (v, c)))
    top = np.abs(v).max(axis=(0, 2, 3)) if out_per_channel else np.abs(v).max()
    s_o = (np.maximum(top, 1e-3) / 100).astype(np.float32)

    def body(bb, xv):
        y = bb.emit(dq(xv, s_x, z_x, axis=1))
        for op, c, left in steps:
            c = const(np.asarray(c, np.float32), "float32")
            y = bb.emit(getattr(relax.op, op)(*((c, y) if left else (y, c))))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    return module({"x": (shape, "int8")}, body), x


SHAPE = (2, 3, 4, 4)
CHAINS = {  # constant steps on a dequantized (2, 3, 4, 4) tensor: a function of RNG for each
    "scale": lambda: [("multiply", 0.125, False)],
    "halve": lambda: [("divide", 2.0, False)],
    "gamma_beta": lambda: [("multiply", RNG.normal(0, 1, (3, 1, 1)), False),
                           ("add", RNG.normal(0, 1, (3, 1, 1)), False)],
    "bias_tensor": lambda: [("add", RNG.normal(0, 1, (3, 4, 4)), False)],
    "left": lambda: [("add", 0.5, True), ("subtract", RNG.normal(0, 1, (3, 1, 1)), True)],
    "six": lambda: [("multiply", 1.5, False), ("add", RNG.normal(0, 1, (3, 1, 1)), False),
                    ("subtract", RNG.normal(0, 1, (4, 4)), False), ("divide", RNG.uniform(0.5, 2, (3, 1, 1)), False),
                    ("multiply", -0.7, True), ("add", RNG.normal(0, 1, (1, 3, 4, 4)), False)],
    "zero": lambda: [("multiply", np.array([1.2, 0.0, -0.4]).reshape(3, 1, 1), False), ("add", 0.3, False)],
}


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("name", list(CHAINS))
def test_constant_chains_become_the_one_input_rescale(name, per_channel):
    """Adds, subtracts, multiplies and divides by constants (scalars, per channel, tensors broadcasting to the input;
    either side; multipliers negative or zero) on a dequantized tensor: folded into one rescale, bit-exact."""
    (s_x, z_x), (_, z_o) = grid(per_channel, 3), grid(per_channel, 3)
    mod, x = chain_module(SHAPE, s_x, z_x, CHAINS[name](), per_channel, z_o)
    got = assert_layers_bitexact(mod, x, ["affine"])
    script = integerize(mod)["main"].script()
    assert not any(f"R.{op}" in script for op in ("add", "subtract", "multiply", "divide", "dequantize"))
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1
    assert len(np.unique(got)) >= 10


def test_a_tensor_bias_becomes_a_full_offset_input_of_the_kernel():
    """quantize(dequantize(x) + bias[H, N, N]) of a (B, H, N, N) tensor: the offset is one int64 per (h, i, j)."""
    mod, x = chain_module(SHAPE, np.float32(0.02), np.int8(1), CHAINS["bias_tensor"](), False, np.int8(0))
    call = integerize(mod)["main"].body.blocks[0].bindings[0].value
    assert call.args[1].fields[3].value.numpy().shape == (1, 3, 4, 4)  # z, k, c, rs, zp
    assert_layers_bitexact(mod, x, ["affine"])


def test_the_batch_norm_of_decompose_ops_for_inference_is_one_affine_rescale():
    """batch_norm as DecomposeOpsForInference + FoldConstant leave it: (v - mean) / sqrt(var + eps) * gamma + beta."""
    x = int8(SHAPE)
    s_x, z_x = scales(3, 0.01, 0.05), RNG.integers(-10, 10, 3).astype(np.int8)
    mean, var = RNG.normal(0, 0.5, 3), RNG.uniform(0.2, 2, 3)
    gamma, beta = RNG.uniform(0.5, 2, 3), RNG.normal(0, 0.5, 3)

    def body(bb, xv):
        y = bb.emit(relax.op.nn.batch_norm(bb.emit(dq(xv, s_x, z_x, axis=1)), *(const(v, "float32") for v in (
            gamma, beta, mean, var)), axis=1, epsilon=1e-5))
        return relax.op.quantize(bb.emit(relax.TupleGetItem(y, 0)), const(0.03, "float32"), const(2, "int8"))

    mod = module({"x": (SHAPE, "int8")}, body)
    mod = relax.transform.FoldConstant()(relax.transform.DecomposeOpsForInference()(mod))
    ops = [b.value.op.name for b in mod["main"].body.blocks[0].bindings
           if isinstance(b.value, relax.Call) and b.value.op.name not in ("relax.dequantize", "relax.quantize")]
    assert ops == ["relax.subtract", "relax.divide", "relax.multiply", "relax.add"]
    got = assert_layers_bitexact(mod, x, ["affine"])
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1
    assert len(np.unique(got)) >= 10


STAY_FLOAT = {  # (steps, input grid per channel): a multiplier along two axes, along another axis than the grid's,
    "two_axes": (lambda: [("multiply", RNG.uniform(0.5, 2, (3, 4, 1)), False)], False),  # a constant divided by x
    "other_axis": (lambda: [("multiply", RNG.uniform(0.5, 2, (4, 1)), False)], True),
    "reciprocal": (lambda: [("add", 300.0, False), ("divide", 2.0, True)], False),
}


@pytest.mark.parametrize("name", list(STAY_FLOAT))
def test_chains_the_rescale_cannot_take_stay_in_float(name):
    steps, per_channel = STAY_FLOAT[name]
    s_x, z_x = grid(per_channel, 3)
    mod, _ = chain_module(SHAPE, s_x, z_x, steps(), False, np.int8(0))
    out, layers = integerize_layers(mod)
    assert layers == [] and "R.dequantize" in out["main"].script()


def test_an_offset_beyond_int64_is_refused_naming_the_op():
    """x + 1e30 on a grid of 1e28: the multiplier 2e-30 needs the right shift 62, the offset of 100 steps 2^68."""
    mod, _ = chain_module(SHAPE, np.float32(0.02), np.int8(0), [("add", 1e30, False)], False, np.int8(0))
    with pytest.raises(HyqError, match=r"^relax.add 'lv\d*' in @main: the affine rescale reaches 2\^68.7 in int64"):
        integerize(mod)
