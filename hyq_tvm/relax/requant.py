"""Fixed-point requantization, with the bias carried exactly in the rounding term.

A positive real multiplier M (the exact rational of the float scales, `exact_ratio`) is stored as a Q31
integer q and a shift s with M ~= q * 2^(s - 31) (`fixed_point_multiplier`). With L = max(s, 0) and
R = 31 + max(-s, 0), `requantize` maps an int32 accumulator x, whose layer adds a real bias b on the
accumulator grid (bias / acc_scale), to

    r = ((int64(x) << L) * q + c) >> R        c = 2^(R - 1) + floor(b * q * 2^L + 1/2)  (`rounding_term`)
    y = clip(r + z, qmin, qmax)

that is (x + b) * M rounded once, to nearest with ties up (towards +infinity): an arithmetic right
shift of the exact 64-bit sum. q and c are computed exactly from rationals (b too: bias / acc_scale of the
float constants), not in float64, whose rounding moved c by up to 2^9 units for large biases and could
move q by one unit near a tie. Without a bias, c = 2^(R - 1) and r is TVM's
`tirx.q_multiply_shift_per_axis(x, q, L, R - 31, 31)`. The bias is not rounded to the accumulator grid
first: with activation scales folded into the weights that grid is the weight scale, coarse at 4 bits,
and rounding the bias to it alone moves about one output in a hundred by a whole step away from
the fake-quant model's round((x + b) * M).

Every int64 term is at most |x| * 2^L * q + |c| in magnitude: `check_range` refuses, at compile time, a
layer whose largest accumulator could take it past 2^63 - 1.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ..errors import HyqError

Q = 31            # fractional bits of the multiplier
MIN_SHIFT = -31   # total right shift max(-s, 0) + 31 must stay <= 62 for the int64 rounding term
MAX_SHIFT = 31    # left shifts beyond 31 overflow int64 for any int32 accumulator
INT64_MAX = (1 << 63) - 1


def _rational(value) -> Fraction | None:
    """A float (exactly) or a Fraction as a Fraction; None when it is not a finite number."""
    if isinstance(value, Fraction):
        return value
    value = float(value)
    return Fraction(value) if math.isfinite(value) else None


def exact_ratio(numerator, denominator) -> np.ndarray:
    """numerator / denominator (float arrays, broadcast) as an object array of exact Fractions."""
    a, b = np.broadcast_arrays(np.asarray(numerator, np.float64), np.asarray(denominator, np.float64))
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(b != 0)):
        raise HyqError("scales must be finite and non-zero")
    out = np.empty(a.shape, dtype=object)
    out.ravel()[:] = [Fraction(float(x)) / Fraction(float(y)) for x, y in zip(a.ravel(), b.ravel())]
    return out


def _frexp(m: Fraction) -> tuple[int, int]:
    """(q, e) with m ~= q * 2^(e - 31): e as in frexp (2^(e-1) <= m < 2^e) but at least MIN_SHIFT, and
    q = round-half-away(m * 2^(31 - e)), exactly."""
    num, den = m.numerator, m.denominator
    e = num.bit_length() - den.bit_length()
    if (num << max(-e, 0)) >= (den << max(e, 0)):  # m >= 2^e
        e += 1
    e = max(e, MIN_SHIFT)
    scale = Q - e  # q = floor(num * 2^scale / den + 1/2)
    num, den = num << max(scale, 0), den << max(-scale, 0)
    return (2 * num + den) // (2 * den), e


def fixed_point_multiplier(multiplier) -> tuple[np.ndarray, np.ndarray]:
    """(q int32, shift int32) arrays, shaped like `multiplier`, with multiplier ~= q * 2^(shift - 31).

    Like TVM's former QNN GetFixedPointMultiplierShift, but exact: frexp gives m in [0.5, 1) and e with
    M = m * 2^e; q = round-half-away(m * 2^31) (halved with e + 1 when it reaches 2^31), shift = e.
    `multiplier` holds floats or Fractions (exact_ratio). Multipliers below 2^-32 get shift -31 and a q
    below 2^30 (0 below 2^-63): the best Q31 value the lowering can still shift. Multipliers of 2^31 or
    more raise a HyqError.
    """
    m = np.asarray(multiplier)
    values = [_rational(v) for v in m.ravel()]
    if not values or any(v is None or v <= 0 for v in values):
        shown = [float(v) for v in m.ravel()]
        raise HyqError(f"requantization multipliers must be positive and finite, got {min(shown, default=0.0)!r}.."
                       f"{max(shown, default=0.0)!r}")
    pairs = [_frexp(v) for v in values]
    pairs = [(q >> 1, e + 1) if q == 1 << Q else (q, e) for q, e in pairs]
    if any(e > MAX_SHIFT for _, e in pairs):
        raise HyqError(f"requantization multiplier {float(max(values))!r} is too large (at most 2^31 is supported)")
    q, shift = (np.array(v, np.int64).reshape(m.shape) for v in zip(*pairs))
    return q.astype(np.int32), shift.astype(np.int32)


def shifts(shift) -> tuple[np.ndarray, np.ndarray]:
    """int64 (L, R) = (max(shift, 0), max(-shift, 0) + 31): the left shift of x and the right shift of the sum."""
    shift = np.asarray(shift, dtype=np.int64)
    return np.maximum(shift, 0), np.maximum(-shift, 0) + Q


def rounding_term(q: np.ndarray, shift: np.ndarray, bias=0.0) -> np.ndarray:
    """int64 c = 2^(R - 1) + floor(bias * q * 2^L + 1/2): half the divisor plus the bias, on the product's grid,
    exactly. The bias (accumulator steps) holds floats or Fractions (exact_ratio(bias, acc_scale))."""
    left, right = shifts(shift)
    q, left, right, bias = np.broadcast_arrays(np.asarray(q, np.int64), left, right, np.asarray(bias))
    b = [_rational(v) for v in bias.ravel()]
    if any(v is None or abs(v) * (1 << int(lv)) >= 1 << 31 for v, lv in zip(b, left.ravel())):
        worst = max(abs(float(v)) for v in bias.ravel())
        raise HyqError(f"a bias of {worst:g} accumulator steps does not fit the requantization")
    c = [(1 << (int(r) - 1)) + math.floor(v * (int(m) << int(lv)) + Fraction(1, 2))
         for v, m, lv, r in zip(b, q.ravel(), left.ravel(), right.ravel())]
    return np.array(c, np.int64).reshape(q.shape)


def check_range(acc_bound, q, shift, c) -> None:
    """A HyqError unless every int64 term of the requantization stays below 2^63 for accumulators |x| <= acc_bound:
    ((x << L) * q + c) is at most acc_bound * 2^L * q + |c| in magnitude, and so are x << L and (x << L) * q.
    acc_bound (int64), q, shift and the rounding term c are () or per channel."""
    bound, q, shift, c = (np.ravel(a) for a in np.broadcast_arrays(*(np.asarray(v, np.int64)
                                                                      for v in (acc_bound, q, shift, c))))
    worst = [(int(b) << max(int(s), 0)) * int(m) + abs(int(r)) for b, m, s, r in zip(bound, q, shift, c)]
    over = [i for i, w in enumerate(worst) if w > INT64_MAX]
    if over:
        i = max(over, key=worst.__getitem__)
        raise HyqError(f"the requantization overflows int64 in {len(over)} of {len(worst)} channel(s); in"
                       f" channel {i} accumulators up to {bound[i]} times the multiplier"
                       f" {int(q[i]) * 2.0 ** (int(shift[i]) - Q):.4g} reach 2^{math.log2(worst[i]):.1f}: the output"
                       f" scale is too fine for the accumulator scale")


def multiply_shift(acc: np.ndarray, q: np.ndarray, shift: np.ndarray, bias=0.0) -> np.ndarray:
    """int64 round((acc + bias) * q * 2^(shift - 31)), ties up, as the requantization computes it."""
    left, right = shifts(shift)
    x = (np.asarray(acc, dtype=np.int64) << left) * np.asarray(q, dtype=np.int64)
    return (x + rounding_term(q, shift, bias)) >> right


RESCALE_BITS = 54  # |k| < 2^54 keeps (x - z) * k of an 8-bit x within int64 for two summed inputs


def rescale_params(in_scales, out_scale) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 k (n, C), c (C,) and int32 rs (C,) for `rescale`: k_i * 2^-rs ~= in_scales[i] / out_scale.

    Each exact ratio is a Q31 multiplier (fixed_point_multiplier); all share the largest right shift R, so the
    rescaled inputs add exactly in int64 and the sum is rounded once (ties up, c = 2^(R - 1)).
    Scales are () or (C,) arrays; a ratio beyond 2^23 between the inputs raises a HyqError.
    """
    ratios = np.stack(np.broadcast_arrays(*(exact_ratio(s, out_scale) for s in in_scales))).reshape(len(in_scales), -1)
    q, shift = fixed_point_multiplier(ratios)
    left, right = shifts(shift)
    common = right.max(axis=0)
    k = (q.astype(np.int64) << left) << (common - right)
    if np.any(np.abs(k) >= np.int64(1) << RESCALE_BITS):
        raise HyqError("the inputs of a rescaled sum differ in scale by more than 2^23; quantize them alike")
    return k, np.int64(1) << (common - 1), common.astype(np.int32)


