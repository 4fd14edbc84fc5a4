"""Fixed-point requantization (requant.py) and its TIR kernel, against exact rationals."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from hyq_tvm.errors import HyqError
from hyq_tvm.relax.integer.gemm import requantize_primfunc
from hyq_tvm.relax.requant import (
    check_range,
    fixed_point_multiplier,
    multiply_shift,
    requantize,
    rescale,
    rescale_params,
    rounding_term,
    shifts,
)

from .qdq import RNG, run


def exact_requant(acc: int, q: int, shift: int, bias: float = 0.0) -> int:
    """round-half-up((acc + bias) * q * 2^(shift - 31)) with exact rationals."""
    value = (acc + Fraction(bias)) * q * Fraction(2) ** (shift - 31)
    return int(np.floor(value + Fraction(1, 2)))


@pytest.mark.parametrize("m", [0.5, 0.75, 1.0, 1.5, 3.7, 2.0 ** 20, 1 - 2.0 ** -40, 0.7 * 2.0 ** -31,
                               2.0 ** -40, 1e-21, 0.0123])
def test_fixed_point_multiplier(m):
    q, shift = fixed_point_multiplier(m)
    assert 0 <= int(q) < 2 ** 31
    assert -31 <= int(shift) <= 31
    approx = int(q) * 2.0 ** (int(shift) - 31)
    assert abs(approx - m) <= 2.0 ** (int(shift) - 32)  # half a unit of q


@pytest.mark.parametrize("m", [0.0, -1.0, float("inf"), 2.0 ** 31])
def test_fixed_point_multiplier_rejects(m):
    with pytest.raises(HyqError, match="multiplier"):
        fixed_point_multiplier(m)


def test_requantize_edge_cases_match_tvm_and_exact_rounding():
    # one channel per (multiplier, case): ties (M = 0.5 and odd acc), negatives, int32 extremes,
    # shifts of -31 (M < 2^-31) and > 0 (M >= 1)
    multipliers = np.array([0.5, 0.5 * 2 ** -3, 0.3, 0.7 * 2.0 ** -31, 2.0 ** -40, 1.0, 3.7, 200.0])
    q, shift = fixed_point_multiplier(multipliers)
    acc = np.array([-5, -3, -1, 1, 3, 5, 12, -12, -4, 4, 2 ** 31 - 1, -2 ** 31, 1000, -1000, 2 ** 20, 0],
                   dtype=np.int32)
    acc = np.tile(acc[None, :], (len(multipliers), 1))
    acc[-1] = np.clip(acc[-1], -2 ** 23, 2 ** 23)  # |acc| * 2^shift stays below 2^32
    acc[-2] = np.clip(acc[-2], -2 ** 29, 2 ** 29)
    zero = np.array([0, 3, -7, 0, 0, 10, -128, 127], dtype=np.int32)
    expected = np.array([[np.clip(exact_requant(int(a), int(qi), int(si)) + int(z), -128, 127)
                          for a in row] for row, qi, si, z in zip(acc, q, shift, zero)], dtype=np.int8)
    got = requantize(acc, q[:, None], shift[:, None], zero[:, None], -128, 127)
    np.testing.assert_array_equal(got, expected)
    assert got[0, 1] == -1 and got[0, 4] == 2  # ties go up: -1.5 -> -1, 1.5 -> 2

    prim = requantize_primfunc(acc.shape, 0, len(q), True)
    out = np.zeros(acc.shape, np.int8)
    tvm_out = run(prim, acc, q, *(s.astype(np.int32) for s in shifts(shift)), rounding_term(q, shift), zero, out)
    np.testing.assert_array_equal(tvm_out, expected)


def test_requantize_carries_a_real_bias_in_one_rounding():
    """(acc + b) * M rounded once, b not rounded to the accumulator grid first; TVM agrees bit for bit."""
    channels = 16
    q, shift = fixed_point_multiplier(RNG.uniform(1e-4, 0.2, channels))
    bias = RNG.normal(0, 40, channels)
    acc = RNG.integers(-20000, 20000, (channels, 512)).astype(np.int32)
    expected = np.array([[np.clip(exact_requant(int(a), int(qi), int(si), float(b)), -128, 127) for a in row]
                         for row, qi, si, b in zip(acc, q, shift, bias)], dtype=np.int8)
    got = requantize(acc, q[:, None], shift[:, None], 0, -128, 127, bias=bias[:, None])
    np.testing.assert_array_equal(got, expected)
    rounded_first = requantize(acc + np.rint(bias).astype(np.int32)[:, None], q[:, None], shift[:, None], 0, -128, 127)
    assert np.any(rounded_first != got)  # what an int32 bias on the accumulator grid would change

    prim = requantize_primfunc(acc.shape, 0, channels, False)
    c = rounding_term(q, shift, bias)
    tvm_out = run(prim, acc, q, *(s.astype(np.int32) for s in shifts(shift)), c, np.zeros(channels, np.int32),
                  np.zeros(acc.shape, np.int8))
    np.testing.assert_array_equal(tvm_out, expected)


def test_rescale_rounds_the_exact_sum_once():
    """requant.rescale against exact rationals: round-half-up of sum (x_i - z_i) * k_i / 2^R, and within
    one step of the real sum (x_i - z_i) * s_i / s_o for scales many powers of two apart."""
    xs = [np.arange(-128, 128, dtype=np.int64), RNG.integers(-128, 128, 256)]
    zs, in_scales, s_o = [3, -9], [np.float64(0.37), np.float64(2.0 ** -9)], np.float64(0.0213)
    k, _, rs = rescale_params(in_scales, s_o)
    got = rescale(xs, zs, in_scales, s_o, 0, -(2 ** 20), 2 ** 20, "int32")
    for i in range(256):
        total = sum((int(x[i]) - z) * int(k_i[0]) for x, z, k_i in zip(xs, zs, k))
        assert got[i] == int(np.floor(Fraction(total, 2 ** int(rs[0])) + Fraction(1, 2)))
    real = sum((x - z) * s for x, z, s in zip(xs, zs, in_scales)) / s_o
    assert np.abs(got - real).max() <= 0.5 + 1e-6
    with pytest.raises(HyqError, match="differ in scale by more than 2"):
        rescale_params([np.float64(1.0), np.float64(2.0 ** -30)], np.float64(2.0 ** -25))


def test_check_range_refuses_exactly_the_accumulators_that_overflow_int64():
    """M = 2^20: q = 2^30, L = 21, c = 2^30, so |acc| * 2^51 + 2^30 must stay below 2^63: 4095 is the largest
    accumulator bound that fits. At 4095 the arithmetic is exact; 4096 would wrap, and is refused."""
    q, shift = fixed_point_multiplier(2.0 ** 20)
    c = rounding_term(q, shift)
    assert (int(q), int(shift), int(c)) == (2 ** 30, 21, 2 ** 30)
    check_range(np.int64(4095), q, shift, c)
    acc = np.array([-4095, 4095], np.int64)
    assert multiply_shift(acc, q, shift).tolist() == [-4095 * 2 ** 20, 4095 * 2 ** 20]
    with np.errstate(over="ignore"):
        assert multiply_shift(np.int64(4096), q, shift) != 4096 * 2 ** 20  # what the check prevents
    with pytest.raises(HyqError, match=r"^the requantization overflows int64 in 1 of 2 channel\(s\); in channel 1"
                                       r" accumulators up to 4096 times the multiplier 1.049e\+06 reach 2\^63.0"):
        check_range(np.array([4095, 4096]), q, shift, c)
    with pytest.raises(HyqError, match="overflows int64"):  # the bias in the rounding term counts too
        check_range(np.int64(4095), q, shift, rounding_term(q, shift, 2.0 ** 9))
