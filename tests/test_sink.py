"""sink.py: dequantize moved below layout ops, only where that leaves every float value as it was."""
import numpy as np
import tvm
from tvm import relax

from hyq_tvm.relax.sink import sink_dequantize, sink_pass

from relax_integer.qdq import const, dq, int8, module, run


def _sunk_once(before, expected, inputs):
    got = sink_dequantize(module(inputs, before))
    tvm.ir.assert_structural_equal(got, module(inputs, expected))
    return got


def test_a_per_tensor_dequantize_moves_below_a_chain_of_layout_ops():
    def before(bb, x):
        y = bb.emit(dq(x, 0.5, 3))
        y = bb.emit(relax.op.reshape(y, (2, 3, 4)))
        return relax.op.permute_dims(y, [0, 2, 1])

    def expected(bb, x):
        y = bb.emit(relax.op.reshape(x, (2, 3, 4)))
        y = bb.emit(relax.op.permute_dims(y, [0, 2, 1]))
        return dq(y, 0.5, 3)

    inputs = {"x": ((2, 12), "int8")}
    got = _sunk_once(before, expected, inputs)
    x = int8((2, 12))
    np.testing.assert_array_equal(run(got, x), run(module(inputs, before), x))


def test_a_split_moves_its_dequantize_into_each_part():
    def before(bb, x):
        parts = bb.emit(relax.op.split(bb.emit(dq(x, 0.25, -1)), 2, axis=1))
        return relax.op.add(bb.emit(relax.TupleGetItem(parts, 0)), bb.emit(relax.TupleGetItem(parts, 1)))

    def expected(bb, x):
        a = bb.emit(dq(bb.emit(relax.TupleGetItem(bb.emit(relax.op.split(x, 2, axis=1)), 0)), 0.25, -1))
        b = bb.emit(dq(bb.emit(relax.TupleGetItem(bb.emit(relax.op.split(x, 2, axis=1)), 1)), 0.25, -1))
        return relax.op.add(a, b)

    inputs = {"x": ((2, 6), "int8")}
    got = sink_dequantize(module(inputs, before))
    assert got["main"].script().count("R.dequantize") == 2 and "R.split(x" in got["main"].script()
    x = int8((2, 6))
    np.testing.assert_array_equal(run(got, x), run(module(inputs, before), x))
    np.testing.assert_array_equal(run(got, x), run(module(inputs, expected), x))


def test_per_channel_and_constant_dequantizes_stay():
    def per_channel(bb, x):
        return relax.op.reshape(bb.emit(dq(x, np.array([0.5, 0.25], np.float32), np.array([1, 2], np.int8), 0)),
                                (4,))

    def weight(bb, x):
        w = bb.emit(relax.op.permute_dims(bb.emit(dq(const(int8((2, 2)), "int8"), 0.5, 0)), [1, 0]))
        return relax.op.matmul(bb.emit(dq(x, 0.1, 0)), w)

    for body in (per_channel, weight):
        mod = module({"x": ((2, 2), "int8")}, body)
        tvm.ir.assert_structural_equal(sink_dequantize(mod), mod)


def test_sink_pass_is_sink_dequantize_as_a_module_pass():
    mod = module({"x": ((2, 12), "int8")}, lambda bb, x: relax.op.reshape(bb.emit(dq(x, 0.5, 3)), (24,)))
    assert sink_pass().info.name == "hyq.SinkDequantize"
    tvm.ir.assert_structural_equal(sink_pass()(mod), sink_dequantize(mod))
