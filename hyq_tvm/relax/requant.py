"""Fixed-point requantization, exactly as TVM's `tirx.q_multiply_shift_per_axis` computes it.

A positive real multiplier M is stored as a Q31 integer q and a shift s with M ~= q * 2^(s - 31)
(`fixed_point_multiplier`). `requantize` then maps an int32 accumulator x to

    r = int32(((int64(x) << max(s, 0)) * q + 2^(max(-s, 0) + 30)) >> (max(-s, 0) + 31))
    y = clip(int64(r) + z, qmin, qmax)

which is TVM's `QMultiplyShift` lowering (src/target/intrin_rule.cc, used by the FLegalize of
`tirx.q_multiply_shift_per_axis` with q = 31): one rounding of the exact 64-bit product, to nearest
with ties rounded up (towards +infinity), by adding half the divisor and shifting right
arithmetically. The int64 -> int32 cast of r wraps; z is added in int64, so that sum cannot overflow.

The result is exact while |x| * 2^max(s, 0) < 2^32, so that the 64-bit product cannot overflow.
The graph uses the per-axis intrinsic for every layer: plain `tirx.q_multiply_shift` needs constant
q and s and takes a 32-bit shortcut (no int64) when q == 2^30, which can overflow near int32 limits.
"""
from __future__ import annotations

import numpy as np

from ..errors import HyqError

Q = 31            # fractional bits of the multiplier
MIN_SHIFT = -31   # total right shift max(-s, 0) + 31 must stay <= 62 for the int64 rounding term
MAX_SHIFT = 31    # left shifts beyond 31 overflow int64 for any int32 accumulator


def fixed_point_multiplier(multiplier) -> tuple[np.ndarray, np.ndarray]:
    """(q int32, shift int32) arrays, shaped like `multiplier`, with multiplier ~= q * 2^(shift - 31).

    Like TVM's former QNN GetFixedPointMultiplierShift: frexp gives m in [0.5, 1) and e with
    M = m * 2^e; q = round-half-away(m * 2^31) (halved with e + 1 when it reaches 2^31), shift = e.
    Multipliers below 2^-32 get shift -31 and a q below 2^30 (0 below 2^-63): the best Q31 value
    the lowering can still shift. Multipliers of 2^31 or more raise a HyqError.
    """
    m = np.asarray(multiplier, dtype=np.float64)
    if not np.all(np.isfinite(m)) or np.any(m <= 0):
        raise HyqError(f"requantization multipliers must be positive and finite, got {m.min()!r}..{m.max()!r}")
    mant, exp = np.frexp(m)
    exp = exp.astype(np.int64)
    small = exp < MIN_SHIFT
    mant = np.where(small, np.ldexp(mant, exp - MIN_SHIFT), mant)
    exp = np.where(small, MIN_SHIFT, exp)
    q = np.floor(mant * 2.0 ** Q + 0.5).astype(np.int64)
    full = q == 1 << Q
    q = np.where(full, q >> 1, q)
    exp = np.where(full, exp + 1, exp)
    if np.any(exp > MAX_SHIFT):
        raise HyqError(f"requantization multiplier {m.max()!r} is too large (at most 2^31 is supported)")
    return q.astype(np.int32), exp.astype(np.int32)


def multiply_shift(acc: np.ndarray, q: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """int32 round(acc * q * 2^(shift - 31)), ties up, exactly as tirx.q_multiply_shift_per_axis."""
    shift = np.asarray(shift, dtype=np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0) + Q
    x = (np.asarray(acc, dtype=np.int64) << left) * np.asarray(q, dtype=np.int64)
    return ((x + (np.int64(1) << (right - 1))) >> right).astype(np.int32)


def requantize(acc: np.ndarray, q: np.ndarray, shift: np.ndarray, zero_point, qmin: int, qmax: int,
               out_dtype: str = "int8") -> np.ndarray:
    """clip(multiply_shift(acc, q, shift) + z, qmin, qmax) as `out_dtype` (the sum taken in int64).

    q, shift and zero_point broadcast against acc (per-channel values shaped along the channel axis).
    """
    r = multiply_shift(acc, q, shift).astype(np.int64)
    return np.clip(r + np.asarray(zero_point, dtype=np.int64), qmin, qmax).astype(out_dtype)


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int32 round-half-to-even(bias / scale): a float bias on the accumulator's grid (scale s_a * s_w)."""
    b = np.rint(np.asarray(bias, dtype=np.float64) / np.asarray(scale, dtype=np.float64))
    if np.any(np.abs(b) > np.iinfo(np.int32).max):
        raise HyqError(f"a bias of {np.abs(bias).max():g} does not fit int32 at accumulator scale {np.min(scale):g}")
    return b.astype(np.int32)