def rescale(xs, zero_points, in_scales, out_scale, out_zero_point, qmin: int, qmax: int,
            out_dtype: str = "int8") -> np.ndarray:
    """clip(round(sum_i (x_i - z_i) * s_i / s_o) + z_o) with the multipliers of rescale_params.

    Scales and zero points broadcast against the x_i (per-channel values shaped along the channel axis).
    """
    shape = np.broadcast_shapes(*(np.shape(s) for s in in_scales), np.shape(out_scale))
    k, c, rs = rescale_params(in_scales, out_scale)
    total = c.reshape(shape)
    for x, z, k_i in zip(xs, zero_points, k):
        total = total + (np.asarray(x, np.int64) - np.asarray(z, np.int64)) * k_i.reshape(shape)
    out = (total >> rs.reshape(shape).astype(np.int64)) + np.asarray(out_zero_point, np.int64)
    return np.clip(out, qmin, qmax).astype(out_dtype)


def requantize(acc: np.ndarray, q: np.ndarray, shift: np.ndarray, zero_point, qmin: int, qmax: int,
               out_dtype: str = "int8", bias=0.0) -> np.ndarray:
    """clip(multiply_shift(acc, q, shift, bias) + z, qmin, qmax) as `out_dtype`.

    q, shift, zero_point and bias broadcast against acc (per-channel values shaped along the channel axis).
    """
    r = multiply_shift(acc, q, shift, bias)
    return np.clip(r + np.asarray(zero_point, dtype=np.int64), qmin, qmax).astype(out_dtype)
