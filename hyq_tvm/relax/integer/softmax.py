"""Integer softmax (full mode): quantize(softmax(dequantize(x_q), last axis)) with a per-tensor input scale
becomes exp from a 256-entry Q30 table, Q30 probabilities, requantized. Other softmaxes stay float islands."""
from __future__ import annotations

import decimal
from decimal import Decimal

import numpy as np
from tvm import relax, te, tirx
from tvm.relax.dpl import is_const, is_op, wildcard

from .kernel import dims, placeholder
from .operand import consts, operand, output, per_channel, shape_of, uniform
from .requantize import (
    requant_params,
    requant_placeholders,
    requantize_acc,
    requantized,
)
from .rule import Context, IntegerLayer, RealParams, Rule

PROB_BITS = 30  # softmax probabilities and exp table entries are Q30 integers

_INPUT = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_SOFTMAX = is_op("relax.nn.softmax")(_INPUT)
PATTERN = is_op("relax.quantize")(_SOFTMAX, is_const(), is_const())


def softmax_table(scale: float) -> np.ndarray:
    """int32 table[d] = floor(exp(-scale * d) * 2^30 + 1/2) for d = 0 .. 255: exp of an int8 input below its
    maximum, to 60 decimal digits (float64 rounded some entries onto the half and then up)."""
    with decimal.localcontext(prec=60):
        s, half = Decimal(float(scale)), Decimal(1) / 2
        return np.array([int(((-s * d).exp() * (1 << PROB_BITS) + half).to_integral_value(decimal.ROUND_FLOOR))
                         for d in range(256)], np.int32)


def softmax_primfunc(shape, axis: int, channels: int, left_shift: bool, out_dtype: str = "int8"):
    """PrimFunc(x, table, q, ls, rs, c, zp, out): softmax over the last axis of an int8 x, requantized.

        e = table[max(x) - x]          exp on the input grid, Q30
        p = (e << 30) // sum(e)        the probability, Q30 (floor), without a division per element: one per
                                       row, r = 2^62 // sum(e); then g = (e * r) >> 32 is p or p - 1 (e <= 2^30
                                       <= sum(e): e * r <= 2^62, and e * r / 2^32 is below e * 2^30 / sum(e)
                                       by less than e / 2^32 <= 1/4), and g + 1 where (e << 30) - g * sum(e)
                                       is still at least sum(e)
        out = requantize(p, q, ls, rs, c, zp)

    The requantization parameters hold one value per channel along `axis` (or one in all).
    softmax_probs and requantize_acc are its numpy twin.
    """
    *outer, n = shape
    x = placeholder(shape, "int8", "x")
    table = placeholder((256,), "int32", "table")
    q, ls, rs, c, zp = requant_placeholders(channels)
    k = te.reduce_axis((0, n), name="k")
    top = te.compute(dims(outer), lambda *i: te.max(x(*i, k).astype("int32"), axis=k), name="top")
    e = te.compute(dims(shape), lambda *i: table[top(*i[:-1]) - x(*i).astype("int32")].astype("int64"), name="exp")
    k2 = te.reduce_axis((0, n), name="k2")
    total = te.compute(dims(outer), lambda *i: te.sum(e(*i, k2), axis=k2), name="total")
    inverse = te.compute(dims(outer), lambda *i: tirx.floordiv(tirx.const(1 << (PROB_BITS + 32), "int64"), total(*i)),
                         name="inverse")

    def prob(*i):   # (e << PROB_BITS) // total: see the docstring
        row = i[:-1]
        guess = (e(*i) * inverse(*row)) >> 32
        return guess + ((e(*i) << PROB_BITS) - guess * total(*row) >= total(*row)).astype("int64")
    p = te.compute(dims(shape), prob, name="prob")

    def body(*i):
        return requantized(p(*i), q, ls, rs, c, zp, i[axis] if channels > 1 else 0, left_shift, out_dtype)

    return te.create_prim_func([x, table, q, ls, rs, c, zp, te.compute(dims(shape), body, name="softmax")])


def rewrite(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """The integer softmax kernel, or root when the softmax is not over the last axis or its input scale
    varies per channel."""
    sm, dq = m[_SOFTMAX], m[_INPUT]
    where = ctx.where(sm, dq)
    shape = shape_of(root, where)
    last = len(shape) - 1
    x = operand(dq, where)
    s_in = uniform(x.scale)
    if int(sm.attrs.axis) % len(shape) != last or s_in is None:
        return root
    out = output(root, where)
    s_o = per_channel(out.scale, out, out.axis, shape[out.axis], "the output scale", where)
    z_o = per_channel(out.zero_point, out, out.axis, shape[out.axis], "the output zero point", where)
    acc_scale = np.float64(2.0 ** -PROB_BITS)
    params = requant_params(acc_scale, s_o, z_o, None, np.int64(1 << PROB_BITS), where)
    out_dtype = str(root.attrs.out_dtype)
    key = ("softmax", shape, out.axis, params[0].size, bool(np.any(params[1])), out_dtype)
    gv = ctx.kernel(key, lambda: softmax_primfunc(shape, *key[2:]))
    table = softmax_table(float(s_in))
    ctx.record(root, dq, "softmax", {"table": table}, (x.data,), None, (uniform(x.zero_point),), bias=None,
               acc_scale=acc_scale, axis=out.axis, out_scale=s_o, out_zero_point=z_o, out_dtype=out_dtype,
               real=RealParams((s_in,)))
    return relax.call_tir(gv, [x.data, *consts([table, *params])], relax.TensorType(shape, out_dtype))


def softmax_probs(x_q: np.ndarray, table: np.ndarray) -> np.ndarray:
    """int32 Q30 probabilities of an int8 tensor over its last axis: (e << 30) // sum(e), e = table[max - x]."""
    x = np.asarray(x_q, np.int64)
    e = np.asarray(table, np.int64)[x.max(axis=-1, keepdims=True) - x]
    return ((e << PROB_BITS) // e.sum(axis=-1, keepdims=True)).astype(np.int32)


def reference(layer: IntegerLayer, values: dict) -> np.ndarray:
    """The Q30 probabilities requantized."""
    return requantize_acc(softmax_probs(values[layer.inputs[0]], layer.attrs["table"]), layer.acc_scale,
                          layer.out_scale, layer.out_zero_point, layer.axis, layer.out_dtype)


SOFTMAX = Rule("softmax", PATTERN, rewrite, reference)
