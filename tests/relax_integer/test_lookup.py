"""The lookup rule: elementwise functions of int8 tensors -> 256-entry tables."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.relax.integer import integerize
from hyq_tvm.relax.integer.lookup import ELEMENTWISE, lookup_primfunc, lookup_table

from .qdq import RNG, assert_layers_bitexact, const, dq, int8, module, run, scales


def test_quantized_sigmoid_becomes_one_table_lookup():
    def before(bb, x):
        y = bb.emit(relax.op.sigmoid(bb.emit(dq(x, 0.05, 2))))
        return relax.op.quantize(y, const(1 / 256, "float32"), const(-128, "int8"))

    table = lookup_table(lambda v: ELEMENTWISE["relax.sigmoid"](v, None), np.float64(np.float32(0.05)), 2, np.float64(np.float32(1 / 256)), -128, 1)

    def expected(bb, x, kernels):
        return relax.call_tir(kernels["hyq_lookup0"], [x, const(table, "int8")], relax.TensorType((2, 3), "int8"))

    inputs = {"x": ((2, 3), "int8")}
    kernel = lookup_primfunc((2, 3), 1, 1)
    tvm.ir.assert_structural_equal(integerize(module(inputs, before)), module(inputs, expected, {"hyq_lookup0": kernel}))


@pytest.mark.parametrize("op,per_channel", [("gelu", False), ("silu", True), ("sigmoid", False), ("relu6", True),
                                            ("clip", False), ("leakyrelu", False)])
def test_elementwise_function_of_int8_becomes_a_table_lookup(op, per_channel):
    """quantize(f(dequantize(x))) -> one 256-entry table (per channel with channel-wise parameters): bit-exact
    with numpy, within one step of the float QDQ graph, and no float op left."""
    shape = (2, 6, 4, 4)
    x = int8(shape)
    s_in, z_in = (scales(6, 0.02, 0.06), RNG.integers(-5, 5, 6).astype(np.int8)) if per_channel else \
        (np.float32(0.04), np.int8(3))
    s_o, z_o = (scales(6, 0.01, 0.03), RNG.integers(-5, 5, 6).astype(np.int8)) if per_channel else \
        (np.float32(0.02), np.int8(-60))
    funcs = {"gelu": relax.op.nn.gelu, "silu": relax.op.nn.silu, "sigmoid": relax.op.sigmoid,
             "relu6": relax.op.nn.relu6, "clip": lambda v: relax.op.clip(v, -1.0, 2.5),
             "leakyrelu": lambda v: relax.op.nn.leakyrelu(v, 0.1)}

    def body(bb, xv):
        y = bb.emit(funcs[op](bb.emit(dq(xv, s_in, z_in, axis=1))))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"x": (shape, "int8")}, body)
    got = assert_layers_bitexact(mod, x, ["lookup"])
    assert "R.dequantize" not in integerize(mod)["main"].script()
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1
