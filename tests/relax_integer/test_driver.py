"""The driver: RULES applied in order, as a function and as a TVM pass, and the layers it records."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from hyq_tvm.relax.integer import RULES, integerize, integerize_layers, integerize_pass

from .qdq import const, dq, int8, module, run


def residual_block(bb, x):
    """conv2d (requantized) -> GELU (lookup) -> add of the input (rescale)."""
    w = np.ones((2, 2, 1, 1), np.int8)
    y = bb.emit(relax.op.nn.conv2d(bb.emit(dq(x, 0.1, 0, axis=1)), bb.emit(dq(const(w, "int8"), 0.01, 0, axis=0))))
    y = bb.emit(relax.op.quantize(y, const(0.05, "float32"), const(0, "int8")))
    y = bb.emit(relax.op.nn.gelu(bb.emit(dq(y, 0.05, 0))))
    y = bb.emit(relax.op.quantize(y, const(0.05, "float32"), const(0, "int8")))
    s = bb.emit(relax.op.add(bb.emit(dq(y, 0.05, 0)), bb.emit(dq(x, 0.1, 0))))
    return relax.op.quantize(s, const(0.1, "float32"), const(0, "int8"))


def test_rules_apply_in_their_order():
    assert [rule.name for rule in RULES] == ["gemm", "gemm_float", "softmax", "rescale", "affine", "norm", "lookup", "resize", "pool", "product"]


def test_integerize_pass_is_integerize_in_a_sequential():
    mod = module({"x": ((1, 2, 3, 3), "int8")}, residual_block)
    layers = []
    passes = tvm.transform.Sequential([integerize_pass(layers)])
    assert integerize_pass().info.name == "hyq.Integerize"
    tvm.ir.assert_structural_equal(passes(mod), integerize(mod))
    assert [layer.op for layer in layers] == ["conv2d", "lookup", "add"]


def test_every_layer_carries_its_rule_and_reference():
    mod = module({"x": ((1, 2, 3, 3), "int8")}, residual_block)
    out, layers = integerize_layers(mod)
    assert [layer.rule.name for layer in layers] == ["gemm", "lookup", "rescale"]
    x = int8((1, 2, 3, 3))
    values = {out["main"].params[0]: x}
    for layer in layers:  # each layer's reference on the previous one's result: the whole graph in numpy
        values[layer.result] = layer.reference(values)
    np.testing.assert_array_equal(values[layers[-1].result], run(out, x))
