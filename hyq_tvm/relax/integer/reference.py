"""The independent reference: every integer layer's result derived again from its real numbers (RealParams: the
plan's scales and zero points, the float bias, clip bounds and norm parameters, as the QDQ graph states them)
with exact arithmetic, by the rules README.md documents, without the integerizer's helpers (requant.py, the
rules' parameter functions, tables and numpy twins), so that a bug in either shows up as a mismatch.

    Q31 multiplier   q31(M) of an exact rational M > 0: e with 2^(e-1) <= M < 2^e, shift = max(e, -31),
                     q = floor(M * 2^(31 - shift) + 1/2) (2^31 becomes 2^30 with shift + 1), shift <= 31
    requantization   M = s_a * s_w / s_o and b = bias / (s_a * s_w), exact; L = max(shift, 0),
                     R = 31 + max(-shift, 0), c = 2^(R - 1) + floor(b * q * 2^L + 1/2):
                     y = clip(floor((acc * q * 2^L + c) / 2^R) + z_o), then a ReLU / clip as its quantized
                     bounds (round half to even(bound / s_o) + z_o)
    float output     float32(acc) * float32(s_a * s_w)
    sum / concat     y = clip(floor(sum_i (x_i - z_i) * q_i * 2^(shift_i - 31) + 1/2) + z_o), q31(s_i / s_o)
                     (requantize: one input)
    subtract /       y = clip(floor(sum_i (x_i - z_i) * sign(M_i) * q_i * 2^(shift_i - 31) + floor(B * 2^R + 1/2) / 2^R
    affine           + 1/2) + z_o) for the exact y = sum_i M_i (x_i - z_i) + B in output steps, (q_i, shift_i) =
                     q31(|M_i|) ((0, 0) for M_i = 0), R = 31 + max(0, max_i -shift_i); subtract: M = (s_a / s_o,
                     -s_b / s_o), B = 0; affine: its constant steps folded exactly into v -> a * v + b,
                     M = a * s_in / s_o (per channel), B = b / s_o (per channel or per element)
    lookup           table[x] = clip(round half to even(f(s_in * (x - z_in)) / s_o) + z_o), f exact (ReLU,
                     leaky ReLU, clip) or to 160 bits (mpmath)
    softmax          e = floor(exp(-s_in * (max - x)) * 2^30 + 1/2) (exp to 160 bits), p = floor(e * 2^30 / sum e),
                     requantized with M = 2^-30 / s_o
    norm             b = min(16, (44 - ceil(log2 n)) // 2), unit = max_c s_c * 2^-b, m_c = round(s_c / unit),
                     eps = round(epsilon / unit^2), shift = min(30, 52 - b - ceil(log2(max |gamma, beta| / s_o + 1))),
                     gain_c, offset_c = round(gamma_c / s_o_c * 2^shift), round(beta_c / s_o_c * 2^shift) (round: half
                     up, of exact rationals); t = (x - z) * m, mu = floor(sum t / n + 1/2), d = t - mu,
                     sigma = max(isqrt(floor(sum d^2 / n) + eps), 1),
                     y = clip(floor((d * gain + offset * sigma) / (sigma * 2^shift) + 1/2) + z_o)
    resize           per spatial axis, output o of m (from n inputs) reads the exact coordinate c = (o + 1/2) * n / m
                     - 1/2 (half_pixel; pytorch_half_pixel: 0 when m = 1), o * (n - 1) / (m - 1) (align_corners) or
                     o * n / m (asymmetric); linear: weights 1 - f, f at floor(c), floor(c) + 1 (f = c - floor(c)),
                     nearest: 1 at round(c) (half to even; floor, ceil, round_prefer_floor / _ceil: ties down / up;
                     "": round for align_corners, else floor), inputs clamped to [0, n - 1]; A_h, A_w these weights
                     times D_h, D_w (the lcm of their denominators), acc = A_h (x - z) A_w^T,
                     requantized with M = s_in / (D_h * D_w * s_o)
    pool             acc = sum of x - z_in over each window (zero outside the input: padding, ceil_mode overhang),
                     M = s_in / (n * s_o) with n the elements averaged there: avg_pool2d: window positions inside
                     the input, or (count_include_pad) inside input and padding, at least 1; adaptive_avg_pool2d
                     (output size dividing the input), mean: the window's / reduced size; sum: 1
    product          acc = (a - z_a) * (b - z_b), broadcast, requantized with M = s_a * s_b / s_o

Per-element arithmetic is numpy int64 where an exact bound shows that every term fits, else Python integers.
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import mpmath  # a dependency of torch (through sympy)
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ...errors import HyqError

FRACTION_BITS = 31   # of the requantization multiplier q
SHIFTS = (-31, 31)   # the shifts a multiplier may take
PROB_BITS = 30       # softmax exp table entries and probabilities
NORM_BITS = 16       # the widest input channel's step on the norm grid, at most
PRECISION = 160      # bits of the transcendental functions of the tables
INT64 = 1 << 63


# -- exact numbers ------------------------------------------------------------------------------------------------

def exact(value) -> Fraction:
    """A float (float32 or float64) as the exact rational it is."""
    return Fraction(float(value))


def round_half_up(x: Fraction) -> int:
    """floor(x + 1/2)."""
    return (2 * x.numerator + x.denominator) // (2 * x.denominator)


def ceil_log2(x: Fraction) -> int:
    """The least integer k with 2^k >= x > 0."""
    k = x.numerator.bit_length() - x.denominator.bit_length()
    while Fraction(2) ** k < x:
        k += 1
    while Fraction(2) ** (k - 1) >= x:
        k -= 1
    return k


def q31(m: Fraction) -> tuple[int, int]:
    """(q, shift) of a positive rational multiplier m ~= q * 2^(shift - 31), 0 <= q < 2^31."""
    if m <= 0:
        raise HyqError(f"a multiplier must be positive, got {m}")
    e = ceil_log2(m)
    e += m == Fraction(2) ** e  # now 2^(e-1) <= m < 2^e
    shift = max(e, SHIFTS[0])
    q = round_half_up(m * Fraction(2) ** (FRACTION_BITS - shift))
    if q == 1 << FRACTION_BITS:
        q, shift = q >> 1, shift + 1
    if shift > SHIFTS[1]:
        raise HyqError(f"a multiplier of {float(m):g} needs a left shift beyond {SHIFTS[1]}")
    return q, shift


def channels(values, width: int) -> list[Fraction]:
    """Exact rationals of a scalar or per-channel float array, `width` of them."""
    flat = [exact(v) for v in np.ravel(values)]
    return flat * width if len(flat) == 1 else flat


def ints(values, width: int) -> list[int]:
    """Python integers of a scalar or per-channel integer array, `width` of them."""
    flat = [int(v) for v in np.ravel(values)]
    return flat * width if len(flat) == 1 else flat


def width_of(*arrays) -> int:
    """The number of channels of per-channel parameters (1 when all are per tensor)."""
    return max(np.size(a) for a in arrays)


def along(values: list, axis: int, ndim: int, dtype) -> np.ndarray:
    """Per-channel values (one, or one per channel along `axis`) shaped to broadcast against an ndim-array."""
    v = np.array(values, dtype=dtype)
    if v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def magnitude(a: np.ndarray) -> int:
    """The largest |value| of an integer array, as a Python int."""
    return max(abs(int(a.max())), abs(int(a.min()))) if a.size else 0


def kind(bound: int):
    """int64 when `bound` (every intermediate's magnitude, a Python int) is below 2^63, else Python integers."""
    return np.int64 if bound < INT64 else object


def saturate(values: np.ndarray, out_dtype: str) -> np.ndarray:
    info = np.iinfo(out_dtype)
    return np.minimum(np.maximum(values, int(info.min)), int(info.max)).astype(out_dtype)


# -- requantization -------------------------------------------------------------------------------------------------

def requantize(acc: np.ndarray, multipliers: list[Fraction], biases: list[Fraction], zero_points: list[int],
               axis: int, out_dtype: str) -> np.ndarray:
    """clip(floor((acc * q * 2^L + c) / 2^R) + z_o), (q, shift) = q31(M) and the bias b (accumulator steps) in c;
    lists of one value or one per channel along `axis`."""
    width = max(len(multipliers), len(biases), len(zero_points))
    multipliers, biases, zero_points = (v * (width // len(v)) for v in (multipliers, biases, zero_points))
    params = [q31(m) for m in multipliers]
    scaled = [q << max(shift, 0) for q, shift in params]
    right = [FRACTION_BITS + max(-shift, 0) for _, shift in params]
    c = [(1 << (r - 1)) + round_half_up(b * k) for b, k, r in zip(biases, scaled, right)]
    dtype = kind(magnitude(acc) * max(scaled) + max(map(abs, c)))
    ndim = acc.ndim
    num = acc.astype(dtype) * along(scaled, axis, ndim, dtype) + along(c, axis, ndim, dtype)
    out = num // along([1 << r for r in right], axis, ndim, dtype) + along(zero_points, axis, ndim, dtype)
    return saturate(out, out_dtype)


def quantized_bound(bound: float, scale: Fraction, zero_point: int, out_dtype: str) -> int:
    """A real clip bound on the output grid: round half to even(bound / s_o) + z_o, within out_dtype."""
    info = np.iinfo(out_dtype)
    if math.isinf(bound):
        return int(info.min if bound < 0 else info.max)
    return min(max(round(exact(bound) / scale) + zero_point, int(info.min)), int(info.max))


def gemm_output(acc: np.ndarray, acc_scales: list[Fraction], out_scale, out_zero_point, axis: int, out_dtype: str,
                bias=None, function: str | None = None, args: tuple[float, ...] = ()) -> np.ndarray:
    """The exact accumulator of a conv2d / matmul (real scale s_a * s_w per channel) requantized to
    (out_scale, out_zero_point) with its real bias and ReLU / clip, or (out_scale None) dequantized in float32."""
    ndim = acc.ndim
    if out_scale is None:
        if any(exact(float(s)) != s for s in acc_scales):
            raise HyqError("an accumulator scale is not a float64")
        return acc.astype(np.float32) * along([np.float32(float(s)) for s in acc_scales], axis, ndim, np.float32)
    width = max(len(acc_scales), np.size(out_scale), np.size(out_zero_point), np.size(bias))
    acc_scales = acc_scales * (width // len(acc_scales))
    s_o, z_o = channels(out_scale, width), ints(out_zero_point, width)
    b = channels(0.0 if bias is None else bias, width)
    out = requantize(acc, [a / s for a, s in zip(acc_scales, s_o)], [v / a for v, a in zip(b, acc_scales)], z_o,
                     axis, out_dtype)
    if function is None:
        return out
    if function == "relu":
        low, high = z_o, [int(np.iinfo(out_dtype).max)] * width
    elif function == "clip":
        low, high = ([quantized_bound(v, s, z, out_dtype) for s, z in zip(s_o, z_o)] for v in args)
    else:
        raise HyqError(f"the reference has no integer clamp for {function!r}")
    return np.minimum(np.maximum(out, along(low, axis, ndim, np.int64)),
                      along(high, axis, ndim, np.int64)).astype(out_dtype)


# -- conv2d / matmul ------------------------------------------------------------------------------------------------

def conv2d(x: np.ndarray, z, w: np.ndarray, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
           groups: int = 1) -> np.ndarray:
    """Exact int64 sum of (x - z) windows (NCHW, zero padded: (top, left, bottom, right)) times OIHW weights."""
    xc = x.astype(np.int64) - along(ints(z, x.shape[1]), 1, 4, np.int64)
    (sh, sw), (dh, dw), (top, left, bottom, right) = strides, dilation, padding
    o, cg, kh, kw = w.shape
    xc = np.pad(xc, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = sliding_window_view(xc, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    n, _, oh, ow = windows.shape[:4]
    windows = windows.reshape(n, groups, cg, oh, ow, kh, kw)
    wg = w.astype(np.int64).reshape(groups, o // groups, cg, kh, kw)
    return np.einsum("ngcyxij,gocij->ngoyx", windows, wg).reshape(n, o, oh, ow)


def matmul(a: np.ndarray, z_a, b: np.ndarray, z_b) -> np.ndarray:
    """Exact int64 (a - z_a) @ (b - z_b); z_a per tensor or per reduced channel (the last axis of a)."""
    za = along(ints(z_a, a.shape[-1]), a.ndim - 1, a.ndim, np.int64)
    return np.matmul(a.astype(np.int64) - za, b.astype(np.int64) - int(np.ravel(z_b)[0]))


def conv_acc_scales(in_scale, weight_scale, in_channels: int, out_channels: int, groups: int) -> list[Fraction]:
    """s_a * s_w per output channel: the input scale of its group (per input channel, equal within a group)."""
    s_in, s_w = channels(in_scale, in_channels), channels(weight_scale, out_channels)
    per_group_out, per_group_in = out_channels // groups, in_channels // groups
    return [s_in[(o // per_group_out) * per_group_in] * s_w[o] for o in range(out_channels)]


# -- residual add / concat ------------------------------------------------------------------------------------------

def rescaled(xs: list[np.ndarray], zero_points, scales, out_scale, out_zero_point, axis: int,
             out_dtype: str) -> np.ndarray:
    """clip(floor(sum_i (x_i - z_i) * q_i * 2^(shift_i - 31) + 1/2) + z_o) with (q_i, shift_i) = q31(s_i / s_o)
    per channel along `axis`."""
    ndim = xs[0].ndim
    width = width_of(*zero_points, *scales, out_scale, out_zero_point)
    s_o = channels(out_scale, width)
    params = [[q31(s / o) for s, o in zip(channels(s_i, width), s_o)] for s_i in scales]
    right = [FRACTION_BITS + max(0, *(-p[ch][1] for p in params)) for ch in range(width)]
    k = [[q << (shift - FRACTION_BITS + r) for (q, shift), r in zip(p, right)] for p in params]
    centered = [x.astype(np.int64) - along(ints(z, width), axis, ndim, np.int64) for x, z in zip(xs, zero_points)]
    dtype = kind(sum(magnitude(c) * max(k_i) for c, k_i in zip(centered, k)) + (1 << max(right)))
    total = along([1 << (r - 1) for r in right], axis, ndim, dtype)
    for c, k_i in zip(centered, k):
        total = total + c.astype(dtype) * along(k_i, axis, ndim, dtype)
    out = total // along([1 << r for r in right], axis, ndim, dtype) + along(ints(out_zero_point, width), axis,
                                                                              ndim, dtype)
    return saturate(out, out_dtype)


def concatenated(xs: list[np.ndarray], zero_points, scales, out_scale, out_zero_point, axis: int, dim: int,
                 out_dtype: str) -> np.ndarray:
    """Each input rescaled to the output grid, then concatenated along `dim`; per-channel output parameters
    along `dim` (= axis) split among the inputs."""
    start, parts = 0, []
    for x, z, s in zip(xs, zero_points, scales):
        out = [np.ravel(v) for v in (out_scale, out_zero_point)]
        if dim == axis:
            out = [v[start:start + x.shape[dim]] if v.size > 1 else v for v in out]
        parts.append(rescaled([x], [z], [s], *out, axis, out_dtype))
        start += x.shape[dim]
    return np.concatenate(parts, axis=dim)


# -- lookup ---------------------------------------------------------------------------------------------------------

def _clip(v: Fraction, low: float, high: float) -> Fraction:
    """v clipped to [low, high], either bound possibly infinite."""
    v = v if math.isinf(low) else max(v, exact(low))
    return v if math.isinf(high) else min(v, exact(high))


RATIONAL = {  # f on exact rationals, with the op's real arguments
    "relax.nn.relu": lambda v, args: max(v, Fraction(0)),
    "relax.nn.leakyrelu": lambda v, args: v if v >= 0 else exact(args[0]) * v,
    "relax.clip": lambda v, args: _clip(v, *args),
}
TRANSCENDENTAL = {  # f on mpmath numbers, f(0) exactly
    "relax.nn.gelu": (lambda v: v / 2 * (1 + mpmath.erf(v / mpmath.sqrt(2))), Fraction(0)),
    "relax.nn.gelu_tanh": (lambda v: v / 2 * (1 + mpmath.tanh(mpmath.sqrt(2 / mpmath.pi) *
                                                             (v + mpmath.mpf("0.044715") * v ** 3))), Fraction(0)),
    "relax.nn.silu": (lambda v: v / (1 + mpmath.exp(-v)), Fraction(0)),
    "relax.sigmoid": (lambda v: 1 / (1 + mpmath.exp(-v)), Fraction(1, 2)),
    "relax.tanh": (mpmath.tanh, Fraction(0)),
}


@lru_cache(maxsize=None)   # per-channel tables of a wide layer, over every checked image: computed once
def lookup_table(name: str, args: tuple[float, ...], s_in: float, z_in: int, s_o: float, z_o: int,
                 out_dtype: str = "int8") -> np.ndarray:
    """The 256 entries of quantize(f(dequantize(x))) for x = -128 .. 127, rounded half to even, exactly: f of an
    exact rational, or to PRECISION bits (a transcendental f has no ties but at 0, where f(0) is exact)."""
    if name not in RATIONAL and name not in TRANSCENDENTAL:
        raise HyqError(f"the reference has no definition of {name}")
    scale_in, scale_out = exact(s_in), exact(s_o)
    out = []
    with mpmath.workprec(PRECISION):
        for x in range(-128, 128):
            v = scale_in * (x - z_in)
            if name in RATIONAL:
                y = round(RATIONAL[name](v, args) / scale_out)
            elif v == 0:
                y = round(TRANSCENDENTAL[name][1] / scale_out)
            else:  # the nearest integer of a PRECISION-bit value, far from any half
                f = TRANSCENDENTAL[name][0](mpmath.mpf(v.numerator) / v.denominator) / mpmath.mpf(float(s_o))
                y = int(mpmath.floor(f + mpmath.mpf(0.5)))
            out.append(y + z_o)
    return saturate(np.array(out, dtype=object), out_dtype)


def looked_up(x: np.ndarray, name: str, args: tuple[float, ...], in_scale, in_zero_point, out_scale,
              out_zero_point, axis: int, out_dtype: str) -> np.ndarray:
    """quantize(f(dequantize(x))) of an int8 tensor by its exact tables, one per channel along `axis` (or one)."""
    width = width_of(in_scale, in_zero_point, out_scale, out_zero_point)
    params = zip(*(np.broadcast_to(np.ravel(v), (width,)) for v in (in_scale, in_zero_point, out_scale,
                                                                    out_zero_point)))
    tables = np.stack([lookup_table(name, tuple(args), float(s), int(z), float(so), int(zo), out_dtype)
                       for s, z, so, zo in params])
    index = x.astype(np.int64) + 128
    if width == 1:
        return tables[0][index]
    return tables[along(list(range(width)), axis, x.ndim, np.int64), index]


# -- softmax --------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def exp_table(scale: float) -> np.ndarray:
    """int64 floor(exp(-scale * d) * 2^30 + 1/2) for d = 0 .. 255, exp to PRECISION bits (no ties but at d = 0)."""
    with mpmath.workprec(PRECISION):
        s, half = mpmath.mpf(float(scale)), mpmath.mpf(0.5)
        return np.array([int(mpmath.floor(mpmath.exp(-s * d) * 2 ** PROB_BITS + half)) for d in range(256)], np.int64)


def softmaxed(x: np.ndarray, in_scale, out_scale, out_zero_point, axis: int, out_dtype: str) -> np.ndarray:
    """Softmax over the last axis of an int8 tensor: Q30 exp table, floored Q30 probabilities, requantized
    (output parameters per channel along `axis`, or one)."""
    x = x.astype(np.int64)
    e = exp_table(float(np.ravel(in_scale)[0]))[x.max(axis=-1, keepdims=True) - x]
    p = (e << PROB_BITS) // e.sum(axis=-1, keepdims=True)
    width = width_of(out_scale, out_zero_point)
    unit = Fraction(1, 1 << PROB_BITS)
    return requantize(p, [unit / s for s in channels(out_scale, width)], [Fraction(0)], ints(out_zero_point, width),
                      axis, out_dtype)


# -- norm -----------------------------------------------------------------------------------------------------------

def norm_grid(in_scales: list[Fraction], gamma: list[Fraction], beta: list[Fraction], out_scales: list[Fraction],
              eps: Fraction, count: int) -> tuple[list[int], int, list[int], list[int], int]:
    """(multipliers, eps, gains, offsets, shift) of the integer norm grid over `count` elements."""
    bits = min(NORM_BITS, (62 - 18 - ceil_log2(Fraction(count))) // 2)
    unit = max(in_scales) / (1 << bits)
    multipliers = [round_half_up(s / unit) for s in in_scales]
    eps_steps = round_half_up(eps / unit ** 2)
    ratios = [[g / s for g, s in zip(gamma, out_scales)], [b / s for b, s in zip(beta, out_scales)]]
    largest = max(abs(r) for rs in ratios for r in rs)
    shift = min(30, 52 - bits - max(0, ceil_log2(largest + 1)))
    if shift < 8 or eps_steps >= 1 << 51:
        raise HyqError("the norm's gain, offset or epsilon is too large for the integer norm")
    gains, offsets = ([round_half_up(r * (1 << shift)) for r in rs] for rs in ratios)
    return multipliers, eps_steps, gains, offsets, shift


def normalized(x: np.ndarray, in_scale, in_zero_point, gamma, beta, eps: float, out_scale, out_zero_point,
               axis: int, reduce_axes: tuple[int, ...], out_dtype: str) -> np.ndarray:
    """A LayerNorm / GroupNorm(1) of an int8 tensor over `reduce_axes` on its exact integer grid, requantized;
    per-channel parameters along `axis`."""
    ndim, width = x.ndim, x.shape[axis]
    count = int(np.prod([x.shape[i] for i in reduce_axes]))
    m, eps_steps, gain, offset, shift = norm_grid(channels(in_scale, width), channels(gamma, width),
                                                  channels(beta, width), channels(out_scale, width), exact(eps), count)
    z = along(ints(in_zero_point, width), axis, ndim, np.int64)
    t = (x.astype(np.int64) - z) * along(m, axis, ndim, np.int64)  # |x - z| < 2^9, m <= 2^16
    t = t.astype(kind(2 * (magnitude(t) + 1) * count))
    d = t - (2 * t.sum(axis=reduce_axes, keepdims=True) + count) // (2 * count)
    d = d.astype(kind(magnitude(d) ** 2 * count + eps_steps))
    var = (d * d).sum(axis=reduce_axes, keepdims=True) // count + eps_steps
    sigma = np.vectorize(lambda v: max(math.isqrt(int(v)), 1), otypes=[object])(var)
    top = int(sigma.max())
    dtype = kind(4 * (magnitude(d) * max(map(abs, gain)) + (max(map(abs, offset)) + (1 << shift)) * top))
    d, sigma = d.astype(dtype), sigma.astype(dtype)
    num = 2 * (d * along(gain, axis, ndim, dtype) + along(offset, axis, ndim, dtype) * sigma) + sigma * (1 << shift)
    out = num // (sigma * (1 << (shift + 1))) + along(ints(out_zero_point, width), axis, ndim, dtype)
    return saturate(out, out_dtype)


# -- resize ---------------------------------------------------------------------------------------------------------

def source_coordinate(o: int, n: int, m: int, mode: str) -> Fraction:
    """The exact input coordinate output coordinate o (of m) reads on an axis of n inputs."""
    if mode == "pytorch_half_pixel" and m == 1:
        return Fraction(0)
    if mode in ("half_pixel", "pytorch_half_pixel"):
        return Fraction((2 * o + 1) * n, 2 * m) - Fraction(1, 2)
    if mode == "align_corners":
        return Fraction(o * (n - 1), m - 1)
    if mode == "asymmetric":
        return Fraction(o * n, m)
    raise HyqError(f"the reference has no coordinate transformation {mode!r}")


def nearest_index(c: Fraction, rounding: str, mode: str) -> int:
    """The input coordinate a nearest resize takes for the exact source coordinate c."""
    rounding = rounding or ("round" if mode == "align_corners" else "floor")
    low = math.floor(c)
    rest = c - low
    if rounding == "round":  # half to even
        return low + (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and low % 2 == 1))
    if rounding == "round_prefer_floor":
        return low + (rest > Fraction(1, 2))
    if rounding == "round_prefer_ceil":
        return low + (rest >= Fraction(1, 2))
    if rounding == "floor":
        return low
    if rounding == "ceil":
        return low + (rest > 0)
    raise HyqError(f"the reference has no rounding method {rounding!r}")


def interpolation(n: int, m: int, method: str, mode: str, rounding: str) -> list[list[Fraction]]:
    """The (m, n) matrix of exact weights of a resize along one axis: row o weighs the inputs of output o."""
    rows = []
    for o in range(m):
        c, row = source_coordinate(o, n, m, mode), [Fraction(0)] * n
        if method == "nearest_neighbor":
            row[min(max(nearest_index(c, rounding, mode), 0), n - 1)] += 1
        elif method == "linear":
            low = math.floor(c)
            row[min(max(low, 0), n - 1)] += 1 - (c - low)
            row[min(max(low + 1, 0), n - 1)] += c - low
        else:
            raise HyqError(f"the reference has no resize method {method!r}")
        rows.append(row)
    return rows


def resized(x: np.ndarray, in_scale, in_zero_point, out_scale, out_zero_point, method: str, mode: str,
            rounding: str, size: tuple[int, int], spatial: tuple[int, int], axis: int, out_dtype: str) -> np.ndarray:
    """A resize2d of an int8 tensor along its `spatial` axes (H, W) to `size`: acc = A_h (x - z) A_w^T with the
    interpolation matrices in units of their common denominators D_h, D_w, requantized with
    M = s_in / (D_h * D_w * s_o); per-channel parameters along `axis`."""
    matrices, denominator = [], 1
    for a, m in zip(spatial, size):
        weights = interpolation(x.shape[a], m, method, mode, rounding)
        d = math.lcm(*(v.denominator for row in weights for v in row))
        matrices.append(np.array([[int(v * d) for v in row] for row in weights], np.int64))
        denominator *= d
    width = x.shape[axis]
    centered = x.astype(np.int64) - along(ints(in_zero_point, width), axis, x.ndim, np.int64)
    acc = matrices[0] @ np.moveaxis(centered, spatial, (-2, -1)) @ matrices[1].T  # |acc| <= 255 * D
    acc = np.moveaxis(acc, (-2, -1), spatial)
    multipliers = [s / (denominator * o) for s, o in zip(channels(in_scale, width), channels(out_scale, width))]
    return requantize(acc, multipliers, [Fraction(0)], ints(out_zero_point, width), axis, out_dtype)


# -- subtract / affine ---------------------------------------------------------------------------------------------

AFFINE_STEPS = {  # (a, b) of v -> a * v + b after one more step with the constant c, on the left or not
    "relax.add": lambda a, b, c, left: (a, b + c),
    "relax.subtract": lambda a, b, c, left: (-a, c - b) if left else (a, b - c),
    "relax.multiply": lambda a, b, c, left: (a * c, b * c),
    "relax.divide": lambda a, b, c, left: (a / c, b / c),
}


def folded(chain) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), object arrays of exact rationals, of a chain of (op name, float constant, constant on the left) steps
    as v -> a * v + b."""
    a, b = np.array(Fraction(1), dtype=object), np.array(Fraction(0), dtype=object)
    for name, constant, left in chain:
        if name not in AFFINE_STEPS or (left and name == "relax.divide"):
            raise HyqError(f"the reference has no affine step {name!r} (constant on the {'left' if left else 'right'})")
        c = np.array([exact(v) for v in np.ravel(constant)], dtype=object).reshape(np.shape(constant))
        a, b = (np.asarray(v, dtype=object) for v in AFFINE_STEPS[name](a, b, c, left))
    return a, b


def signed_q31(m: Fraction) -> tuple[int, int]:
    """(sign(m) * q, shift) with (q, shift) = q31(|m|); (0, 0) for m = 0."""
    if m == 0:
        return 0, 0
    q, shift = q31(abs(m))
    return (q if m > 0 else -q), shift


def padded(values: np.ndarray, ndim: int) -> np.ndarray:
    """An array with unit dims in front, of rank ndim."""
    return values.reshape((1,) * (ndim - values.ndim) + values.shape)


def channel_values(values: np.ndarray, axis: int, ndim: int) -> list:
    """The values along `axis` of an array (rank <= ndim) that varies along no other axis."""
    v = padded(values, ndim)
    line = v[tuple(slice(None) if d == axis else 0 for d in range(ndim))]
    if not np.all(v == line.reshape([-1 if d == axis else 1 for d in range(ndim)])):
        raise HyqError(f"the reference needs a multiplier per tensor or along axis {axis}")
    return list(line)


def rescaled_exactly(xs: list[np.ndarray], zero_points, multipliers: list[list[Fraction]], offset: np.ndarray,
                     out_zero_point, axis: int, out_dtype: str) -> np.ndarray:
    """clip(floor((sum_i (x_i - z_i) * k_i + c) / 2^R) + z_o) for sum_i M_i (x_i - z_i) + B (output steps):
    (p_i, shift_i) = signed_q31(M_i), R = 31 + max(0, max_i -shift_i), k_i = p_i * 2^(shift_i - 31 + R),
    c = 2^(R - 1) + floor(B * 2^R + 1/2); M_i one or one per channel along `axis`, B (exact) broadcasting to the x_i."""
    ndim = xs[0].ndim
    width = max(*(len(m) for m in multipliers), width_of(*zero_points, out_zero_point))
    params = [[signed_q31(m) for m in m_i * (width // len(m_i))] for m_i in multipliers]
    right = [FRACTION_BITS + max(0, *(-p[ch][1] for p in params)) for ch in range(width)]
    k = [[q << (shift - FRACTION_BITS + r) for (q, shift), r in zip(p, right)] for p in params]
    c = np.asarray(np.frompyfunc(lambda b, r: (1 << (r - 1)) + round_half_up(b * (1 << r)), 2, 1)(
        padded(offset, ndim), along(right, axis, ndim, object)), dtype=object)
    centered = [x.astype(np.int64) - along(ints(z, width), axis, ndim, np.int64) for x, z in zip(xs, zero_points)]
    dtype = kind(sum(magnitude(t) * max(map(abs, k_i)) for t, k_i in zip(centered, k)) + max(map(abs, c.ravel())))
    total = c.astype(dtype)
    for t, k_i in zip(centered, k):
        total = total + t.astype(dtype) * along(k_i, axis, ndim, dtype)
    out = total // along([1 << r for r in right], axis, ndim, dtype) + along(ints(out_zero_point, width), axis,
                                                                              ndim, dtype)
    return saturate(out, out_dtype)


# -- pool / product -------------------------------------------------------------------------------------------------

def _pool_windows(t: np.ndarray, kernel, strides, dilation, padding, out_hw) -> np.ndarray:
    """Sums of an NCHW tensor over its avg_pool2d windows, zero padded by padding (top, left, bottom, right) and
    beyond as far as the last of the out_hw windows reaches."""
    spans = [r * (k - 1) + 1 for k, r in zip(kernel, dilation)]
    extra = [max(0, (o - 1) * s + sp - (n + a + b)) for o, s, sp, n, a, b in
             zip(out_hw, strides, spans, t.shape[2:], padding[:2], padding[2:])]
    t = np.pad(t, ((0, 0), (0, 0), (padding[0], padding[2] + extra[0]), (padding[1], padding[3] + extra[1])))
    windows = sliding_window_view(t, spans, axis=(2, 3))[:, :, ::strides[0], ::strides[1], ::dilation[0], ::dilation[1]]
    return windows[:, :, :out_hw[0], :out_hw[1]].sum(axis=(-2, -1))


def pool_output_size(n: int, kernel: int, stride: int, dilation: int, before: int, after: int, ceil: bool) -> int:
    """The output extent of avg_pool2d along an axis of n inputs: with ceil_mode, the last window still starts
    inside the input or its leading padding."""
    size = (n + before + after - dilation * (kernel - 1) - 1 + (stride - 1 if ceil else 0)) // stride + 1
    return size - 1 if ceil and (size - 1) * stride >= n + before else size


def window_sums(xc: np.ndarray, function: str, attrs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(acc, n): the sums of the centered input xc over each window of `function` (a Relax op name) with its
    attributes, and how many elements each output position averages (1 for a sum)."""
    if function == "relax.nn.avg_pool2d":
        kernel, strides, dilation, padding = (attrs[k] for k in ("pool_size", "strides", "dilation", "padding"))
        out_hw = [pool_output_size(xc.shape[2 + i], kernel[i], strides[i], dilation[i], padding[i], padding[2 + i],
                                   attrs["ceil_mode"]) for i in range(2)]
        args = (kernel, strides, dilation)
        acc = _pool_windows(xc, *args, padding, out_hw)
        inside = np.ones((1, 1, *xc.shape[2:]), np.int64)
        if attrs["count_include_pad"]:  # the padding counts, not what lies beyond it (ceil_mode)
            top, left, bottom, right = padding
            counted = _pool_windows(np.pad(inside, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=1),
                                    *args, (0, 0, 0, 0), out_hw)
        else:
            counted = _pool_windows(inside, *args, padding, out_hw)
        return acc, np.maximum(counted, 1)
    if function == "relax.nn.adaptive_avg_pool2d":
        (n, c, h, w), (oh, ow) = xc.shape, attrs["output_size"]
        return xc.reshape(n, c, oh, h // oh, ow, w // ow).sum(axis=(3, 5)), np.array((h // oh) * (w // ow))
    if function in ("relax.mean", "relax.sum"):
        axes = attrs["axes"]
        count = int(np.prod([xc.shape[d] for d in axes])) if function == "relax.mean" else 1
        return xc.sum(axis=axes, keepdims=attrs["keepdims"]), np.array(count)
    raise HyqError(f"the reference has no definition of {function}")


def pooled(x: np.ndarray, function: str, attrs: dict, in_scale, in_zero_point, out_scale, out_zero_point, axis: int,
           out_dtype: str) -> np.ndarray:
    """An average pool / mean / sum of an int8 tensor: exact window sums of x - z_in, each requantized with
    M = s_in / (n * s_o) for the n elements it averages; parameters per channel along the result's `axis`."""
    dropped = () if attrs.get("keepdims", True) else attrs["axes"]
    in_axis = [d for d in range(x.ndim) if d not in dropped][axis]
    width = width_of(in_scale, in_zero_point, out_scale, out_zero_point)
    xc = x.astype(np.int64) - along(ints(in_zero_point, width), in_axis, x.ndim, np.int64)
    acc, counts = window_sums(xc, function, attrs)
    counts = np.broadcast_to(counts, acc.shape)
    s_in, s_o, z_o = channels(in_scale, width), channels(out_scale, width), ints(out_zero_point, width)
    out = np.zeros(acc.shape, out_dtype)
    for n in np.unique(counts):
        part = requantize(acc, [s / (int(n) * o) for s, o in zip(s_in, s_o)], [Fraction(0)], z_o, axis, out_dtype)
        out = np.where(counts == n, part, out)
    return out


def multiplied(a: np.ndarray, a_zero_point, b: np.ndarray, b_zero_point, scales, out_scale, out_zero_point,
               axis: int, out_dtype: str) -> np.ndarray:
    """(a - z_a) * (b - z_b) of two int8 tensors, broadcast, requantized with M = s_a * s_b / s_o; parameters per
    channel along the result's `axis`."""
    ndim = max(a.ndim, b.ndim)
    width = width_of(a_zero_point, b_zero_point, *scales, out_scale, out_zero_point)

    def centered(t: np.ndarray, z) -> np.ndarray:
        t = t.astype(np.int64).reshape((1,) * (ndim - t.ndim) + t.shape)
        return t - along(ints(z, width), axis, ndim, np.int64)

    s_a, s_b, s_o = (channels(s, width) for s in (*scales, out_scale))
    return requantize(centered(a, a_zero_point) * centered(b, b_zero_point),
                      [x * y / o for x, y, o in zip(s_a, s_b, s_o)], [Fraction(0)], ints(out_zero_point, width),
                      axis, out_dtype)


# -- a recorded layer -----------------------------------------------------------------------------------------------

def _gemm(layer, values) -> np.ndarray:
    real, a = layer.real, values[layer.inputs[0]]
    z_a, z_b = layer.zero_points
    if layer.op == "conv2d":
        attrs = layer.attrs
        acc = conv2d(a, z_a, layer.weight, attrs["strides"], attrs["padding"], attrs["dilation"], attrs["groups"])
        scales = conv_acc_scales(real.scales[0], real.weight_scale, a.shape[1], layer.weight.shape[0],
                                 attrs["groups"])
    elif layer.weight is not None:
        acc = matmul(a, z_a, layer.weight, z_b)
        scales = [exact(real.scales[0]) * s for s in channels(real.weight_scale, 1)]
    else:
        b = values[layer.inputs[1]]
        acc = matmul(a, z_a, b if layer.attrs["b_axes"] is None else b.transpose(layer.attrs["b_axes"]), z_b)
        scales = [exact(real.scales[0]) * exact(real.scales[1])]
    return gemm_output(acc, scales, layer.out_scale, layer.out_zero_point, layer.axis, layer.out_dtype, real.bias,
                       real.function, real.args)


def _rescale(layer, values) -> np.ndarray:
    xs = [values[v] for v in layer.inputs]
    args = (layer.zero_points, layer.real.scales, layer.out_scale, layer.out_zero_point, layer.axis)
    if layer.attrs["dim"] is None:
        return rescaled(xs, *args, layer.out_dtype)
    return concatenated(xs, *args, layer.attrs["dim"], layer.out_dtype)


def _subtract(layer, values) -> np.ndarray:
    scales, width = layer.real.scales, width_of(*layer.real.scales, layer.out_scale)
    s_o = channels(layer.out_scale, width)
    multipliers = [[sign * s / o for s, o in zip(channels(s_i, width), s_o)] for sign, s_i in zip((1, -1), scales)]
    return rescaled_exactly([values[v] for v in layer.inputs], layer.zero_points, multipliers,
                            np.array(Fraction(0), dtype=object), layer.out_zero_point, layer.axis, layer.out_dtype)


def _affine(layer, values) -> np.ndarray:
    real, x = layer.real, values[layer.inputs[0]]
    a, b = folded(real.chain)
    width = width_of(real.scales[0], layer.out_scale)
    s_in, s_o = (along(channels(v, width), layer.axis, x.ndim, object) for v in (real.scales[0], layer.out_scale))
    multiplier = channel_values(np.asarray(a * s_in / s_o, dtype=object), layer.axis, x.ndim)
    return rescaled_exactly([x], layer.zero_points, [multiplier], np.asarray(b / s_o, dtype=object),
                            layer.out_zero_point, layer.axis, layer.out_dtype)


def _lookup(layer, values) -> np.ndarray:
    real = layer.real
    return looked_up(values[layer.inputs[0]], real.function, real.args, real.scales[0], layer.zero_points[0],
                     layer.out_scale, layer.out_zero_point, layer.axis, layer.out_dtype)


def _softmax(layer, values) -> np.ndarray:
    return softmaxed(values[layer.inputs[0]], layer.real.scales[0], layer.out_scale, layer.out_zero_point, layer.axis,
                     layer.out_dtype)


def _norm(layer, values) -> np.ndarray:
    real = layer.real
    return normalized(values[layer.inputs[0]], real.scales[0], layer.zero_points[0], real.gamma, real.beta,
                      real.args[0], layer.out_scale, layer.out_zero_point, layer.axis,
                      tuple(layer.attrs["reduce_axes"]), layer.out_dtype)


def _resize(layer, values) -> np.ndarray:
    attrs = layer.attrs
    return resized(values[layer.inputs[0]], layer.real.scales[0], layer.zero_points[0], layer.out_scale,
                   layer.out_zero_point, attrs["method"], attrs["mode"], attrs["rounding"], attrs["size"],
                   attrs["spatial"], layer.axis, layer.out_dtype)


def _pool(layer, values) -> np.ndarray:
    real = layer.real
    return pooled(values[layer.inputs[0]], real.function, layer.attrs["op_attrs"], real.scales[0], layer.zero_points[0],
                  layer.out_scale, layer.out_zero_point, layer.axis, layer.out_dtype)


def _product(layer, values) -> np.ndarray:
    (a, b), (z_a, z_b) = (values[v] for v in layer.inputs), layer.zero_points
    return multiplied(a, z_a, b, z_b, layer.real.scales, layer.out_scale, layer.out_zero_point, layer.axis,
                      layer.out_dtype)


REFERENCES = {"conv2d": _gemm, "matmul": _gemm, "add": _rescale, "concat": _rescale, "lookup": _lookup,
              "subtract": _subtract, "requantize": _rescale, "affine": _affine,
              "softmax": _softmax, "norm": _norm, "resize": _resize,
              "pool": _pool, "product": _product}


def expected(layer, values: dict) -> np.ndarray:
    """The result of an integer layer (an IntegerLayer with its RealParams) recomputed from the integer inputs in
    `values` (by var) and its real numbers; it reads no constant the rule derived (bias, acc_scale, clamp, tables,
    norm grid)."""
    if layer.real is None:
        raise HyqError(f"layer {layer.name!r} carries no real parameters for the reference")
    return REFERENCES[layer.op](layer, values)
