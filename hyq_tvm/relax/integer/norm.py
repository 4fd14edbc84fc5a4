"""Integer normalization (full mode): a quantized LayerNorm over the last axis, or GroupNorm with one group
(NCHW), of a dequantized int8 tensor with per-channel input scales becomes all channels on one integer
grid, int64 mean and variance, an integer square root and the affine output in fixed point.
Other norms stay float islands."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from tvm import relax, te, tirx
from tvm.relax.dpl import is_const, is_op, wildcard

from ...errors import HyqError
from ..requant import exact_ratio
from .kernel import dims, placeholder, saturated
from .operand import along, channel_axes, consts, operand, output, shape_of
from .rule import Context, IntegerLayer, RealParams, Rule

NORM_INPUT_BITS = 16  # at most: the widest input channel's step is 2^16 grid steps (|t| < 2^24), so that
                      # the variance stays below 2^52, where the float64 square root is exact

_INPUT = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_LAYER_NORM = is_op("relax.nn.layer_norm")(_INPUT, is_const(), is_const())
_GROUP_NORM = is_op("relax.nn.group_norm")(_INPUT, is_const(), is_const())
PATTERN = is_op("relax.quantize")(_LAYER_NORM | _GROUP_NORM, is_const(), is_const())


@dataclass(frozen=True)
class NormParams:
    """Integer constants of a normalization of int8 inputs with per-channel scales s_c and zero points z_c.

    t = (x - z_c) * multiplier_c puts every channel on one grid, of step max(s_c) * 2^-input_bits; gain_c
    and offset_c are gamma_c / s_o_c and beta_c / s_o_c (output steps) with `shift` fractional bits.
    """

    multiplier: np.ndarray  # int64 (C,)
    eps: int                # epsilon on the grid of t^2
    gain: np.ndarray        # int64 (C,)
    offset: np.ndarray      # int64 (C,)
    shift: int              # fractional bits of gain and offset


def _nearest(x: Fraction) -> int:
    """floor(x + 1/2) of an exact rational."""
    return math.floor(x + Fraction(1, 2))


def norm_params(in_scale, gamma, beta, out_scale, eps: float, channels: int, count: int) -> NormParams:
    """The NormParams of a LayerNorm / GroupNorm(1) over `count` elements with these float parameters
    (arrays () or (C,)), chosen so that no int64 term of the kernel overflows for int8 inputs (|x - z| < 2^8);
    every rounding (half up) is of the exact rational.

    Input grid: |t| < 2^(8 + b) with b input bits, |d| < 2^(9 + b), sum(d^2) < count * 2^(18 + 2b) < 2^62.
    Output: |d * gain| and |offset * sigma| < 2^61 with sigma < 2^(9 + b), so |gain|, |offset| < 2^(52 - b).
    """
    input_bits = min(NORM_INPUT_BITS, (62 - 18 - (count - 1).bit_length()) // 2)  # (count - 1).bit_length(): ceil(log2)
    s_in = np.broadcast_to(exact_ratio(in_scale, 1.0), (channels,))
    unit = s_in.max() / (1 << input_bits)
    multiplier = np.array([_nearest(s / unit) for s in s_in], np.int64)
    eps_steps = _nearest(Fraction(eps) / unit ** 2)
    ratio = [np.broadcast_to(exact_ratio(v, out_scale), (channels,)) for v in (gamma, beta)]
    largest = max(abs(v) for r in ratio for v in r)
    shift = min(30, 52 - input_bits - (math.ceil(largest + 1) - 1).bit_length())  # the bits of largest + 1
    if shift < 8 or eps_steps >= 2 ** 51:
        raise HyqError(f"a norm's gain or offset ({float(largest):g} output steps) or epsilon ({eps_steps} grid steps)"
                       " is too large for the integer norm")
    gain, offset = (np.array([_nearest(v * (1 << shift)) for v in r], np.int64) for r in ratio)
    return NormParams(multiplier, eps_steps, gain, offset, shift)


INVERSE_BITS = 52   # the integer norm's per-row reciprocal 2^52 // sigma


def norm_primfunc(shape, axis: int, reduce_axes: tuple[int, ...], shift: int, out_dtype: str = "int8"):
    """PrimFunc(x, z, m, g, b, zp, eps, out): a LayerNorm / GroupNorm(1) of int8 x over `reduce_axes`, quantized.

        t = (x - z) * m                   each channel (along `axis`) on one integer grid, int64
        mu = floor(sum(t) / n + 1/2)      n: the number of reduced elements
        d = t - mu
        sigma = max(isqrt(floor(sum(d^2) / n) + eps), 1)
        out = clip(floor((d * g + b * sigma) / (sigma << shift) + 1/2) + zp)

    without a division per element: the quotient floor(a / sigma) of a = (numerator >> shift), a first clamped to
    [(qmin - 1 - zp) * sigma, (qmax + 1 - zp) * sigma] (the clip gives the same output), is guessed as
    (a * (2^52 // sigma)) >> 52 (|a * (2^52 // sigma)| <= 256 * 2^52; the guess is off the true a / sigma by less
    than |a| / 2^52 < 1, so it is the quotient or one off) and corrected by the sign and size of a - guess * sigma.

    z, m, g, b, zp are per channel along `axis`; eps is a 1-element int64 tensor; g and b have `shift`
    fractional bits. isqrt is the correctly rounded float64 sqrt, floored: exact (and the same on every
    IEEE machine) for arguments below 2^52, which norm_params keeps the variance under.
    integer_norm is its numpy twin.
    """
    x = placeholder(shape, "int8", "x")
    channels = shape[axis]
    z = placeholder((channels,), "int32", "z")
    m, g, b = (placeholder((channels,), "int64", n) for n in ("m", "g", "b"))
    zp = placeholder((channels,), "int32", "zp")
    eps = placeholder((1,), "int64", "eps")
    kept = [i for i in range(len(shape)) if i not in reduce_axes]
    count = int(np.prod([shape[i] for i in reduce_axes]))

    def t_of(i):
        return (x(*i).astype("int64") - z[i[axis]].astype("int64")) * m[i[axis]]

    def full_index(row, red):
        index, r, k = [None] * len(shape), iter(row), iter(red)
        for i in range(len(shape)):
            index[i] = next(k) if i in reduce_axes else next(r)
        return index

    row_shape = [shape[i] for i in kept]

    def reduce(name, value):
        def body(*row):
            red = [te.reduce_axis((0, shape[i]), name=f"{name}{i}") for i in reduce_axes]
            return te.sum(value(full_index(row, red), row), axis=red)
        return te.compute(dims(row_shape), body, name=name)

    total = reduce("total", lambda i, row: t_of(i))
    mean = te.compute(dims(row_shape), lambda *row: tirx.floordiv(total(*row) + count // 2, count), name="mean")
    square = reduce("square", lambda i, row: (t_of(i) - mean(*row)) * (t_of(i) - mean(*row)))

    def sigma_of(*row):
        var = tirx.floordiv(square(*row), count) + eps[0]
        return te.max(tirx.floor(tirx.sqrt(var.astype("float64"))).astype("int64"), tirx.const(1, "int64"))

    sigma = te.compute(dims(row_shape), sigma_of, name="sigma")
    inverse = te.compute(dims(row_shape), lambda *row: tirx.floordiv(tirx.const(1 << INVERSE_BITS, "int64"),
                                                                      sigma(*row)), name="inverse")
    info = np.iinfo(out_dtype)

    def body(*i):   # floor(num / (s << shift)) = floor(a / s), a = num >> shift: see the docstring
        row = [i[k] for k in kept]
        ch = i[axis]
        s, z = sigma(*row), zp[ch].astype("int64")
        num = (t_of(i) - mean(*row)) * g[ch] + b[ch] * s + (s << (shift - 1))
        a = te.max(te.min(num >> shift, (int(info.max) + 1 - z) * s), (int(info.min) - 1 - z) * s)
        guess = (a * inverse(*row)) >> INVERSE_BITS
        rest = a - guess * s
        quotient = guess - (rest < 0).astype("int64") + (rest >= s).astype("int64")
        return saturated(quotient + z, out_dtype)

    return te.create_prim_func([x, z, m, g, b, zp, eps, te.compute(dims(shape), body, name="norm")])


def rewrite(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """The integer norm kernel, or root for a norm over other axes or with scales along another axis."""
    call = m[_LAYER_NORM] if _LAYER_NORM in m else m[_GROUP_NORM]
    where = ctx.where(call)
    shape = shape_of(root, where)
    ndim = len(shape)
    if call.op.name == "relax.nn.layer_norm":
        axes = tuple(int(a) % ndim for a in call.attrs.axes)
        axis, reduce_axes = ndim - 1, (ndim - 1,)
        plain = axes == reduce_axes and bool(call.attrs.center) and bool(call.attrs.scale)
    else:
        axis, reduce_axes = 1, (1, 2, 3)
        plain = (ndim == 4 and int(call.attrs.num_groups) == 1 and int(call.attrs.channel_axis) % ndim == 1
                 and tuple(int(a) % ndim for a in call.attrs.axes) == (2, 3)
                 and bool(call.attrs.center) and bool(call.attrs.scale))
    x = operand(m[_INPUT], where)
    out = output(root, where)
    if not plain or not channel_axes(x, out) <= {axis}:
        return root
    channels = shape[axis]
    z_in, z_o = (np.broadcast_to(o.zero_point, (channels,)) for o in (x, out))
    gamma, beta = (c.value.numpy().astype(np.float64).reshape(-1) for c in call.args[1:3])
    count = int(np.prod([shape[i] for i in reduce_axes]))
    params = norm_params(x.scale, gamma, beta, out.scale, float(call.attrs.epsilon), channels, count)
    out_dtype = str(root.attrs.out_dtype)
    key = ("norm", shape, axis, reduce_axes, params.shift, out_dtype)
    gv = ctx.kernel(key, lambda: norm_primfunc(*key[1:]))
    arrays = [z_in.astype(np.int32), params.multiplier, params.gain, params.offset, z_o.astype(np.int32),
              np.array([params.eps], np.int64)]
    real = RealParams((x.scale,), args=(float(call.attrs.epsilon),), gamma=gamma, beta=beta)
    ctx.record(root, m[_INPUT], "norm", {"params": params, "reduce_axes": reduce_axes}, (x.data,), None,
               (x.zero_point,), bias=None, acc_scale=np.float64(1.0), axis=axis, out_scale=out.scale,
               out_zero_point=out.zero_point, out_dtype=out_dtype, real=real)
    return relax.call_tir(gv, [x.data, *consts(arrays)], relax.TensorType(shape, out_dtype))


def integer_norm(x_q, zero_point, params: NormParams, out_zero_point, axis: int, reduce_axes: tuple[int, ...],
                 out_dtype: str = "int8") -> np.ndarray:
    """A LayerNorm / GroupNorm(1) of an int8 tensor over `reduce_axes`, on the integer grid of `params`,
    requantized: round(d * gain / sigma + offset) + z_o, sigma = max(isqrt(mean(d^2) + eps), 1)."""
    ndim = np.ndim(x_q)
    t = (np.asarray(x_q, np.int64) - along(zero_point, axis, ndim).astype(np.int64)) * along(params.multiplier, axis, ndim)
    count = int(np.prod([np.shape(x_q)[i] for i in reduce_axes]))
    mean = (t.sum(axis=reduce_axes, keepdims=True) + count // 2) // count
    d = t - mean
    var = (d * d).sum(axis=reduce_axes, keepdims=True) // count + params.eps
    sigma = np.maximum(np.floor(np.sqrt(var.astype(np.float64))).astype(np.int64), 1)
    gain, offset = (along(v, axis, ndim) for v in (params.gain, params.offset))
    num = d * gain + offset * sigma + (sigma << (params.shift - 1))
    out = num // (sigma << params.shift) + along(out_zero_point, axis, ndim).astype(np.int64)
    info = np.iinfo(out_dtype)
    return np.clip(out, info.min, info.max).astype(out_dtype)


def reference(layer: IntegerLayer, values: dict) -> np.ndarray:
    return integer_norm(values[layer.inputs[0]], layer.zero_points[0], layer.attrs["params"], layer.out_zero_point,
                        layer.axis, layer.attrs["reduce_axes"], layer.out_dtype)


NORM = Rule("norm", PATTERN, rewrite, reference)
