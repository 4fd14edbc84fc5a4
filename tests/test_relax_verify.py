"""The layer-by-layer bit-exact check of a compiled integer graph (hyq_tvm.relax.verify)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from hyq_tvm import data
from hyq_tvm.errors import HyqError
from hyq_tvm.quant.calibrate import calibrate
from hyq_tvm.quant.prepare import quantized_model
from hyq_tvm.quant.qdq import activation_qdq, qparams
from hyq_tvm.relax.importer import marked_var
from hyq_tvm.relax.integer import integerize_layers
from hyq_tvm.relax.pipeline import lower
from hyq_tvm.relax.verify import (
    assert_bitexact,
    check_layers,
    debug_vm,
    first_mismatch,
    run_debug,
    verify,
)
from hyq_tvm.targets import load_target

RNG = np.random.default_rng(1)
TARGET = load_target("host").tvm_target()


def const(values, dtype: str) -> relax.Expr:
    return relax.const(np.asarray(values, dtype=dtype), dtype)


def qdq(bb, x, scale, zero, name=""):
    """dequantize(clip(quantize(x))) bound to `name`: an activation entering an integer layer."""
    q = bb.emit(relax.op.quantize(x, const(scale, "float32"), const(zero, "int8")))
    return bb.emit(relax.op.dequantize(q, const(scale, "float32"), const(zero, "int8")), name_hint=name)


def weight(bb, shape, axis: int):
    w = RNG.integers(-127, 128, shape, dtype=np.int8)
    s = RNG.uniform(0.002, 0.02, shape[axis]).astype(np.float32)
    return bb.emit(relax.op.dequantize(const(w, "int8"), const(s, "float32"), const(np.zeros_like(s, np.int8), "int8"),
                                       axis=axis))


def tiny_qdq_module() -> tvm.IRModule:
    """conv2d (requantized, asymmetric input) -> GELU -> linear (requantized) -> q @ q^T (float) -> softmax."""
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            xd = qdq(bb, x, 0.02, -5, marked_var("stem", "input0"))
            y = bb.emit(relax.op.nn.conv2d(xd, weight(bb, (8, 4, 3, 3), 0), padding=(1, 1, 1, 1)))
            y = bb.emit(relax.op.add(y, const(RNG.normal(0, 0.1, (1, 8, 1, 1)), "float32")))
            y = bb.emit(relax.op.quantize(y, const(0.05, "float32"), const(3, "int8")))
            y = bb.emit(relax.op.nn.gelu(bb.emit(relax.op.dequantize(y, const(0.05, "float32"), const(3, "int8")))))
            tokens = bb.emit(relax.op.permute_dims(relax.op.reshape(y, (1, 8, 36)), [0, 2, 1]))
            td = qdq(bb, tokens, 0.03, 0, marked_var("fc", "input0"))
            z = bb.emit(relax.op.matmul(td, bb.emit(relax.op.permute_dims(weight(bb, (5, 8), 0)))))
            z = bb.emit(relax.op.quantize(z, const(0.04, "float32"), const(-2, "int8")))
            zd = bb.emit(relax.op.dequantize(z, const(0.04, "float32"), const(-2, "int8")), name_hint="attn@input0")
            att = bb.emit(relax.op.matmul(zd, bb.emit(relax.op.permute_dims(zd, [0, 2, 1]))))
            out = bb.emit_output(relax.op.nn.softmax(att))
        bb.emit_func_output(out)
    return bb.get()


@relax.expr_functor.mutator
class _CorruptMatmulWeight(relax.PyExprMutator):
    """Changes one value of every constant matmul weight."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(tvm.ir.Op.get("relax.matmul")) and isinstance(call.args[1], tvm.ir.expr.Constant):
            w = call.args[1].value.numpy().copy()
            w.flat[0] = 127 if w.flat[0] < 0 else -128
            return relax.Call(call.op, [call.args[0], relax.const(w)], call.attrs)
        return call


@pytest.fixture(scope="module")
def tiny():
    mod, layers = integerize_layers(tiny_qdq_module())
    x = RNG.normal(0, 1, (1, 4, 6, 6)).astype(np.float32)
    return mod, layers, x


