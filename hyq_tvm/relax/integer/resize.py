"""Image resizes of int8 tensors: quantize(image.resize2d(dequantize(x_q))), nearest or bilinear, NCHW or NHWC.

Along each spatial axis every output coordinate reads one (nearest) or two (linear) input coordinates with
exact rational weights (`axis_taps`, from the op's coordinate transformation and rounding method); with D the
product of the weights' common denominators along H and W, the kernel sums acc = sum W (x - z) with integer
weights W = w_h * w_w * D in int32 and requantizes it with the exact multiplier s_in / (D * s_o). A resize with
integer weights (nearest) onto its own input grid is a pure gather. Weights needing D > MAX_DENOMINATOR, cubic
resizes, other layouts and coordinate modes, and scales varying along another axis than the channels stay in float.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from tvm import relax, te
from tvm.relax.dpl import is_const, is_op, wildcard

from .kernel import dims, placeholder
from .operand import along, channel_axes, consts, operand, output, per_channel, shape_of
from .requantize import requant_params, requant_placeholders, requantize_acc, requantized
from .rule import Context, IntegerLayer, RealParams, Rule

MAX_DENOMINATOR = 1 << 16

# (H, W) and channel axis of each supported layout
LAYOUTS = {"NCHW": ((2, 3), 1), "NHWC": ((1, 2), 3)}

_HALF = Fraction(1, 2)

# The exact source coordinate of output coordinate o along an axis of n inputs and m outputs.
COORDINATES = {
    "half_pixel": lambda o, n, m: (o + _HALF) * Fraction(n, m) - _HALF,
    "pytorch_half_pixel": lambda o, n, m: (o + _HALF) * Fraction(n, m) - _HALF if m > 1 else Fraction(0),
    "align_corners": lambda o, n, m: Fraction((n - 1) * o, m - 1),
    "asymmetric": lambda o, n, m: Fraction(n * o, m),
}

# The nearest input coordinate of an exact source coordinate ("round": half to even, as TVM's round).
ROUNDINGS = {
    "round": round,
    "round_prefer_floor": lambda c: math.ceil(c - _HALF),
    "round_prefer_ceil": lambda c: math.floor(c + _HALF),
    "floor": math.floor,
    "ceil": math.ceil,
}

_INPUT = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_RESIZE = is_op("relax.image.resize2d")(_INPUT, wildcard())
PATTERN = is_op("relax.quantize")(_RESIZE, is_const(), is_const())


def axis_taps(n: int, m: int, method: str, mode: str, rounding: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(indices, weights, d) of a resize of n input coordinates to m along one axis: int32 (m, taps) input
    coordinates (clamped to the input; both taps of one coordinate merged into the first) and integer weights
    w * d of each output coordinate, d the least common denominator of the exact weights w; None for a method,
    mode or rounding method not lowered (or align_corners onto one)."""
    if mode not in COORDINATES or (mode == "align_corners" and m == 1):
        return None

    def clamped(i: int) -> int:
        return min(max(i, 0), n - 1)

    sources = [COORDINATES[mode](o, n, m) for o in range(m)]
    if method == "nearest_neighbor":
        rounding = rounding or ("round" if mode == "align_corners" else "floor")
        if rounding not in ROUNDINGS:
            return None
        taps = [[(clamped(ROUNDINGS[rounding](c)), Fraction(1))] for c in sources]
    elif method == "linear":
        taps = []
        for c in sources:
            low, f = clamped(math.floor(c)), c - math.floor(c)
            high = clamped(math.floor(c) + 1)
            taps.append([(low, Fraction(1)), (high, Fraction(0))] if low == high else [(low, 1 - f), (high, f)])
    else:
        return None
    d = math.lcm(*(w.denominator for row in taps for _, w in row))
    indices = np.array([[i for i, _ in row] for row in taps], np.int32)
    weights = np.array([[int(w * d) for _, w in row] for row in taps], np.int32)
    return indices, weights, d


