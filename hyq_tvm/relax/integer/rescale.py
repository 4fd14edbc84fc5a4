"""Residual adds and concatenations of int8 tensors:

    quantize(add(dequantize(a_q), dequantize(b_q)))     quantize(concat([dequantize(x_q), ...], axis))

become the rescale kernel: each input's zero point removed, multiplied by its own fixed-point ratio
s_in / s_out on a common shift, summed in int64, rounded once (requant.rescale_params); a concatenation
rescales each input to the output grid and concatenates int8 tensors. Inputs that are not all
dequantized int8 tensors, or scales along different axes, stay in float.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.dpl import is_const, is_op, wildcard

from ..requant import rescale, rescale_params
from .kernel import dims, placeholder, saturated
from .operand import (
    Operand,
    along,
    channel_axes,
    consts,
    dtype_of,
    operand,
    output,
    per_channel,
    shape_of,
)
from .rule import Context, IntegerLayer, RealParams, Rule

_A = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_B = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_ADD = is_op("relax.add")(_A, _B)
_CONCAT = is_op("relax.concat")(wildcard())
PATTERN = is_op("relax.quantize")(_ADD | _CONCAT, is_const(), is_const())


def rescale_primfunc(shape, axis: int, channels: int, inputs: int, out_dtype: str = "int8"):
    """PrimFunc(x_0, .., x_{n-1}, z, k, c, rs, zp, out): int8 tensors of one shape rescaled to one grid and summed,

        out = clip(((sum_i (int64(x_i) - z_i) * k_i + c) >> rs) + zp, qmin, qmax)

    z (int32) and k (int64) are (n, channels), c (int64), rs and zp (int32) are (channels,): one value per
    channel along `axis` (one in all when channels is 1). requant.rescale is its numpy twin.
    """
    xs = [placeholder(shape, "int8", f"x{i}") for i in range(inputs)]
    z = placeholder((inputs, channels), "int32", "z")
    k = placeholder((inputs, channels), "int64", "k")
    c = placeholder((channels,), "int64", "c")
    rs, zp = (placeholder((channels,), "int32", n) for n in ("rs", "zp"))

    def body(*i):
        ch = i[axis] if channels > 1 else 0
        total = c[ch]
        for j, x in enumerate(xs):
            total = total + (x(*i).astype("int64") - z[j, ch].astype("int64")) * k[j, ch]
        return saturated((total >> rs[ch].astype("int64")) + zp[ch].astype("int64"), out_dtype)

    return te.create_prim_func([*xs, z, k, c, rs, zp, te.compute(dims(shape), body, name="rescale")])


def _is_dequantize(expr: relax.Expr) -> bool:
    return isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.dequantize") and all(
        isinstance(a, tvm.ir.expr.Constant) for a in expr.args[1:])


def _tuple_fields(func: relax.Function, expr: relax.Expr) -> list[relax.Expr] | None:
    """The fields of a tuple, looked up through the vars `func` binds (None if not a tuple of known values)."""
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    expr = values.get(expr, expr)
    if not isinstance(expr, relax.Tuple):
        return None
    return [values.get(f, f) for f in expr.fields]


def _rescale_call(ctx: Context, ins: list[Operand], s_o: np.ndarray, z_o: np.ndarray, out: Operand, axis: int,
                  where: str, out_dtype: str) -> relax.Expr:
    """The rescale kernel summing `ins` (one shape) onto the output grid (s_o, z_o)."""
    shape = shape_of(ins[0].data, where)
    channels = shape[axis]
    s_o, z_o = (per_channel(v, out, axis, channels, f"the output {what}", where)
                for v, what in ((s_o, "scale"), (z_o, "zero point")))
    in_scales = [per_channel(o.scale, o, axis, channels, "the input scale", where) for o in ins]
    z_in = [per_channel(o.zero_point, o, axis, channels, "the input zero point", where) for o in ins]
    k, c, rs = rescale_params(in_scales, s_o)
    width = np.broadcast(k[0], c, z_o, *z_in).size
    params = [np.stack([np.broadcast_to(z, (width,)) for z in z_in]).astype(np.int32),
              np.broadcast_to(k, (len(ins), width)).astype(np.int64),
              *(np.broadcast_to(v, (width,)).astype(t) for v, t in ((c, np.int64), (rs, np.int32), (z_o, np.int32)))]
    key = ("rescale", shape, axis, width, len(ins), out_dtype)
    gv = ctx.kernel(key, lambda: rescale_primfunc(*key[1:]))
    return relax.call_tir(gv, [*(o.data for o in ins), *consts(params)], relax.TensorType(shape, out_dtype))


def rewrite(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """The rescale kernel of an add, one per input of a concat; root when the match stays in float."""
    add = m.get(_ADD)
    op = add if add is not None else m[_CONCAT]
    where = ctx.where(op)
    fields = [m[_A], m[_B]] if add is not None else _tuple_fields(ctx.func, op.args[0])
    if fields is None or not all(_is_dequantize(f) and dtype_of(f.args[0]) == "int8" for f in fields):
        return root
    shape = shape_of(root, where)
    out = output(root, where)
    dim = int(op.attrs.axis) % len(shape) if add is None else None
    ins = [operand(f, where) for f in fields]
    axes = channel_axes(out, *ins)
    if len(axes) > 1 or (add is not None and any(shape_of(o.data, where) != shape for o in ins)):
        return root
    axis = axes.pop() if axes else out.axis
    out_dtype = str(root.attrs.out_dtype)
    if add is not None:
        pieces = [_rescale_call(ctx, ins, out.scale, out.zero_point, out, axis, where, out_dtype)]
    else:  # each input rescaled on its own, with its slice of per-channel output parameters along dim
        ends = np.cumsum([0] + [shape_of(o.data, where)[dim] for o in ins])
        pieces = [_rescale_call(ctx, [o], *(v[ends[i]:ends[i + 1]] if dim == axis and v.ndim else v
                                            for v in (out.scale, out.zero_point)), out, axis, where, out_dtype)
                  for i, o in enumerate(ins)]
    ctx.record(root, fields[0], "add" if add is not None else "concat", {"scales": [o.scale for o in ins], "dim": dim},
               tuple(o.data for o in ins), None, tuple(o.zero_point for o in ins), bias=None,
               acc_scale=np.float64(1.0), axis=axis, out_scale=out.scale, out_zero_point=out.zero_point,
               out_dtype=out_dtype, real=RealParams(tuple(o.scale for o in ins)))
    return pieces[0] if add is not None else relax.op.concat(pieces, axis=dim)


def rescaled_sum(xs, zero_points, scales, out_scale, out_zero_point, axis: int, out_dtype: str = "int8") -> np.ndarray:
    """sum_i (x_i - z_i) * s_i on the output grid (s_o, z_o), rounded once: a residual add of int8 tensors."""
    ndim = np.ndim(xs[0])
    info = np.iinfo(out_dtype)
    return rescale(xs, [along(z, axis, ndim) for z in zero_points], [along(s, axis, ndim) for s in scales],
                   along(out_scale, axis, ndim), along(out_zero_point, axis, ndim), int(info.min), int(info.max),
                   out_dtype)


def rescaled_concat(xs, zero_points, scales, out_scale, out_zero_point, axis: int, dim: int,
                    out_dtype: str = "int8") -> np.ndarray:
    """The int8 tensors each rescaled to the output grid and concatenated along `dim`; per-channel output
    parameters along `dim` are split among the inputs."""
    ends = np.cumsum([0] + [np.shape(x)[dim] for x in xs])
    parts = []
    for i, (x, z, s) in enumerate(zip(xs, zero_points, scales)):
        s_o, z_o = out_scale, out_zero_point
        if dim == axis:
            s_o, z_o = (v[ends[i]:ends[i + 1]] if np.ndim(v) else v for v in (s_o, z_o))
        parts.append(rescaled_sum([x], [z], [s], s_o, z_o, axis, out_dtype))
    return np.concatenate(parts, axis=dim)


def reference(layer: IntegerLayer, values: dict) -> np.ndarray:
    """The inputs rescaled and summed (add) or concatenated (concat)."""
    args = ([values[v] for v in layer.inputs], layer.zero_points, layer.attrs["scales"], layer.out_scale,
            layer.out_zero_point, layer.axis)
    if layer.attrs["dim"] is None:
        return rescaled_sum(*args, layer.out_dtype)
    return rescaled_concat(*args, layer.attrs["dim"], layer.out_dtype)


RESCALE = Rule("rescale", PATTERN, rewrite, reference)
