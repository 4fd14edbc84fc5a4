"""Averages and sums of int8 tensors:

    quantize(P(dequantize(x_q)))    P: avg_pool2d (NCHW), adaptive_avg_pool2d (NCHW, output size dividing the
                                    input), mean or sum over any axes

become one kernel: the window sum of x - z in int32 (int64 when the window is too large), requantized to the
output grid with the exact multiplier s_in / (n * s_o), n the number of elements averaged at that output
position (1 for a sum). Positions with different n (count_include_pad=False or ceil_mode at the borders)
look their multiplier up in a small table of count classes. Scales varying along a pooled axis (or along
two axes) stay in float.
"""
from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass

import numpy as np
from tvm import relax, te, tirx
from tvm.relax.dpl import is_const, is_op, wildcard

from ...errors import HyqError
from ..requant import exact_ratio, fixed_point_multiplier, requantize
from .kernel import dims, placeholder
from .operand import along, channel_axes, consts, operand, output, per_channel, shape_of
from .requantize import requant_params, requant_placeholders, requantized
from .rule import Context, IntegerLayer, RealParams, Rule

INT32_MAX = int(np.iinfo(np.int32).max)
MAX_COUNT = 1 << 29  # n * s_o of a float32 scale is exact in float64 below 2^29
IDENTITY = (1, 1, 1, 0)

POOLS = ("relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", "relax.mean", "relax.sum")
_INPUT = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_POOL = functools.reduce(operator.or_, [is_op(name)(_INPUT) for name in POOLS])
PATTERN = is_op("relax.quantize")(_POOL, is_const(), is_const())


@dataclass(frozen=True)
class Pooling:
    """A window sum over an int8 tensor: output index j of input axis d sums the input at
    j * stride - pad + dilation * t, t < kernel (zero outside the input)."""

    shape: tuple[int, ...]                          # of the input
    windows: tuple[tuple[int, int, int, int], ...]  # (kernel, stride, dilation, pad before) per input axis
    extents: tuple[int, ...]                        # the output's extent along each input axis
    kept: tuple[bool, ...]                          # whether the output keeps the axis (keepdims=False drops)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(e for e, k in zip(self.extents, self.kept) if k)

    @property
    def in_axes(self) -> list[int]:
        """The input axis of each output axis."""
        return [d for d, k in enumerate(self.kept) if k]


def _counted(extent: int, window: tuple[int, int, int, int], low: int, high: int) -> np.ndarray:
    """How many of the window positions of each output index j < extent lie in [low, high)."""
    kernel, stride, dilation, pad = window
    pos = np.arange(extent)[:, None] * stride - pad + dilation * np.arange(kernel)[None, :]
    return ((pos >= low) & (pos < high)).sum(axis=1)


def _avg_pool2d(call: relax.Call, shape, out_shape):
    """The Pooling, per-axis counts and op attributes of an NCHW avg_pool2d (None for another layout)."""
    a = call.attrs
    if str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW":
        return None
    attrs = {n: tuple(int(v) for v in getattr(a, n)) for n in ("pool_size", "strides", "dilation", "padding")}
    attrs.update(ceil_mode=bool(a.ceil_mode), count_include_pad=bool(a.count_include_pad))
    top, left, bottom, right = attrs["padding"]
    windows = (IDENTITY, IDENTITY, *((k, s, r, p) for k, s, r, p in zip(attrs["pool_size"], attrs["strides"],
                                                                         attrs["dilation"], (top, left))))
    counts = [np.ones(1, np.int64)] * 2
    for d, after in ((2, bottom), (3, right)):
        low, high = (-windows[d][3], shape[d] + after) if attrs["count_include_pad"] else (0, shape[d])
        counts.append(np.maximum(_counted(out_shape[d], windows[d], low, high), 1))
    return Pooling(shape, windows, out_shape, (True,) * 4), counts, attrs


