"""Integer mode end to end: nothing float between the input's quantize and the output's dequantize, and every
integer layer bit-exact with the reference."""
import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from hyq_tvm import data
from hyq_tvm.quant.baselines.minmax import calibrate_minmax
from hyq_tvm.quant.calibrate import calibrate
from hyq_tvm.quant.plan import QuantPlan, plan_layers
from hyq_tvm.quant.prepare import quantized_model
from hyq_tvm.relax.annotate import annotate
from hyq_tvm.cli.integer_report import merged
from hyq_tvm.relax.census import ENDS, float_ops, op_census
from hyq_tvm.relax.importer import to_relax
from hyq_tvm.relax.integer import integerize_layers
from hyq_tvm.relax.pipeline import lower
from hyq_tvm.relax.sink import sink_dequantize
from hyq_tvm.relax.verify import assert_bitexact, check_layers, debug_vm
from hyq_tvm.targets import load_target

from test_tensors import _Block, _integer

TARGET = load_target("host").tvm_target()


def floating(mod: tvm.IRModule) -> dict[str, int]:
    """The ops of the census that take or give float32."""
    return {op: n for op, n in op_census(mod).items() if "float32" in op}


@torch.no_grad()
def test_a_small_integer_mode_model_is_integer_from_input_to_output_and_bit_exact():
    model, x = _Block().eval(), torch.randn(8, 3, 8, 8)
    _integer(model, x)
    calibrate_minmax(model, x, 8, 8)
    plan = QuantPlan({}, {"mode": "integer"}, plan_layers(model, []))
    mod = relax.transform.DecomposeOpsForInference()(to_relax(model, x[:1]))
    mod, layers = integerize_layers(sink_dequantize(annotate(mod, plan)))
    assert floating(mod) == dict.fromkeys(ENDS, 1) and float_ops(mod) == 0
    assert {layer.op for layer in layers} == {"conv2d", "matmul", "lookup", "add", "requantize", "pool", "affine"}
    vm = debug_vm(mod, layers, TARGET)
    for image in x[:2]:
        assert_bitexact(check_layers(vm, layers, image[None].numpy()))
    got = vm["main"](tvm.runtime.tensor(x[:1].numpy())).numpy()
    np.testing.assert_allclose(got, model(x[:1]).numpy(), atol=float(model.fc.output.act.scale) * 2 + 0.05)


@pytest.mark.slow
def test_mobilevit_xxs_in_integer_mode_has_no_float_op_and_is_bit_exact():
    torch.set_num_threads(1)
    plan = calibrate("mobilevit_xxs", method="minmax", images=8, mode="integer", progress=False)[0]
    lowered = lower(plan)
    assert floating(lowered.mod) == dict.fromkeys(ENDS, 1) and float_ops(lowered.mod) == 0
    assert {"pool", "affine", "requantize", "add", "concat", "norm", "softmax", "lookup"} <= {
        layer.op for layer in lowered.layers}
    vm = debug_vm(lowered.mod, lowered.layers, TARGET)
    info = plan.model
    images = next(iter(data.test_loader(None, info["img_size"], info["mean"], info["std"], limit=16, batch_size=16)))[0]
    for x in images[:2]:
        assert_bitexact(check_layers(vm, lowered.layers, x[None].numpy()))
    with torch.no_grad():
        expected = quantized_model(plan).eval()(images).argmax(1).numpy()
    got = np.array([vm["main"](tvm.runtime.tensor(x[None].numpy())).numpy().argmax() for x in images])
    assert (got == expected).mean() >= 15 / 16, (got, expected)


def test_float_ops_counts_what_is_float_besides_the_ends():
    def body(bb, x):
        y = bb.emit(relax.op.dequantize(x, relax.const(0.5, "float32"), relax.const(0, "int8")))
        y = bb.emit(relax.op.nn.silu(y))
        return relax.op.quantize(y, relax.const(0.5, "float32"), relax.const(0, "int8"))

    from relax_integer.qdq import module
    assert float_ops(module({"x": ((2, 3), "int8")}, body)) == 1


def test_integer_report_rows_of_other_modes_are_kept():
    row = {"model": "m", "method": "qhyvit", "wbits": 8, "abits": 8}
    old = [{**row, "mode": "partial", "top1": 1}, {**row, "mode": "integer", "top1": 2}]
    new = [{**row, "mode": "integer", "top1": 3}]
    assert merged(old, new) == [old[0], new[0]]