def resize_primfunc(in_shape, out_shape, spatial: tuple[int, int], taps: tuple[int, int], axis: int, channels: int,
                    left_shift: bool, out_dtype: str = "int8"):
    """PrimFunc(x, ih, wh, iw, ww, z, q, ls, rs, c, zp, out): an int8 x resized along its `spatial` axes (H, W),

        acc[.., y, x, ..] = sum_j,k wh[y, j] * ww[x, k] * (x[.., ih[y, j], iw[x, k], ..] - z)   (int32)
        out = requantize(acc, q, ls, rs, c, zp)

    with `taps` (input coordinates per output coordinate) along H and W in the int32 tables ih, wh (H_out, taps[0])
    and iw, ww (W_out, taps[1]); z and the requantization parameters hold one value per channel along `axis`
    (one in all when channels is 1). resized is its numpy twin."""
    (h, w), (th, tw) = spatial, taps
    x = placeholder(in_shape, "int8", "x")
    ih, wh = (placeholder((out_shape[h], th), "int32", n) for n in ("ih", "wh"))
    iw, ww = (placeholder((out_shape[w], tw), "int32", n) for n in ("iw", "ww"))
    z = placeholder((channels,), "int32", "z")
    q, ls, rs, c, zp = requant_placeholders(channels)

    def body(*i):
        ch = i[axis] if channels > 1 else 0
        acc = 0
        for j in range(th):
            for k in range(tw):
                at = list(i)
                at[h], at[w] = ih[i[h], j].astype("int64"), iw[i[w], k].astype("int64")
                acc = acc + wh[i[h], j] * ww[i[w], k] * (x(*at).astype("int32") - z[ch])
        return requantized(acc.astype("int64"), q, ls, rs, c, zp, ch, left_shift, out_dtype)

    return te.create_prim_func([x, ih, wh, iw, ww, z, q, ls, rs, c, zp,
                                te.compute(dims(out_shape), body, name="resize")])


def gather_primfunc(in_shape, out_shape, spatial: tuple[int, int]):
    """PrimFunc(x, ih, iw, out): out[.., y, x, ..] = x[.., ih[y, 0], iw[x, 0], ..], a nearest resize of an int8 x
    along its `spatial` axes (H, W) by the int32 tables ih (H_out, 1) and iw (W_out, 1)."""
    h, w = spatial
    x = placeholder(in_shape, "int8", "x")
    ih, iw = placeholder((out_shape[h], 1), "int32", "ih"), placeholder((out_shape[w], 1), "int32", "iw")

    def body(*i):
        at = list(i)
        at[h], at[w] = ih[i[h], 0].astype("int64"), iw[i[w], 0].astype("int64")
        return x(*at)

    return te.create_prim_func([x, ih, iw, te.compute(dims(out_shape), body, name="gather")])


