"""Residual adds and subtractions, requantizations, concatenations (RESCALE) and constant affine chains (AFFINE) of
int8 tensors:

    quantize(add(dequantize(a_q), dequantize(b_q)))       quantize(subtract(dequantize(a_q), dequantize(b_q)))
    quantize(dequantize(x_q))                             quantize(concat([dequantize(x_q), ...], axis))
    quantize(f_n(... f_1(dequantize(x_q), c_1) ..., c_n)) with each f_j an add / subtract / multiply / divide by a
                                                          float constant c_j (either side; not c / x)

become the rescale kernel: each input's zero point removed, multiplied by its own signed fixed-point ratio
(s_in / s_out, negated for the subtrahend) on a common shift, summed in int64 with the rounding term, shifted
once (round half up: requant.rescale_params); a concatenation rescales each input to the output grid and
concatenates int8 tensors. A constant chain is folded exactly (Fractions of the float constants) into
v -> a * v + b: one input with the multiplier a * s_in / s_out (per tensor or per channel) and the offset
b / s_out in its rounding term (per channel, or for a tensor constant a full int64 tensor input of the kernel).
Inputs that are not all dequantized int8 tensors, scales or multipliers along different axes, constants that do
not broadcast to the input and divisors holding a zero stay in float.
"""
from __future__ import annotations

import functools
import math
import operator
from fractions import Fraction

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.dpl import is_const, is_op, wildcard

from ...errors import HyqError
from ..requant import INT64_MAX, fixed_point_multiplier, rescale, rescale_params, shifts
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
_X = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_ADD = is_op("relax.add")(_A, _B)
_SUBTRACT = is_op("relax.subtract")(_A, _B)
_CONCAT = is_op("relax.concat")(wildcard())
PATTERN = is_op("relax.quantize")(_ADD | _SUBTRACT | _CONCAT | _X, is_const(), is_const())
_FORMS = (("add", _ADD), ("subtract", _SUBTRACT), ("concat", _CONCAT), ("requantize", _X))  # IntegerLayer.op

STEPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")  # the ops of a constant affine chain
_STEP = functools.reduce(operator.or_, [is_op(name)(wildcard(), wildcard()) for name in STEPS])
AFFINE_PATTERN = is_op("relax.quantize")(_STEP, is_const(), is_const())

SIGNS = {"add": (1, 1), "subtract": (1, -1), "requantize": (1,), "concat": (1,)}  # of each input's multiplier


def rescale_primfunc(shape, axis: int, channels: int, inputs: int, out_dtype: str = "int8", offset=None):
    """PrimFunc(x_0, .., x_{n-1}, z, k, c, rs, zp, out): int8 tensors of one shape rescaled to one grid and summed,

        out = clip(((sum_i (int64(x_i) - z_i) * k_i + c) >> rs) + zp, qmin, qmax)

    z (int32) and k (int64, signed) are (n, channels), c (int64), rs and zp (int32) are (channels,): one value per
    channel along `axis` (one in all when channels is 1); c is a tensor of shape `offset` instead when given (of
    the rank of `shape`, broadcast against it). requant.rescale and rescaled_terms are its numpy twins.
    """
    xs = [placeholder(shape, "int8", f"x{i}") for i in range(inputs)]
    z = placeholder((inputs, channels), "int32", "z")
    k = placeholder((inputs, channels), "int64", "k")
    c = placeholder((channels,) if offset is None else offset, "int64", "c")
    rs, zp = (placeholder((channels,), "int32", n) for n in ("rs", "zp"))

    def body(*i):
        ch = i[axis] if channels > 1 else 0
        total = c[ch] if offset is None else c[tuple(i[d] if offset[d] > 1 else 0 for d in range(len(shape)))]
        for j, x in enumerate(xs):
            total = total + (x(*i).astype("int64") - z[j, ch].astype("int64")) * k[j, ch]
        return saturated((total >> rs[ch].astype("int64")) + zp[ch].astype("int64"), out_dtype)

    return te.create_prim_func([*xs, z, k, c, rs, zp, te.compute(dims(shape), body, name="rescale")])