def test_every_layer_of_a_tiny_graph_is_bit_exact(tiny):
    mod, layers, x = tiny
    assert [(layer.name, layer.op) for layer in layers] == [("stem", "conv2d"), ("fc", "matmul"), ("attn", "matmul")]
    assert [layer.out_scale is None for layer in layers] == [False, False, True]
    vm = debug_vm(mod, layers, TARGET)
    checks = check_layers(vm, layers, x)
    assert all(c.exact and c.mismatches == 0 and c.max_abs_diff == 0 for c in checks), checks
    assert first_mismatch(checks) is None
    assert_bitexact(checks)
    output, _ = run_debug(vm, layers, x)
    np.testing.assert_array_equal(output, vm["main"](tvm.runtime.tensor(x)).numpy())


def test_a_corrupted_weight_is_the_first_mismatch_by_name(tiny):
    mod, layers, x = tiny
    corrupted = tvm.IRModule({gv: f for gv, f in mod.functions_items()})
    corrupted["main"] = _CorruptMatmulWeight().visit_expr(mod["main"])
    checks = verify(corrupted, layers, x, TARGET)
    assert [c.exact for c in checks] == [True, False, True]  # the next layer starts from TVM's own input
    bad = first_mismatch(checks)
    assert bad.name == "fc" and bad.mismatches > 0 and bad.max_abs_diff > 0
    with pytest.raises(HyqError, match=r"^integer layer 'fc' \(matmul->int8\) is not bit-exact: \d+ value\(s\) differ"):
        assert_bitexact(checks)


def _same(values, plan_values) -> bool:
    """Whether a record's () or (C,) values are the plan's (per tensor, or per channel, maybe all equal)."""
    plan_values = np.asarray(plan_values)
    return np.shape(values) in ((), plan_values.shape) and np.array_equal(
        np.broadcast_to(values, plan_values.shape), plan_values)


def assert_records_state_the_plan(plan, layers) -> None:
    """The real numbers the independent reference derives everything from are the plan's: each layer's input scales
    and zero points are its plan layer's (conv2d / linear: unit scale, s_a folded into the weight), its weight scale
    the plan's, and each requantized output grid the input quantizer of a plan layer (its consumer). A layer is named
    by the plan layer of its (marked) input, which layers quantizing one input alike share (q / k / v convs)."""
    quantizers = [activation_qdq(entry, f"input{i}") for entry in plan.layers.values()
                  for i in range(len(entry.inputs))]
    for layer in layers:
        named = plan.layers[layer.name]
        for i, (scale, zero) in enumerate(zip(layer.real.scales, layer.zero_points)):
            qdq = activation_qdq(named, f"input{i}")
            assert _same(scale, qdq.dq_scale) and _same(zero, qdq.zero), (layer.name, i)
        if layer.weight is not None:
            alike = [e for e in plan.layers.values() if e.op == named.op and e.inputs == named.inputs]
            assert any(_same(layer.real.weight_scale, qparams(e.weight)[0]) for e in alike), layer.name
        if layer.out_scale is not None:
            assert any(_same(layer.out_scale, q.scale) and _same(layer.out_zero_point, q.zero)
                       for q in quantizers), layer.name


@pytest.mark.slow
def test_mobilevit_xxs_is_bit_exact_layer_by_layer_and_agrees_with_fake_quant():
    torch.set_num_threads(1)
    plan = calibrate("mobilevit_xxs", method="minmax", images=8, progress=False)[0]
    lowered = lower(plan)
    mod, layers = lowered.mod, lowered.layers
    integer_layers = {n for n, e in plan.layers.items() if e.op in ("conv2d", "linear", "matmul")}
    assert {layer.name for layer in layers} == integer_layers  # a conv may have both an int8 and a float result
    assert len({(layer.name, layer.out_dtype) for layer in layers}) == len(layers)
    assert_records_state_the_plan(plan, layers)
    vm = debug_vm(mod, layers, TARGET)
    info = plan.model
    images = next(iter(data.test_loader(None, info["img_size"], info["mean"], info["std"], limit=16, batch_size=16)))[0]
    for x in images[:2]:
        assert_bitexact(check_layers(vm, layers, x[None].numpy()))
    with torch.no_grad():
        expected = quantized_model(plan).eval()(images).argmax(1).numpy()
    got = np.array([vm["main"](tvm.runtime.tensor(x[None].numpy())).numpy().argmax() for x in images])
    assert (got == expected).mean() >= 15 / 16, (got, expected)