def rewrite(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """The resize kernel (the gather kernel for integer weights onto the input grid), or root when the match
    stays in float."""
    call, dq = m[_RESIZE], m[_INPUT]
    attrs = call.attrs
    if str(attrs.layout) not in LAYOUTS:
        return root
    where = ctx.where(call, dq)
    (h, w), axis = LAYOUTS[str(attrs.layout)]
    in_shape, out_shape = shape_of(dq.args[0], where), shape_of(root, where)
    method, mode, rounding = (str(v) for v in (attrs.method, attrs.coordinate_transformation_mode,
                                               attrs.rounding_method))
    taps = [axis_taps(in_shape[a], out_shape[a], method, mode, rounding) for a in (h, w)]
    if any(t is None for t in taps):
        return root
    (ih, wh, dh), (iw, ww, dw) = taps
    denominator = dh * dw
    x, out = operand(dq, where), output(root, where)
    if denominator > MAX_DENOMINATOR or not channel_axes(x, out) <= {axis}:
        return root
    channels = in_shape[axis]
    s_in, z_in, s_o, z_o = (per_channel(v, o, axis, channels, what, where) for v, o, what in (
        (x.scale, x, "the input scale"), (x.zero_point, x, "the input zero point"),
        (out.scale, out, "the output scale"), (out.zero_point, out, "the output zero point")))
    out_dtype = str(root.attrs.out_dtype)
    gather = (denominator == 1 and out_dtype == "int8" and np.array_equal(s_in, s_o)
              and np.array_equal(z_in, z_o))
    if gather:
        key = ("resize_gather", in_shape, out_shape, (h, w))
        args = [np.ascontiguousarray(t[:, :1]) for t in (ih, iw)]  # the first tap, of weight 1
    else:
        width = np.broadcast(s_in, z_in, s_o, z_o).size
        bound = np.maximum(127 - z_in, z_in + 128) * denominator  # |acc| at most
        params = [np.broadcast_to(p, (width,)) for p in requant_params(
            s_in, denominator * s_o, z_o, None, bound, where)]
        key = ("resize", in_shape, out_shape, (h, w), (ih.shape[1], iw.shape[1]), axis, width,
               bool(np.any(params[1])), out_dtype)
        args = [ih, wh, iw, ww, np.broadcast_to(z_in, (width,)).astype(np.int32), *params]
    gv = ctx.kernel(key, lambda: (gather_primfunc if gather else resize_primfunc)(*key[1:]))
    ctx.record(root, dq, "resize", {"indices": (ih, iw), "weights": (wh, ww), "denominator": denominator,
                                    "scale": s_in, "spatial": (h, w), "gather": gather, "method": method,
                                    "mode": mode, "rounding": rounding, "size": (out_shape[h], out_shape[w])},
               (x.data,), None, (z_in,), bias=None, acc_scale=s_in / denominator, axis=axis, out_scale=s_o,
               out_zero_point=z_o, out_dtype=out_dtype, real=RealParams((s_in,)))
    return relax.call_tir(gv, [x.data, *consts(args)], relax.TensorType(out_shape, out_dtype))


def interpolated(x_q, zero_point, indices, weights, spatial: tuple[int, int], axis: int) -> np.ndarray:
    """int64 acc = sum_j,k wh[y, j] * ww[x, k] * (x[.., ih[y, j], iw[x, k], ..] - z) of an int8 tensor along its
    `spatial` axes (H, W); z () or per channel along `axis`."""
    (ih, iw), (wh, ww), (h, w) = indices, weights, spatial
    x = np.asarray(x_q, np.int64) - np.asarray(along(zero_point, axis, np.ndim(x_q)), np.int64)
    acc = 0
    for j in range(ih.shape[1]):
        for k in range(iw.shape[1]):
            gathered = np.take(np.take(x, ih[:, j], axis=h), iw[:, k], axis=w)
            acc = acc + gathered * along(wh[:, j], h, x.ndim).astype(np.int64) * along(ww[:, k], w, x.ndim)
    return acc


def resized(x_q, zero_point, indices, weights, denominator: int, spatial: tuple[int, int], in_scale, out_scale,
            out_zero_point, axis: int, out_dtype: str = "int8") -> np.ndarray:
    """The interpolated sum (scale in_scale / denominator) requantized to (out_scale, out_zero_point)."""
    acc = interpolated(x_q, zero_point, indices, weights, spatial, axis)
    return requantize_acc(acc, in_scale, denominator * np.asarray(out_scale, np.float64), out_zero_point, axis,
                          out_dtype)


def reference(layer: IntegerLayer, values: dict) -> np.ndarray:
    """The gathered input, or the interpolated sum requantized."""
    x, attrs = values[layer.inputs[0]], layer.attrs
    if attrs["gather"]:
        (ih, iw), (h, w) = attrs["indices"], attrs["spatial"]
        return np.take(np.take(x, ih[:, 0], axis=h), iw[:, 0], axis=w)
    return resized(x, layer.zero_points[0], attrs["indices"], attrs["weights"], attrs["denominator"],
                   attrs["spatial"], attrs["scale"], layer.out_scale, layer.out_zero_point, layer.axis,
                   layer.out_dtype)


RESIZE = Rule("resize", PATTERN, rewrite, reference)