def _adaptive_avg_pool2d(call: relax.Call, shape, out_shape):
    """An NCHW adaptive average pool whose output size divides the input: windows of size = stride."""
    if str(call.attrs.layout) != "NCHW" or str(call.attrs.out_layout) != "NCHW" or any(
            shape[d] % out_shape[d] for d in (2, 3)):
        return None
    windows = (IDENTITY, IDENTITY, *((shape[d] // out_shape[d],) * 2 + (1, 0) for d in (2, 3)))
    counts = [np.ones(1, np.int64)] * 2 + [np.array([w[0]]) for w in windows[2:]]
    return Pooling(shape, windows, out_shape, (True,) * 4), counts, {"output_size": out_shape[2:]}


def _reduction(call: relax.Call, shape, out_shape):
    """A mean or sum over its axes (all when None)."""
    ndim = len(shape)
    axes = tuple(range(ndim)) if call.attrs.axis is None else tuple(sorted({int(a) % ndim for a in call.attrs.axis}))
    keep = bool(call.attrs.keepdims)
    windows = tuple((n, 1, 1, 0) if d in axes else IDENTITY for d, n in enumerate(shape))
    extents = tuple(1 if d in axes else n for d, n in enumerate(shape))
    mean = call.op.name == "relax.mean"
    counts = [np.array([n if mean and d in axes else 1]) for d, n in enumerate(shape)]
    return Pooling(shape, windows, extents, tuple(keep or d not in axes for d in range(ndim))), counts, {
        "axes": axes, "keepdims": keep}


SPECS = {"relax.nn.avg_pool2d": _avg_pool2d, "relax.nn.adaptive_avg_pool2d": _adaptive_avg_pool2d,
         "relax.mean": _reduction, "relax.sum": _reduction}


def count_table(pooling: Pooling, counts: list[np.ndarray]) -> np.ndarray:
    """int64 n of every output position, of the output's rank, extent 1 along the axes where it is constant:
    the product of the per-axis counts (one per output index along each input axis)."""
    table = np.ones([1] * len(pooling.out_shape), np.int64)
    for d, c in enumerate(counts):
        c = c[:1] if np.all(c == c[0]) else c
        shape = [1] * table.ndim
        if pooling.kept[d]:
            shape[pooling.in_axes.index(d)] = c.size
        table = table * c.astype(np.int64).reshape(shape)
    return table


def pool_primfunc(pooling: Pooling, axis: int, width: int, varying: tuple[int, ...], classes: int, acc_dtype: str,
                  left_shift: bool, out_dtype: str = "int8"):
    """PrimFunc(x, z, [cls,] q, ls, rs, c, zp, out): the window sum of x - z (acc_dtype), requantized.

        acc = sum over the window of (x - z[ch])        zero outside the input
        out = requantize(acc, params[cls[pos] * width + ch])

    z is (width,), one per channel along the output's `axis` (one in all when width is 1); cls (int32), over
    the output axes `varying`, gives each position its count class when there are several; q, ls, rs, c,
    zp hold classes * width values. pooled is its numpy twin.
    """
    x = placeholder(pooling.shape, "int8", "x")
    z = placeholder((width,), "int32", "z")
    out_shape = pooling.out_shape
    cls = placeholder([out_shape[a] for a in varying], "int32", "cls") if varying else None
    q, ls, rs, c, zp = requant_placeholders(classes * width)
    red = {d: te.reduce_axis((0, w[0]), name=f"k{d}") for d, w in enumerate(pooling.windows) if w[0] > 1}

    def total(*o):
        j = iter(o)
        index, inside = [], []
        for d, ((kernel, stride, dilation, pad), n, e) in enumerate(zip(pooling.windows, pooling.shape,
                                                                          pooling.extents)):
            i = (next(j) if pooling.kept[d] else 0) * stride - pad
            i = i + dilation * red[d] if d in red else i
            index.append(i)
            if pad > 0:
                inside.append(i >= 0)
            if (e - 1) * stride - pad + dilation * (kernel - 1) >= n:
                inside.append(i < n)
        ch = o[axis] if width > 1 else 0
        v = x(*index).astype(acc_dtype) - z[ch].astype(acc_dtype)
        if inside:
            v = tirx.if_then_else(tirx.all(*inside), v, tirx.const(0, acc_dtype))
        return te.sum(v, axis=list(red.values())) if red else v

    acc = te.compute(dims(out_shape), total, name="window_sum")

    def body(*o):
        ch = o[axis] if width > 1 else 0
        k = cls(*(o[a] for a in varying)) * width if varying else 0
        return requantized(acc(*o).astype("int64"), q, ls, rs, c, zp, k + ch, left_shift, out_dtype)

    args = [x, z, *([cls] if varying else []), q, ls, rs, c, zp]
    return te.create_prim_func([*args, te.compute(dims(out_shape), body, name="pool")])


def _channel_axis(pooling: Pooling, x, out) -> int | None:
    """The output axis the scales and zero points vary along (out's when none varies), or None when they vary
    along a pooled axis or along more than one."""
    axes = channel_axes(x) | {pooling.in_axes[a] for a in channel_axes(out)}
    if not axes:
        return out.axis
    d = axes.pop()
    if axes or d not in pooling.in_axes or pooling.windows[d] != IDENTITY:
        return None
    return pooling.in_axes.index(d)


def _scaled(s_o: np.ndarray, count: int, where: str) -> np.ndarray:
    """count * s_o in float64: exact for a float32 scale and count below 2^29."""
    if count >= MAX_COUNT or np.any(s_o.astype(np.float32) != s_o):
        raise HyqError(f"{where}: averages {count} elements (at most 2^29) or its output scale is not a float32"
                       " value: count * s_o would not be exact")
    return s_o * count


def rewrite(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """The pool kernel, or root for another layout, an adaptive pool whose output size does not divide its
    input, a reduction to a scalar, or scales varying along a pooled axis."""
    call, dq = m[_POOL], m[_INPUT]
    where = ctx.where(call, dq)
    spec = SPECS[call.op.name](call, shape_of(dq.args[0], where), shape_of(root, where))
    if spec is None:
        return root
    pooling, counts, op_attrs = spec
    if not pooling.out_shape:  # a scalar has no quantization axis
        return root
    x, out = operand(dq, where), output(root, where)
    axis = _channel_axis(pooling, x, out)
    if axis is None:
        return root
    channels, d = pooling.out_shape[axis], pooling.in_axes[axis]
    s_in, z_in = (per_channel(v, x, d, channels, f"the input {what}", where)
                  for v, what in ((x.scale, "scale"), (x.zero_point, "zero point")))
    s_o, z_o = (per_channel(v, out, axis, channels, f"the output {what}", where)
                for v, what in ((out.scale, "scale"), (out.zero_point, "zero point")))
    width = max(np.size(v) for v in (s_in, z_in, s_o, z_o))
    table = count_table(pooling, counts)
    classes, index = np.unique(table, return_inverse=True)
    span = np.maximum(127 - z_in, z_in + 128)
    bound = span * int(np.prod([min(w[0], n) for w, n in zip(pooling.windows, pooling.shape)]))
    params = [requant_params(s_in, _scaled(s_o, int(n), where), z_o, None, bound, where) for n in classes]
    params = [np.concatenate([np.broadcast_to(p[i], (width,)) for p in params]) for i in range(5)]
    varying = tuple(a for a, e in enumerate(table.shape) if e > 1)
    acc_dtype = "int32" if np.max(bound) <= INT32_MAX else "int64"
    out_dtype = str(root.attrs.out_dtype)
    key = ("pool", pooling, axis, width, varying, classes.size, acc_dtype, bool(np.any(params[1])), out_dtype)
    gv = ctx.kernel(key, lambda: pool_primfunc(*key[1:]))
    cls = [index.reshape([table.shape[a] for a in varying]).astype(np.int32)] if varying else []
    attrs = {"pooling": pooling, "counts": table, "op_attrs": op_attrs}
    ctx.record(root, dq, "pool", attrs, (x.data,), None, (x.zero_point,), bias=None, acc_scale=s_in, axis=axis,
               out_scale=s_o, out_zero_point=z_o, out_dtype=out_dtype,
               real=RealParams((x.scale,), function=call.op.name))
    arrays = [np.broadcast_to(z_in, (width,)).astype(np.int32), *cls, *params]
    return relax.call_tir(gv, [x.data, *consts(arrays)], relax.TensorType(pooling.out_shape, out_dtype))


def window_sum(x_q, zero_point, pooling: Pooling, axis: int) -> np.ndarray:
    """int64 sum of x - z over every window (zero outside the input), in the output's shape; z () or per channel
    along the output's `axis`."""
    x = np.asarray(x_q, np.int64) - along(zero_point, pooling.in_axes[axis], len(pooling.shape)).astype(np.int64)
    x = np.pad(x, [(w[3], max(0, (e - 1) * w[1] + w[2] * (w[0] - 1) + 1 - n - w[3]))
                   for w, n, e in zip(pooling.windows, pooling.shape, pooling.extents)])
    total = np.zeros(pooling.extents, np.int64)
    for offsets in itertools.product(*(range(w[0]) for w in pooling.windows)):
        total += x[tuple(slice(w[2] * t, w[2] * t + w[1] * (e - 1) + 1, w[1])
                         for t, w, e in zip(offsets, pooling.windows, pooling.extents))]
    return total.reshape(pooling.out_shape)


def pooled(x_q, zero_point, pooling: Pooling, counts: np.ndarray, in_scale, out_scale, out_zero_point, axis: int,
           out_dtype: str = "int8") -> np.ndarray:
    """The window sums requantized with the Q31 multiplier of s_in / (n * s_o), n from `counts` (count_table)."""
    acc = window_sum(x_q, zero_point, pooling, axis)
    ndim = acc.ndim
    ratio = exact_ratio(along(in_scale, axis, ndim), along(out_scale, axis, ndim)) / counts.astype(object)
    q, shift = fixed_point_multiplier(ratio)
    info = np.iinfo(out_dtype)
    return requantize(acc, q, shift, along(out_zero_point, axis, ndim), int(info.min), int(info.max), out_dtype)


def reference(layer: IntegerLayer, values: dict) -> np.ndarray:
    return pooled(values[layer.inputs[0]], layer.zero_points[0], layer.attrs["pooling"], layer.attrs["counts"],
                  layer.acc_scale, layer.out_scale, layer.out_zero_point, layer.axis, layer.out_dtype)


POOL = Rule("pool", PATTERN, rewrite, reference)
