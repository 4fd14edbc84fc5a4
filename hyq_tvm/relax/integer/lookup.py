"""Elementwise functions of int8 tensors: quantize(f(dequantize(x_q))) for f in ELEMENTWISE becomes a lookup
in a 256-entry table (one per channel for channel-wise parameters) computed in float64."""
from __future__ import annotations

import functools
import math
import operator

import numpy as np
from tvm import relax, te
from tvm.relax.dpl import is_const, is_op, wildcard

from .kernel import dims, placeholder
from .operand import channel_axes, clip_bounds, operand, output, per_channel, shape_of
from .rule import Context, IntegerLayer, RealParams, Rule


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(v)


# Elementwise Relax ops with a quantized input and output, as numpy float64 functions of (values, call).
ELEMENTWISE = {
    "relax.nn.relu": lambda v, call: np.maximum(v, 0.0),
    "relax.nn.leakyrelu": lambda v, call: np.where(v >= 0, v, float(call.attrs.alpha) * v),
    "relax.clip": lambda v, call: np.clip(v, *clip_bounds(call)),
    "relax.nn.gelu": lambda v, call: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))),
    "relax.nn.gelu_tanh": lambda v, call: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3))),
    "relax.nn.silu": lambda v, call: v / (1.0 + np.exp(-v)),
    "relax.sigmoid": lambda v, call: 1.0 / (1.0 + np.exp(-v)),
    "relax.tanh": lambda v, call: np.tanh(v),
}

_INPUT = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_FUNC = functools.reduce(operator.or_, [
    is_op(name)(_INPUT, *((wildcard(), wildcard()) if name == "relax.clip" else ())) for name in ELEMENTWISE])
PATTERN = is_op("relax.quantize")(_FUNC, is_const(), is_const())


def lookup_table(func, in_scale, in_zero_point, out_scale, out_zero_point, channels: int,
                 out_dtype: str = "int8") -> np.ndarray:
    """(channels, 256) table of quantize(func(dequantize(q))) for every int8 q: func on float64 values, rounded
    half to even like the fake-quant model. Scales and zero points are () or (channels,)."""
    q = np.arange(-128, 128, dtype=np.float64)
    col = [np.broadcast_to(np.asarray(v, np.float64), (channels,))[:, None]
           for v in (in_scale, in_zero_point, out_scale, out_zero_point)]
    s_in, z_in, s_o, z_o = col
    info = np.iinfo(out_dtype)
    return np.clip(np.round(func(s_in * (q - z_in)) / s_o) + z_o, info.min, info.max).astype(out_dtype)


def _real_args(call: relax.Call) -> tuple[float, ...]:
    """The real arguments of an ELEMENTWISE call: clip (min, max), leakyrelu (alpha,), else ()."""
    if call.op.name == "relax.clip":
        return clip_bounds(call)
    return (float(call.attrs.alpha),) if call.op.name == "relax.nn.leakyrelu" else ()


def lookup_primfunc(shape, axis: int, channels: int, out_dtype: str = "int8"):
    """PrimFunc(x, table, out): out = table[channel, x + 128] for an int8 x; table is (channels, 256) of
    out_dtype, one row per channel along `axis` (one in all when channels is 1). lookup is its twin."""
    x = placeholder(shape, "int8", "x")
    table = placeholder((channels, 256), out_dtype, "table")

    def body(*i):
        return table[i[axis] if channels > 1 else 0, x(*i).astype("int32") + 128]

    return te.create_prim_func([x, table, te.compute(dims(shape), body, name="lookup")])


def rewrite(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """The lookup kernel, or root when the parameters vary along more than one axis."""
    call, dq = m[_FUNC], m[_INPUT]
    where = ctx.where(call)
    shape = shape_of(root, where)
    x, out = operand(dq, where), output(root, where)
    axes = channel_axes(x, out)
    if len(axes) > 1:
        return root
    axis = axes.pop() if axes else out.axis
    args = [per_channel(v, o, axis, shape[axis], what, where) for v, o, what in (
        (x.scale, x, "the input scale"), (x.zero_point, x, "the input zero point"),
        (out.scale, out, "the output scale"), (out.zero_point, out, "the output zero point"))]
    out_dtype = str(root.attrs.out_dtype)
    channels = max(np.size(a) for a in args)
    table = lookup_table(functools.partial(ELEMENTWISE[call.op.name], call=call), *args, channels, out_dtype)
    key = ("lookup", shape, axis, channels, out_dtype)
    gv = ctx.kernel(key, lambda: lookup_primfunc(*key[1:]))
    ctx.record(root, dq, "lookup", {"table": table}, (x.data,), None, (x.zero_point,), bias=None,
               acc_scale=np.float64(1.0), axis=axis, out_scale=out.scale, out_zero_point=out.zero_point,
               out_dtype=out_dtype, real=RealParams((x.scale,), function=call.op.name, args=_real_args(call)))
    return relax.call_tir(gv, [x.data, relax.const(table, out_dtype)], relax.TensorType(shape, out_dtype))


def lookup(x_q, table, axis: int) -> np.ndarray:
    """table[channel, x + 128] of an int8 tensor: one 256-entry row per channel along `axis`, or one row."""
    x = np.asarray(x_q, np.int64) + 128
    if table.shape[0] == 1:
        return table[0][x]
    return table[np.arange(table.shape[0]).reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)]), x]


def reference(layer: IntegerLayer, values: dict) -> np.ndarray:
    return lookup(values[layer.inputs[0]], layer.attrs["table"], layer.axis)


LOOKUP = Rule("lookup", PATTERN, rewrite, reference)