def _is_dequantize(expr: relax.Expr) -> bool:
    return isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.dequantize") and all(
        isinstance(a, tvm.ir.expr.Constant) for a in expr.args[1:])


def _bound_values(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    return {b.var: b.value for block in func.body.blocks for b in block.bindings}


def _tuple_fields(func: relax.Function, expr: relax.Expr) -> list[relax.Expr] | None:
    """The fields of a tuple, looked up through the vars `func` binds (None if not a tuple of known values)."""
    values = _bound_values(func)
    expr = values.get(expr, expr)
    if not isinstance(expr, relax.Tuple):
        return None
    return [values.get(f, f) for f in expr.fields]


def _rescale_call(ctx: Context, ins: list[Operand], s_o: np.ndarray, z_o: np.ndarray, out: Operand, axis: int,
                  where: str, out_dtype: str, signs: tuple[int, ...]) -> relax.Expr:
    """The rescale kernel summing `ins` (one shape), their multipliers with `signs`, onto the output grid (s_o, z_o)."""
    shape = shape_of(ins[0].data, where)
    channels = shape[axis]
    s_o, z_o = (per_channel(v, out, axis, channels, f"the output {what}", where)
                for v, what in ((s_o, "scale"), (z_o, "zero point")))
    in_scales = [per_channel(o.scale, o, axis, channels, "the input scale", where) for o in ins]
    z_in = [per_channel(o.zero_point, o, axis, channels, "the input zero point", where) for o in ins]
    try:
        k, c, rs = rescale_params(in_scales, s_o)
    except HyqError as err:
        raise HyqError(f"{where}: {err}") from None
    k = k * np.array(signs, np.int64)[:, None]
    width = np.broadcast(k[0], c, z_o, *z_in).size
    params = [np.stack([np.broadcast_to(z, (width,)) for z in z_in]).astype(np.int32),
              np.broadcast_to(k, (len(ins), width)).astype(np.int64),
              *(np.broadcast_to(v, (width,)).astype(t) for v, t in ((c, np.int64), (rs, np.int32), (z_o, np.int32)))]
    key = ("rescale", shape, axis, width, len(ins), out_dtype)
    gv = ctx.kernel(key, lambda: rescale_primfunc(*key[1:]))
    return relax.call_tir(gv, [*(o.data for o in ins), *consts(params)], relax.TensorType(shape, out_dtype))


def rewrite(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """The rescale kernel of an add, subtract or requantization, one per input of a concat; root when the match
    stays in float."""
    name, op = next((n, m[p]) for n, p in _FORMS if m.get(p) is not None)
    where = ctx.where(op)
    fields = (_tuple_fields(ctx.func, op.args[0]) if name == "concat" else [op] if name == "requantize"
              else [m[_A], m[_B]])
    if fields is None or not all(_is_dequantize(f) and dtype_of(f.args[0]) == "int8" for f in fields):
        return root
    if name == "requantize" and isinstance(op.args[0], tvm.ir.expr.Constant):
        return root
    shape = shape_of(root, where)
    out = output(root, where)
    dim = int(op.attrs.axis) % len(shape) if name == "concat" else None
    ins = [operand(f, where) for f in fields]
    axes = channel_axes(out, *ins)
    if len(axes) > 1 or (name != "concat" and any(shape_of(o.data, where) != shape for o in ins)):
        return root
    axis = axes.pop() if axes else out.axis
    out_dtype = str(root.attrs.out_dtype)
    if name != "concat":
        pieces = [_rescale_call(ctx, ins, out.scale, out.zero_point, out, axis, where, out_dtype, SIGNS[name])]
    else:  # each input rescaled on its own, with its slice of per-channel output parameters along dim
        ends = np.cumsum([0] + [shape_of(o.data, where)[dim] for o in ins])
        pieces = [_rescale_call(ctx, [o], *(v[ends[i]:ends[i + 1]] if dim == axis and v.ndim else v
                                            for v in (out.scale, out.zero_point)), out, axis, where, out_dtype,
                                  SIGNS[name]) for i, o in enumerate(ins)]
    ctx.record(root, fields[0], name, {"scales": [o.scale for o in ins], "dim": dim},
               tuple(o.data for o in ins), None, tuple(o.zero_point for o in ins), bias=None,
               acc_scale=np.float64(1.0), axis=axis, out_scale=out.scale, out_zero_point=out.zero_point,
               out_dtype=out_dtype, real=RealParams(tuple(o.scale for o in ins)))
    return pieces[0] if name != "concat" else relax.op.concat(pieces, axis=dim)


# -- constant affine chains -----------------------------------------------------------------------------------------

def _chain(func: relax.Function, call: relax.Call) -> tuple[relax.Call, tuple] | None:
    """The dequantize a chain of STEPS ending in `call` starts from, each step with one float constant operand, and
    the steps in order as (op name, float64 constant, whether the constant is the left operand); None if `call`
    ends no such chain."""
    values = _bound_values(func)
    steps, expr = [], call
    while not _is_dequantize(expr):
        if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in STEPS):
            return None
        left, right = expr.args
        on_left = isinstance(left, tvm.ir.expr.Constant)
        constant, other = (left, right) if on_left else (right, left)
        if (not isinstance(constant, tvm.ir.expr.Constant) or isinstance(other, tvm.ir.expr.Constant)
                or "float" not in dtype_of(constant) or (on_left and expr.op.name == "relax.divide")):
            return None
        steps.append((expr.op.name, constant.value.numpy().astype(np.float64), on_left))
        expr = values.get(other, other)
    return expr, tuple(reversed(steps))


def fractions(values) -> np.ndarray:
    """A float array as an object array of the exact rationals it holds."""
    return np.asarray(np.frompyfunc(lambda v: Fraction(float(v)), 1, 1)(values), dtype=object)


def fold(steps, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, b), object arrays of exact rationals broadcasting to `shape`, with steps(v) = a * v + b; None unless
    every constant is finite and broadcasts to `shape` and no divisor holds a zero."""
    a, b = np.asarray(Fraction(1), dtype=object), np.asarray(Fraction(0), dtype=object)
    for name, values, on_left in steps:
        try:
            fits = np.broadcast_shapes(values.shape, shape) == shape
        except ValueError:
            fits = False
        if not fits or not np.all(np.isfinite(values)) or (name == "relax.divide" and np.any(values == 0)):
            return None
        c = fractions(values)
        if name == "relax.add":
            b = b + c
        elif name == "relax.subtract":
            a, b = (-a, c - b) if on_left else (a, b - c)
        elif name == "relax.multiply":
            a, b = a * c, b * c
        else:
            a, b = a / c, b / c
    return np.asarray(a, dtype=object), np.asarray(b, dtype=object)


def _full(values: np.ndarray, ndim: int) -> np.ndarray:
    """An array left-padded with unit dims to rank ndim."""
    return values.reshape((1,) * (ndim - values.ndim) + values.shape)


def _varying(values: np.ndarray, ndim: int) -> set[int]:
    """The axes (of rank ndim) along which the values of an array broadcasting to it change."""
    v = _full(values, ndim)
    return {d for d in range(ndim) if v.shape[d] > 1 and not np.all(v == v.take([0], axis=d))}


def _channel_values(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """The 1-D values along `axis` of an array that changes along no other axis."""
    return _full(values, ndim)[tuple(slice(None) if d == axis else 0 for d in range(ndim))]


def affine_params(multiplier, offset, zero_point, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 k (1, C), c and int32 rs (C,) of the one-input rescale kernel for y = M * (x - z) + B (output steps):
    k = sign(M) * (q << L) with (q, shift) the Q31 multiplier of |M| (q = 0, shift 0 for M = 0), rs = R and
    c = 2^(R - 1) + floor(B * 2^R + 1/2), all exact. M (exact rationals, signed) and z are () or (C,); B is () or
    (C,), or a tensor of rank 2 or more with its channels along `axis`. A HyqError when a sum could pass 2^63."""
    m = np.asarray(multiplier, dtype=object).reshape(-1)
    nonzero = np.array([v != 0 for v in m])
    q, shift = np.zeros(m.size, np.int64), np.zeros(m.size, np.int64)
    if nonzero.any():
        q[nonzero], shift[nonzero] = fixed_point_multiplier(np.array([abs(v) for v in m[nonzero]], dtype=object))
    left, right = shifts(shift)
    k = np.array([(v > 0) - (v < 0) for v in m], np.int64) * (q << left)
    steps = right if np.ndim(offset) < 2 else along(right, axis, np.ndim(offset))
    c = np.frompyfunc(lambda b, r: (1 << (int(r) - 1)) + math.floor(b * (1 << int(r)) + Fraction(1, 2)), 2, 1)(
        np.asarray(offset, dtype=object), steps)
    span = np.broadcast_to(np.maximum(np.asarray(zero_point, np.int64) + 128, 127 - np.asarray(zero_point, np.int64)),
                           k.shape)
    worst = max(int(s) * abs(int(v)) for s, v in zip(span, k)) + max(abs(int(v)) for v in np.ravel(c))
    if worst > INT64_MAX:
        raise HyqError(f"the affine rescale reaches 2^{math.log2(worst):.1f} in int64 (multipliers up to"
                       f" {float(max(map(abs, m))):.3g}, offsets up to {float(max(map(abs, np.ravel(offset)))):.3g}"
                       f" output steps)")
    return k.reshape(1, -1), np.asarray(c, dtype=object).astype(np.int64), right.astype(np.int32)


def affine_rewrite(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """The one-input rescale kernel of a constant affine chain; root when it stays in float."""
    call = m[_STEP]
    found = _chain(ctx.func, call)
    if found is None or dtype_of(found[0].args[0]) != "int8" or isinstance(found[0].args[0], tvm.ir.expr.Constant):
        return root
    dq, steps = found
    where = ctx.where(call, dq)
    shape = shape_of(root, where)
    ndim = len(shape)
    folded = fold(steps, shape)
    if folded is None:
        return root
    x, out = operand(dq, where), output(root, where)
    scale_x, scale_o = (fractions(along(o.scale, o.axis, ndim)) for o in (x, out))
    multiplier, offset = (np.asarray(v, dtype=object) for v in (folded[0] * scale_x / scale_o, folded[1] / scale_o))
    axes, offset_axes = channel_axes(x, out) | _varying(multiplier, ndim), _varying(offset, ndim)
    if len(axes) > 1:
        return root
    axis = min(axes) if axes else min(offset_axes) if len(offset_axes) == 1 else out.axis
    s_x, z_x, s_o, z_o = (per_channel(v, o, axis, shape[axis], f"the {what}", where) for v, o, what in (
        (x.scale, x, "input scale"), (x.zero_point, x, "input zero point"), (out.scale, out, "output scale"),
        (out.zero_point, out, "output zero point")))
    multiplier = _channel_values(multiplier, axis, ndim)
    per_ch = offset_axes <= {axis}
    offset = _channel_values(offset, axis, ndim) if per_ch else _full(offset, ndim)
    width = np.broadcast(multiplier, z_x, z_o, *((offset,) if per_ch else ())).size
    multiplier, z_x, z_o = (np.broadcast_to(v, (width,)) for v in (multiplier, z_x, z_o))
    offset = np.broadcast_to(offset, (width,)) if per_ch else offset
    try:
        k, c, rs = affine_params(multiplier, offset, z_x, axis)
    except HyqError as err:
        raise HyqError(f"{where}: {err}") from None
    out_dtype = str(root.attrs.out_dtype)
    params = [z_x.reshape(1, -1).astype(np.int32), k, c, rs, z_o.astype(np.int32)]
    key = ("rescale", shape, axis, width, 1, out_dtype, *(() if per_ch else (c.shape,)))
    gv = ctx.kernel(key, lambda: rescale_primfunc(*key[1:]))
    ctx.record(root, dq, "affine", {"multiplier": multiplier, "offset": offset}, (x.data,), None, (z_x,), bias=None,
               acc_scale=np.float64(1.0), axis=axis, out_scale=s_o, out_zero_point=z_o, out_dtype=out_dtype,
               real=RealParams((s_x,), chain=steps))
    return relax.call_tir(gv, [x.data, *consts(params)], relax.TensorType(shape, out_dtype))


# -- numpy twins ----------------------------------------------------------------------------------------------------

def rescaled_sum(xs, zero_points, scales, out_scale, out_zero_point, axis: int, out_dtype: str = "int8") -> np.ndarray:
    """sum_i (x_i - z_i) * s_i on the output grid (s_o, z_o), rounded once: a residual add of int8 tensors."""
    ndim = np.ndim(xs[0])
    info = np.iinfo(out_dtype)
    return rescale(xs, [along(z, axis, ndim) for z in zero_points], [along(s, axis, ndim) for s in scales],
                   along(out_scale, axis, ndim), along(out_zero_point, axis, ndim), int(info.min), int(info.max),
                   out_dtype)


def rescaled_terms(xs, zero_points, k, c, rs, out_zero_point, axis: int, out_dtype: str = "int8") -> np.ndarray:
    """The rescale kernel from its arrays: clip(((c + sum_i (x_i - z_i) * k_i) >> rs) + z_o), per-channel values
    along `axis` (c: () or (C,), or a tensor of rank 2 or more broadcasting to the x_i)."""
    ndim = np.ndim(xs[0])
    total = np.asarray(c, np.int64) if np.ndim(c) > 1 else along(c, axis, ndim).astype(np.int64)
    for x, z, k_i in zip(xs, zero_points, k):
        total = total + (np.asarray(x, np.int64) - along(z, axis, ndim).astype(np.int64)) * along(k_i, axis, ndim)
    out = (total >> along(rs, axis, ndim).astype(np.int64)) + along(out_zero_point, axis, ndim).astype(np.int64)
    info = np.iinfo(out_dtype)
    return np.clip(out, int(info.min), int(info.max)).astype(out_dtype)


def rescaled_difference(xs, zero_points, scales, out_scale, out_zero_point, axis: int,
                        out_dtype: str = "int8") -> np.ndarray:
    """(x_0 - z_0) * s_0 - (x_1 - z_1) * s_1 on the output grid, rounded once: the sum's multipliers, the second
    negated."""
    k, c, rs = rescale_params(scales, out_scale)
    return rescaled_terms(xs, zero_points, k * np.array(SIGNS["subtract"])[:, None], c, rs, out_zero_point, axis,
                          out_dtype)


def rescaled_affine(x, zero_point, multiplier, offset, out_zero_point, axis: int,
                    out_dtype: str = "int8") -> np.ndarray:
    """M * (x - z) + B (output steps, exact rationals: affine_params) on the output grid, rounded once."""
    k, c, rs = affine_params(multiplier, offset, zero_point, axis)
    return rescaled_terms([x], [zero_point], k, c, rs, out_zero_point, axis, out_dtype)


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
    """The inputs rescaled and summed (add, requantize), subtracted (subtract) or concatenated (concat)."""
    args = ([values[v] for v in layer.inputs], layer.zero_points, layer.attrs["scales"], layer.out_scale,
            layer.out_zero_point, layer.axis)
    if layer.op == "subtract":
        return rescaled_difference(*args, layer.out_dtype)
    if layer.attrs["dim"] is None:
        return rescaled_sum(*args, layer.out_dtype)
    return rescaled_concat(*args, layer.attrs["dim"], layer.out_dtype)


def affine_reference(layer: IntegerLayer, values: dict) -> np.ndarray:
    """The input through its folded multiplier and offset."""
    return rescaled_affine(values[layer.inputs[0]], layer.zero_points[0], layer.attrs["multiplier"],
                           layer.attrs["offset"], layer.out_zero_point, layer.axis, layer.out_dtype)


RESCALE = Rule("rescale", PATTERN, rewrite, reference)
AFFINE = Rule("affine", AFFINE_PATTERN, affine_rewrite, affine_reference)
