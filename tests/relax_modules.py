"""Small Relax modules the tests build: main(x) computing one expression of its input."""
import numpy as np
import tvm
from tvm import relax


def one_op(x_shape, op, dtype: str = "int8") -> tvm.IRModule:
    """main(x) = op(x) for x of shape `x_shape` and type `dtype`."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(op(x)))
        bb.emit_func_output(out)
    return bb.get()


def with_weight(x_shape, weight: np.ndarray, op) -> tvm.IRModule:
    """main(x) = op(x, weight) for an int8 x of shape `x_shape` and the constant `weight`."""
    return one_op(x_shape, lambda x: op(x, relax.const(weight)))
