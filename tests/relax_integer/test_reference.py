"""The independent reference (integer/reference.py) against the integerizer: the constants each rule derives and
the numpy twins and TIR kernels they feed, for random scales and zero points up to the documented limits, and
for crafted scales where float64 arithmetic rounded the other way (what the integerizer did before it computed
its constants from exact rationals)."""
from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from tvm import relax

from hyq_tvm.errors import HyqError
from hyq_tvm.relax.integer import integerize_layers
from hyq_tvm.relax.integer import reference as ref
from hyq_tvm.relax.integer.gemm import requantize_primfunc
from hyq_tvm.relax.integer.lookup import ELEMENTWISE, lookup, lookup_table
from hyq_tvm.relax.integer.norm import integer_norm, norm_params
from hyq_tvm.relax.integer.rescale import rescale_primfunc, rescaled_concat, rescaled_sum
from hyq_tvm.relax.integer.requantize import requant_params, requantize_acc
from hyq_tvm.relax.integer.softmax import PROB_BITS, softmax_probs, softmax_table
from hyq_tvm.relax.requant import (
    INT64_MAX,
    check_range,
    exact_ratio,
    fixed_point_multiplier,
    rescale_params,
    rounding_term,
)
from hyq_tvm.relax.verify import check_values, debug_vm, first_mismatch, run_debug

from .qdq import RNG, TARGET, const, dq, module, run


def log_uniform(n: int, low: float, high: float) -> np.ndarray:
    """n float32 values 2^u, u uniform in [low, high]."""
    return (2.0 ** RNG.uniform(low, high, n)).astype(np.float32)


def zero_points(n: int, lo: int = -128, hi: int = 127) -> np.ndarray:
    """n random zero points in [lo, hi], the first two at the extremes."""
    z = RNG.integers(lo, hi + 1, n)
    z[:2] = (lo, hi)[:n]
    return z.astype(np.int64)


def int8_extremes(shape) -> np.ndarray:
    """Random int8 values, -128 first and 127 last."""
    x = RNG.integers(-128, 128, shape).astype(np.int8)
    x.flat[0], x.flat[-1] = -128, 127
    return x


# -- the Q31 multiplier --------------------------------------------------------------------------------------------

EDGE_MULTIPLIERS = [2.0 ** -70, 2.0 ** -64, 2.0 ** -63, 1.5 * 2.0 ** -63, 2.0 ** -32 * (1 - 2.0 ** -52), 2.0 ** -32,
                    2.0 ** -31, 0.5, 1 - 2.0 ** -40, 1.0, 1 + 2.0 ** -52, 2.0 ** 30,
                    2.0 ** 31 - 1, 2.0 ** 31 - 0.5, 2.0 ** 31 - 0.25, 2.0 ** 31]


def test_q31_multipliers_agree_over_the_whole_shift_range():
    """Below 2^-32 (shift -31, small q) up to the largest multiplier, 2^31 - 1 (q = 2^31 - 1, shift 31); from
    2^31 - 1/2 up, q rounds to 2^31 and the shift to 32: both refuse. Floats and exact ratios of float32 scales."""
    floats = [*EDGE_MULTIPLIERS, *(2.0 ** RNG.uniform(-70, 31.5, 3000))]
    refused = 0
    for m in floats:
        try:
            want = ref.q31(Fraction(m))
        except HyqError:
            refused += 1
            with pytest.raises(HyqError, match="too large"):
                fixed_point_multiplier(m)
            continue
        assert tuple(int(v) for v in fixed_point_multiplier(m)) == want, m
    assert refused >= 3 and ref.q31(Fraction(2 ** 31 - 1)) == (2 ** 31 - 1, 31)
    assert ref.q31(Fraction(2.0 ** -64)) == (0, -31) and ref.q31(Fraction(1.5 * 2.0 ** -63)) == (1, -31)  # * 2^62
    s_a, s_w, s_o = log_uniform(2000, -20, 0), log_uniform(2000, -12, 0), log_uniform(2000, -30, 4)
    q, shift = fixed_point_multiplier(exact_ratio(s_a.astype(np.float64) * s_w, s_o))  # the array path
    want = [ref.q31(ref.exact(a) * ref.exact(w) / ref.exact(o)) for a, w, o in zip(s_a, s_w, s_o)]
    assert list(zip(q.tolist(), shift.tolist())) == want


def test_a_multiplier_float64_rounds_onto_a_tie_is_rounded_exactly():
    """s_a * s_w / s_o is 2143289343.5 - 2^-24.9 units of q: float64 division rounds it onto the half and then up."""
    s_a, s_w, s_o = np.float32(0.007797242142260075), np.float32(2.0 ** -7), np.float32(0.1250000149011612)
    acc_scale = np.float64(s_a) * np.float64(s_w)
    mant, _ = np.frexp(acc_scale / np.float64(s_o))
    assert int(np.floor(mant * 2.0 ** 31 + 0.5)) == 2143289345  # float64: one unit too many
    assert ref.q31(ref.exact(s_a) * ref.exact(s_w) / ref.exact(s_o)) == (2143289344, -11)
    q, left, right, c, _ = requant_params(acc_scale, np.float64(s_o), np.int64(0), None, np.int64(1), "crafted")
    assert (int(q[0]), int(left[0]), int(right[0]), int(c[0])) == (2143289344, 0, 42, 2 ** 41)


# -- requantization ------------------------------------------------------------------------------------------------

def _near_ties(q: int, shift: int, bias: Fraction, bound: int, span: int, n: int) -> list[int]:
    """Accumulators (|acc| <= bound) whose requantized value (|value| < span) is within one accumulator step of a
    rounding tie."""
    m = Fraction(q) * Fraction(2) ** (shift - 31)
    out = []
    for t in RNG.integers(-span, span, n):
        acc = math.floor((int(t) + Fraction(1, 2)) / m - bias)
        out += [a for a in (acc - 1, acc, acc + 1) if abs(a) <= bound]
    return out


@pytest.mark.parametrize("out_dtype", ["int8", "int32"])
def test_requantization_from_random_scales_matches_the_reference(out_dtype):
    """Per-channel multipliers over 2^-40 .. 2^20 (shifts -31 .. 21), biases up to |b * 2^L| < 2^31 accumulator steps,
    output zero points at the extremes, accumulators up to the largest the int64 check accepts (int32 at most),
    near rounding ties: the rule's constants, its numpy twin and its TIR kernel equal the reference bit for bit."""
    channels, n = 48, 64
    s_a, s_w = log_uniform(1, -10, 0)[0], log_uniform(channels, -12, -4)
    acc_scale = np.float64(s_a) * s_w.astype(np.float64)
    s_o = (acc_scale / 2.0 ** RNG.uniform(-40, 20, channels)).astype(np.float32)
    info = np.iinfo(out_dtype)
    z_o = zero_points(channels, max(int(info.min), -2 ** 20), min(int(info.max), 2 ** 20))
    q, shift = fixed_point_multiplier(exact_ratio(acc_scale, s_o))
    limit = 2.0 ** 31 / 2.0 ** np.maximum(shift, 0)  # |b| * 2^L < 2^31
    bias_steps = RNG.uniform(-1, 1, channels) * limit * np.where(RNG.random(channels) < 0.3, 0.999, 1e-3)
    bias_steps[:4] = 0
    bias = (bias_steps * acc_scale).astype(np.float32)
    b = exact_ratio(bias, acc_scale)
    c = rounding_term(q, shift, b)
    scaled = [int(qi) << max(int(si), 0) for qi, si in zip(q, shift)]
    bound = [min(2 ** 31 - 1, (INT64_MAX - abs(int(ci))) // k) for ci, k in zip(c, scaled)]
    for i in np.flatnonzero(np.array(bound) < 2 ** 31 - 1)[:5]:  # the documented int64 limit, exactly
        check_range(np.int64(bound[i]), q[i], shift[i], c[i])
        with pytest.raises(HyqError, match="overflows int64"):
            check_range(np.int64(bound[i] + 1), q[i], shift[i], c[i])
    params = requant_params(acc_scale, s_o.astype(np.float64), z_o, b, np.array(bound, np.int64), "random")
    rows = []
    for ch in range(channels):
        near = _near_ties(int(q[ch]), int(shift[ch]), b[ch], bound[ch], 300 if out_dtype == "int8" else 2 ** 20, 8)
        edge = [bound[ch], -bound[ch], 0, 1, -1]
        rest = RNG.integers(-bound[ch], bound[ch] + 1, n - len(edge) - len(near[:n // 2]))
        rows.append(np.array([*edge, *near[:n // 2], *rest], np.int64))
    acc = np.stack(rows).astype(np.int32)
    acc_scales = [ref.exact(s_a) * ref.exact(w) for w in s_w]
    want = ref.gemm_output(acc, acc_scales, s_o, z_o, 0, out_dtype, bias)
    expected = []  # (q, L, R, c) by the reference's definitions
    for a, o, v in zip(acc_scales, s_o, bias):
        q_ref, shift_ref = ref.q31(a / ref.exact(o))
        left, right = max(shift_ref, 0), 31 + max(-shift_ref, 0)
        expected.append((q_ref, left, right, (1 << (right - 1)) + ref.round_half_up(ref.exact(v) / a * (q_ref << left))))
    assert list(zip(*(p.tolist() for p in params[:4]))) == expected
    np.testing.assert_array_equal(requantize_acc(acc, acc_scale, s_o, z_o, 0, out_dtype, b), want)
    kernel = requantize_primfunc(acc.shape, 0, channels, True, out_dtype)
    np.testing.assert_array_equal(run(kernel, acc, *params, np.zeros(acc.shape, out_dtype)), want)
    assert len(np.unique(want)) > 100  # not all saturated


def test_a_large_bias_is_carried_exactly():
    """A bias of 10^9 accumulator steps (the limit is 2^31): b * q is near 2^60, where float64 moved the rounding
    term by 40 units."""
    q, shift = fixed_point_multiplier(0.0123)
    assert int(shift) == -6  # L = 0, R = 37
    bias = exact_ratio(np.float32(20000.0), np.float64(np.float32(0.01)) * np.float64(np.float32(0.002)))[()]
    want = (1 << 36) + ref.round_half_up(bias * int(q))
    assert int(rounding_term(q, shift, bias)) == want
    assert (1 << 36) + int(np.floor(float(bias) * float(q) + 0.5)) == want - 40  # float64


# -- residual add / concat -----------------------------------------------------------------------------------------

def test_rescaled_sums_from_random_scales_match_the_reference():
    """One to three inputs with per-channel scales up to 2^22 apart and zero points at the extremes, onto per-channel
    or per-tensor output grids: the rule's numpy twin and TIR kernel equal the reference."""
    channels = 16
    for trial in range(40):
        inputs = 1 + trial % 3
        per_channel = trial % 2 == 0
        base = RNG.uniform(-12, 0)
        in_scales = [log_uniform(channels if per_channel else 1, base - 11, base + 11) for _ in range(inputs)]
        in_scales = [s if per_channel else s[0] for s in in_scales]
        z_in = [zero_points(channels) if per_channel else zero_points(1)[0] for _ in range(inputs)]
        s_o = log_uniform(channels, base - 2, base + 4) if per_channel else log_uniform(1, base - 2, base + 4)[0]
        z_o = zero_points(channels) if per_channel else np.int64(RNG.integers(-128, 128))
        xs = [int8_extremes((2, channels, 9)) for _ in range(inputs)]
        want = ref.rescaled(xs, z_in, in_scales, s_o, z_o, 1, "int8")
        np.testing.assert_array_equal(rescaled_sum(xs, z_in, in_scales, s_o, z_o, 1), want)
        if trial == 0:
            k, c, rs = rescale_params(in_scales, s_o)
            params = [np.stack(z_in).astype(np.int32), k, c, rs, z_o.astype(np.int32)]
            kernel = rescale_primfunc(xs[0].shape, 1, channels, inputs)
            np.testing.assert_array_equal(run(kernel, *xs, *params, np.zeros(xs[0].shape, np.int8)), want)
    with pytest.raises(HyqError, match="more than 2"):
        rescale_params([np.float64(1.0), np.float64(2.0 ** -24)], np.float64(2.0 ** -20))


def test_concatenations_split_per_channel_output_grids_like_the_reference():
    xs = [int8_extremes((1, 3, 4)), int8_extremes((1, 5, 4))]
    z_in, in_scales = [zero_points(1)[0], zero_points(1)[0]], [log_uniform(1, -8, -2)[0], log_uniform(1, -8, -2)[0]]
    s_o, z_o = log_uniform(8, -7, -3), zero_points(8)
    want = ref.concatenated(xs, z_in, in_scales, s_o, z_o, 1, 1, "int8")
    np.testing.assert_array_equal(rescaled_concat(xs, z_in, in_scales, s_o, z_o, 1, 1), want)


# -- lookup tables -------------------------------------------------------------------------------------------------

def _call(name: str, args: tuple[float, ...]):
    """A stand-in for the Relax call ELEMENTWISE reads its arguments from."""
    if name == "relax.clip":
        return SimpleNamespace(args=[None, *(SimpleNamespace(value=v) for v in args)])
    return SimpleNamespace(attrs=SimpleNamespace(alpha=args[0] if args else 0.0))


FUNCTIONS = [("relax.nn.relu", ()), ("relax.nn.leakyrelu", (0.1,)), ("relax.clip", (-1.5, 6.0)),
             ("relax.clip", (0.0, float("inf"))), ("relax.nn.gelu", ()), ("relax.nn.gelu_tanh", ()),
             ("relax.nn.silu", ()), ("relax.sigmoid", ()), ("relax.tanh", ())]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the float64 SiLU of -v far below -709
@pytest.mark.parametrize("name,args", FUNCTIONS)
def test_lookup_tables_from_random_scales_match_the_reference(name, args):
    """Input and output scales over 2^-10 .. 2^2, zero points at the extremes: every entry of the rule's float64
    table equals the exact (or 160-bit) quantize(f(dequantize(x))); a per-channel lookup too."""
    call = _call(name, args)
    for s_in, z_in, s_o, z_o in zip(log_uniform(12, -10, 2), zero_points(12), log_uniform(12, -10, 2), zero_points(12)):
        table = lookup_table(lambda v: ELEMENTWISE[name](v, call), np.float64(s_in), z_in, np.float64(s_o), z_o, 1)
        np.testing.assert_array_equal(table[0], ref.lookup_table(name, args, float(s_in), int(z_in), float(s_o),
                                                                 int(z_o)))
    params = (log_uniform(4, -8, 0), zero_points(4), log_uniform(4, -8, 0), zero_points(4))
    x = int8_extremes((2, 4, 3))
    table = lookup_table(lambda v: ELEMENTWISE[name](v, call), *(p.astype(np.float64) for p in params), 4)
    np.testing.assert_array_equal(lookup(x, table, 1), ref.looked_up(x, name, args, *params, 1, "int8"))


# -- softmax -------------------------------------------------------------------------------------------------------

CRAFTED_SOFTMAX = [(0.0011075053, 107, 953750200), (0.00081473985, 52, 1029201344), (0.0041717123, 247, 383175042)]


def test_softmax_exp_tables_match_the_reference_where_float64_rounded_up():
    """Entries whose exact value lies just below a half: float64 exp * 2^30 landed on the half and rounded up."""
    for scale, d, entry in CRAFTED_SOFTMAX:
        s = float(np.float32(scale))
        assert np.floor(np.exp(-s * d) * 2.0 ** PROB_BITS + 0.5) == entry + 1  # float64: one too many
        assert ref.exp_table(s)[d] == entry and softmax_table(s)[d] == entry
    for s in log_uniform(40, -12, 3):
        np.testing.assert_array_equal(softmax_table(float(s)), ref.exp_table(float(s)))


@pytest.mark.parametrize("out_axis", [2, 1])
def test_softmax_from_random_scales_matches_the_reference(out_axis):
    """Input scales over 2^-8 .. 2^2, output grids per tensor or per head, zero points at the extremes."""
    for _ in range(10):
        x = int8_extremes((2, 3, 17))
        s_in = float(log_uniform(1, -8, 2)[0])
        width = x.shape[out_axis] if out_axis != 2 else 1
        s_o, z_o = log_uniform(width, -9, -6), zero_points(width)
        want = ref.softmaxed(x, s_in, s_o, z_o, out_axis, "int8")
        got = requantize_acc(softmax_probs(x, softmax_table(s_in)), 2.0 ** -PROB_BITS, s_o if width > 1 else s_o[0],
                             z_o if width > 1 else z_o[0], out_axis)
        np.testing.assert_array_equal(got, want)


# -- norm ----------------------------------------------------------------------------------------------------------

def test_a_norm_gain_float64_rounds_onto_a_tie_is_rounded_exactly():
    """gamma / s_o * 2^29 is 65970529894.5 - 2^-24.9: float64 rounded it onto the half and then up."""
    gamma, s_o = np.float32(122.8797607421875), np.float32(1.0000005960464478)
    assert np.floor(np.float64(gamma) / np.float64(s_o) * 2.0 ** 29 + 0.5) == 65970529895
    params = norm_params(np.float64(0.1), np.float64(gamma), np.float64(0.0), np.float64(s_o), 1e-5, 1, 64)
    grid = ref.norm_grid([ref.exact(0.1)], [ref.exact(gamma)], [Fraction(0)], [ref.exact(s_o)], ref.exact(1e-5), 64)
    assert (params.shift, int(params.gain[0])) == (grid[4], grid[2][0]) == (29, 65970529894)


@pytest.mark.parametrize("count", [1, 3, 64, 384, 4096, 5000])
def test_norms_from_random_scales_match_the_reference(count):
    """LayerNorms over 1 .. 5000 channels (input bits 16 down to 15), channel scales up to 2^20 apart (the finest
    channels rounding to multiplier 0), epsilons from 1e-12 to 1e-1 or 2^50 grid steps, gains and offsets of up to 2^17 output steps
    (shift 19) and, last, beyond the shift limit (refused by both), constant and extreme rows: the rule's
    NormParams and numpy twin equal the reference."""
    for trial in range(5):
        spread = (0, 3, 12, 20, 6)[trial]
        s_in = log_uniform(count, -6 - spread, -6)
        z_in = zero_points(count)
        gamma = (RNG.normal(0, 1, count) * 2.0 ** RNG.uniform(-2, 3)).astype(np.float32)
        beta = RNG.normal(0, 1, count).astype(np.float32)
        s_o = ((2 * np.abs(gamma) + np.abs(beta) + 1e-3) / 100 * 2.0 ** RNG.uniform(-1, 1, count)).astype(np.float32)
        s_o[0] /= 2.0 ** 10
        s_o[-1] /= 2.0 ** 26 if trial == 4 else 1.0
        z_o = zero_points(count)
        eps = min(float(10.0 ** RNG.uniform(-12, -1)), 2.0 ** 50 * (float(s_in.max()) * 2.0 ** -16) ** 2)  # < 2^51 steps
        x = int8_extremes((4, count))
        x[0], x[1] = 7, np.where(np.arange(count) % 2, 127, -128)  # a constant row (variance 0), an extreme one
        try:
            params = norm_params(s_in.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64),
                                 s_o.astype(np.float64), eps, count, count)
        except HyqError:
            with pytest.raises(HyqError, match="too large"):
                ref.norm_grid(*(ref.channels(v, count) for v in (s_in, gamma, beta, s_o)), ref.exact(eps), count)
            assert trial == 4
            continue
        grid = ref.norm_grid(*(ref.channels(v, count) for v in (s_in, gamma, beta, s_o)), ref.exact(eps), count)
        assert (params.multiplier.tolist(), params.eps, params.gain.tolist(), params.offset.tolist(),
                params.shift) == grid
        want = ref.normalized(x, s_in, z_in, gamma, beta, eps, s_o, z_o, 1, (1,), "int8")
        np.testing.assert_array_equal(integer_norm(x, z_in, params, z_o, 1, (1,)), want)
        assert trial < 4 and (count < 64 or len(np.unique(want)) >= 20)  # not all saturated


def test_group_norm_from_random_scales_matches_the_reference():
    x = int8_extremes((2, 6, 5, 4))
    s_in, z_in = log_uniform(6, -8, -4), zero_points(6)
    gamma, beta = RNG.normal(0, 1, 6).astype(np.float32), RNG.normal(0, 1, 6).astype(np.float32)
    s_o, z_o = log_uniform(6, -6, -4), zero_points(6)
    params = norm_params(s_in.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64),
                         s_o.astype(np.float64), 1e-5, 6, 120)
    want = ref.normalized(x, s_in, z_in, gamma, beta, 1e-5, s_o, z_o, 1, (1, 2, 3), "int8")
    np.testing.assert_array_equal(integer_norm(x, z_in, params, z_o, 1, (1, 2, 3)), want)


# -- whole graphs --------------------------------------------------------------------------------------------------

def _qdq(bb, y, scale, zero, axis: int = -1):
    """(quantize(y), dequantize of it) with one set of parameters: an int8 tensor entering the next layer."""
    q = bb.emit(relax.op.quantize(y, const(scale, "float32"), const(zero, "int8"), axis=axis))
    return q, bb.emit(dq(q, scale, zero, axis))


def _out_scale(acc_scale: float, terms: int) -> np.float32:
    """An output scale that spreads a sum of `terms` int8 products over about +-40 steps (within 2^+-1)."""
    return np.float32(acc_scale * np.sqrt(terms) * 150 * 73 / 40 * 2.0 ** RNG.uniform(-1, 1))


def random_graph(channels: int, lookup_op: str):
    """Every rule in one QDQ graph with random scales and zero points (the int8 extremes among them): depthwise conv
    + bias + ReLU, 1x1 conv + bias + clip (per-channel output grid), residual add, an elementwise lookup, LayerNorm
    over tokens, linear + bias, q @ q^T, softmax, attn @ v with a float output."""
    c, hw = channels, 5
    s0, z0 = log_uniform(c, -7, -4), zero_points(c).astype(np.int8)
    w0, s_w0 = RNG.integers(-127, 128, (c, 1, 3, 3)).astype(np.int8), log_uniform(c, -9, -6)
    w1, s_w1 = RNG.integers(-127, 128, (c, c, 1, 1)).astype(np.int8), log_uniform(c, -9, -6)
    w6, s_w6 = RNG.integers(-127, 128, (c, c)).astype(np.int8), log_uniform(c, -9, -6)
    s1 = _out_scale(float(s0.mean() * s_w0.mean()), 9)
    s2 = np.array([_out_scale(float(s1) * float(s), c) for s in s_w1], np.float32)
    z1, z2 = np.int8(-128), zero_points(c).astype(np.int8)
    s3 = np.float32((100 * float(s0.mean()) + 40 * float(s2.mean())) / 40 * 2.0 ** RNG.uniform(-1, 0))
    s4, s5 = np.float32(s3 * 2.0 ** RNG.uniform(-1, 0)), np.float32(0.03 * 2.0 ** RNG.uniform(-1, 1))
    s6 = _out_scale(float(s5 * s_w6.mean()), c)
    s7 = np.float32(float(s6) ** 2 * np.sqrt(c) * 10 * 2.0 ** RNG.uniform(-1, 0))  # sums of products of tens of steps
    s8 = np.float32(2.0 ** RNG.uniform(-9, -7))
    z3, z4, z5, z6, z7 = (np.int8(v) for v in RNG.integers(-64, 65, 5))
    gamma, beta = RNG.uniform(0.5, 2, c).astype(np.float32), RNG.normal(0, 0.5, c).astype(np.float32)
    functions = {"gelu": relax.op.nn.gelu, "silu": relax.op.nn.silu, "sigmoid": relax.op.sigmoid}

    def body(bb, x):
        xd = bb.emit(dq(x, s0, z0, axis=1))
        y = bb.emit(relax.op.nn.conv2d(xd, bb.emit(dq(const(w0, "int8"), s_w0, np.zeros(c, np.int8), axis=0)),
                                       padding=(1, 1, 1, 1), groups=c))
        y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, const(RNG.normal(0, 20 * s1, (1, c, 1, 1)), "float32")))))
        _, d1 = _qdq(bb, y, s1, z1)
        y = bb.emit(relax.op.nn.conv2d(d1, bb.emit(dq(const(w1, "int8"), s_w1, np.zeros(c, np.int8), axis=0))))
        y = bb.emit(relax.op.add(y, const(RNG.normal(0, 10 * float(s2.mean()), (1, c, 1, 1)), "float32")))
        y = bb.emit(relax.op.clip(y, -30 * float(s2.mean()), 50 * float(s2.mean())))
        _, d2 = _qdq(bb, y, s2, z2, axis=1)
        _, d3 = _qdq(bb, bb.emit(relax.op.add(d2, xd)), s3, z3)
        q4, _ = _qdq(bb, bb.emit(functions[lookup_op](d3)), s4, z4)
        tokens = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(q4, (1, c, hw * hw))), [0, 2, 1]))
        y = bb.emit(relax.op.nn.layer_norm(bb.emit(dq(tokens, s4, z4)), const(gamma, "float32"),
                                           const(beta, "float32"), axes=[-1]))
        _, d5 = _qdq(bb, y, s5, z5)
        w = bb.emit(relax.op.permute_dims(bb.emit(dq(const(w6, "int8"), s_w6, np.zeros(c, np.int8), axis=0))))
        y = bb.emit(relax.op.add(bb.emit(relax.op.matmul(d5, w)), const(RNG.normal(0, 10 * float(s6), c), "float32")))
        _, d6 = _qdq(bb, y, s6, z6)
        _, d7 = _qdq(bb, bb.emit(relax.op.matmul(d6, bb.emit(relax.op.permute_dims(d6, [0, 2, 1])))), s7, z7)
        _, d8 = _qdq(bb, bb.emit(relax.op.nn.softmax(d7, axis=-1)), s8, np.int8(-128))
        return relax.op.matmul(d8, d6)

    return module({"x": ((1, c, hw, hw), "int8")}, body), int8_extremes((1, c, hw, hw))


@pytest.mark.parametrize("channels,lookup_op", [(8, "gelu"), (12, "silu")])
def test_random_graphs_are_bit_exact_with_the_reference(channels, lookup_op):
    """TVM's build of every rule, with random scales and zero points, equals the independent reference layer by
    layer; so does each rule's own numpy twin on the same inputs."""
    mod, x = random_graph(channels, lookup_op)
    out, layers = integerize_layers(mod)
    assert [layer.op for layer in layers] == ["conv2d", "conv2d", "add", "lookup", "norm", "matmul", "matmul",
                                              "softmax", "matmul"]
    _, values = run_debug(debug_vm(out, layers, TARGET), layers, x)
    checks = check_values(layers, values)
    assert first_mismatch(checks) is None, checks
    for layer in layers:
        np.testing.assert_array_equal(layer.reference(values), values[layer.result], err_msg=layer.name)
        assert len(np.unique(values[layer.result])) >= 5, (layer.op, np.unique(values[layer.result]))  # not saturated


# -- resize --------------------------------------------------------------------------------------------------------

def test_resizes_from_random_sizes_and_scales_match_the_reference():
    """Random sizes (1 .. 9 inputs to 1 .. 13 outputs per axis), nearest and bilinear, every coordinate mode and
    rounding method, NCHW and NHWC, per-channel or per-tensor grids up to 2^4 apart with zero points at the
    extremes: the rule's integer weights are the reference's interpolation matrices and its numpy twin equals the
    reference; so does its TIR kernel, for the first draw."""
    from hyq_tvm.relax.integer.requantize import requant_params
    from hyq_tvm.relax.integer.resize import MAX_DENOMINATOR, axis_taps, resize_primfunc, resized

    modes = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]
    roundings = ["", "round", "round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
    checked = 0
    for trial in range(80):
        (h, w), axis = ((2, 3), 1) if trial % 2 == 0 else ((1, 2), 3)
        method = ("linear", "nearest_neighbor")[trial // 2 % 2]
        mode, rounding = modes[RNG.integers(len(modes))], roundings[RNG.integers(len(roundings))]
        n, m = RNG.integers(1, 10, 2).tolist(), RNG.integers(1, 14, 2).tolist()
        taps = [axis_taps(a, b, method, mode, rounding) for a, b in zip(n, m)]
        if any(t is None for t in taps) or taps[0][2] * taps[1][2] > MAX_DENOMINATOR:
            continue
        for (index, weight, d), a, b in zip(taps, n, m):
            dense = np.zeros((b, a), np.int64)
            np.add.at(dense, (np.arange(b)[:, None], index), weight)
            exact = ref.interpolation(a, b, method, mode, rounding)
            assert d == math.lcm(*(v.denominator for row in exact for v in row))
            np.testing.assert_array_equal(dense, [[int(v * d) for v in row] for row in exact])
        (ih, wh, dh), (iw, ww, dw) = taps
        channels = 6
        shape = [2, 0, 0, 0]
        shape[h], shape[w], shape[axis] = n[0], n[1], channels
        x = int8_extremes(tuple(shape))
        width = channels if trial % 3 else 1
        s_in, z_in = log_uniform(width, -8, -3), zero_points(width)
        s_o, z_o = (s_in * 2.0 ** RNG.uniform(-4, 4, width)).astype(np.float32), zero_points(width)
        if width == 1:
            s_in, z_in, s_o, z_o = s_in[0], z_in[0], s_o[0], z_o[0]
        want = ref.resized(x, s_in, z_in, s_o, z_o, method, mode, rounding, tuple(m), (h, w), axis, "int8")
        got = resized(x, z_in, (ih, iw), (wh, ww), dh * dw, (h, w), np.float64(s_in) if width == 1 else
                      s_in.astype(np.float64), s_o, z_o, axis)
        np.testing.assert_array_equal(got, want)
        if checked == 0:
            params = [np.broadcast_to(p, (width,)) for p in requant_params(
                np.asarray(s_in, np.float64), dh * dw * np.asarray(s_o, np.float64), np.asarray(z_o), None,
                np.int64(255 * dh * dw), "random")]
            out_shape = list(shape)
            out_shape[h], out_shape[w] = m
            kernel = resize_primfunc(tuple(shape), tuple(out_shape), (h, w), (ih.shape[1], iw.shape[1]), axis, width,
                                     bool(np.any(params[1])))
            z = np.broadcast_to(np.asarray(z_in, np.int32), (width,))
            np.testing.assert_array_equal(run(kernel, x, ih, wh, iw, ww, z, *params, np.zeros(out_shape, np.int8)),
                                          want)
        checked += 1
    assert checked >= 40


# -- subtract / requantize / affine --------------------------------------------------------------------------------

def _random_steps(count: int, shape: tuple[int, ...]) -> list[tuple[str, np.ndarray, bool]]:
    """`count` constant steps on a tensor of `shape` (axis 1 the channels): multiplies and divides by scalars or per
    channel (a zero entry at times), adds and subtracts of scalars, per-channel values or tensors broadcasting to the
    input; either side (a divisor on the right); of either sign, magnitudes 2^-2 .. 2^2."""
    steps = []
    for _ in range(count):
        op = ("add", "subtract", "multiply", "divide")[RNG.integers(4)]
        shapes = [(), (shape[1], 1)] + ([(shape[-1],), shape[1:], shape] if op in ("add", "subtract") else [])
        size = shapes[RNG.integers(len(shapes))]
        c = np.asarray(RNG.choice([-1, 1], size) * 2.0 ** RNG.uniform(-2, 2, size), np.float32)
        if op == "multiply" and c.ndim and RNG.integers(3) == 0:
            c.flat[0] = 0.0
        steps.append((op, c, op != "divide" and bool(RNG.integers(2))))
    return steps


def _chain_graph(shape, grids, steps, out_grid, subtract: bool):
    """quantize(steps(subtract(dq(a), dq(b)))) when `subtract`, else quantize(steps(dq(a))); grids along axis 1."""
    def body(bb, *xs):
        ys = [bb.emit(dq(x, s, z, axis=1)) for x, (s, z) in zip(xs, grids)]
        y = bb.emit(relax.op.subtract(*ys)) if subtract else ys[0]
        for op, c, left in steps:
            y = bb.emit(getattr(relax.op, op)(*((const(c, "float32"), y) if left else (y, const(c, "float32")))))
        return relax.op.quantize(y, const(out_grid[0], "float32"), const(out_grid[1], "int8"), axis=1)

    return module({name: (shape, "int8") for name, _ in zip("ab", grids)}, body)


def test_subtractions_requantizations_and_affine_chains_from_random_scales_match_the_reference():
    """Grids per tensor or per channel (zero points at the extremes), subtractions of scales up to 2^11 apart,
    requantizations, chains of one to six constant steps (multipliers negative or zero, per-channel or tensor offsets;
    output grids fitted to the result, or up to 2^8 times finer so that offsets reach thousands of steps): each
    recorded layer's numpy twin equals the reference."""
    shape, checked = (2, 6, 5), 0
    for trial in range(60):
        op = ("subtract", "requantize", "affine")[trial % 3]
        width = shape[1] if trial % 2 == 0 else 1

        def grid():
            s, z = log_uniform(width, -8, 3), zero_points(width) if width > 1 else RNG.integers(-128, 128, 1)
            return (s, z.astype(np.int8)) if width > 1 else (s[0], np.int8(z[0]))

        grids = [grid() for _ in range(2 if op == "subtract" else 1)]
        steps = _random_steps(1 + trial % 6, shape) if op == "affine" else []
        xs = [int8_extremes(shape) for _ in grids]
        v = [(x - np.reshape(z, (-1, 1)).astype(np.float64)) * np.reshape(s, (-1, 1)) for x, (s, z) in zip(xs, grids)]
        v = v[0] - v[1] if op == "subtract" else v[0]
        for name, c, left in steps:
            v = getattr(np, name)(*((c, v) if left else (v, c)))
        spread = np.abs(v).max(axis=(0, 2) if width > 1 else None) / 100
        finer = 2.0 ** (RNG.uniform(-8, 0) if trial % 4 == 3 else RNG.uniform(-1, 1))
        out_grid = (np.maximum(spread * finer, 1e-6).astype(np.float32), grid()[1])
        _, layers = integerize_layers(_chain_graph(shape, grids, steps, out_grid, op == "subtract"))
        assert [layer.op for layer in layers] == [op], steps
        values = dict(zip(layers[0].inputs, xs))
        got = layers[0].reference(values)
        np.testing.assert_array_equal(got, ref.expected(layers[0], values), err_msg=str(steps))
        checked += len(np.unique(got)) >= 10
    assert checked >= 30


# -- pool / product ------------------------------------------------------------------------------------------------

def test_pools_from_random_scales_match_the_reference():
    """Average pools with random kernels, strides, dilations, paddings, ceil_mode and count_include_pad, adaptive
    pools, means and sums over random axes (keepdims or not), scales over 2^-10 .. 2^0 per tensor or per channel along
    a kept axis, zero points at the extremes: the rule's numpy twin equals the reference on every recorded layer."""
    checked = 0
    for trial in range(48):
        kind, per_channel = trial % 4, trial % 8 < 4
        if kind == 0:  # avg_pool2d
            kernel, strides, dilation = ([int(v) for v in RNG.integers(1, hi, 2)] for hi in (5, 4, 3))
            spans = [r * (k - 1) + 1 for k, r in zip(kernel, dilation)]
            shape = (2, 3, *(int(s + RNG.integers(0, 6)) for s in spans))
            padding = [int(RNG.integers(0, k // 2 + 1)) for k in (*kernel, *kernel)]
            ceil, include = bool(RNG.random() < 0.5), bool(RNG.random() < 0.5)

            def pool(v):
                return relax.op.nn.avg_pool2d(v, kernel, strides, padding, dilation, ceil, include)
            in_axis = out_axis = 1
        elif kind == 1:  # adaptive_avg_pool2d
            size, window = RNG.integers(1, 4, 2), RNG.integers(1, 5, 2)
            shape = (1, 3, *(int(v) for v in size * window))

            def pool(v):
                return relax.op.nn.adaptive_avg_pool2d(v, [int(s) for s in size])
            in_axis = out_axis = 1
        else:  # mean / sum
            shape = tuple(int(v) for v in RNG.integers(1, 7, RNG.integers(2, 5)))
            axes = [d for d in range(len(shape)) if RNG.random() < 0.5] or [len(shape) - 1]
            kept = [d for d in range(len(shape)) if d not in axes]
            keepdims = bool(RNG.random() < 0.5) or not kept  # not to a scalar, which stays float
            in_axis = max(kept, key=lambda d: shape[d], default=0)
            out_axis = in_axis if keepdims else kept.index(in_axis)
            per_channel = per_channel and bool(kept)
            op = relax.op.mean if kind == 2 else relax.op.sum

            def pool(v):
                return op(v, axis=axes, keepdims=keepdims)
        width = shape[in_axis] if per_channel else 1
        s_in, z_in = log_uniform(width, -10, 0), zero_points(max(width, 3))
        z_in = z_in[:width] if per_channel else z_in[trial % 3:][:1]
        count = 1 if kind < 3 else int(np.prod([shape[d] for d in axes]))  # the elements a sum adds
        s_o = (s_in * np.sqrt(count) * 2.0 ** RNG.uniform(-2, 1, width)).astype(np.float32)
        z_o = np.clip(np.round((z_in + 0.5) * count * s_in / s_o), -128, 127).astype(np.int64)  # the mean on z_o
        if not per_channel:
            s_in, z_in, s_o, z_o = s_in[0], z_in[0], s_o[0], z_o[0]
            in_axis = out_axis = -1

        def body(bb, xv):
            y = bb.emit(pool(bb.emit(dq(xv, s_in, z_in.astype(np.int8), axis=in_axis))))
            return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=out_axis)

        _, layers = integerize_layers(module({"x": (shape, "int8")}, body))
        assert [layer.op for layer in layers] == ["pool"], (trial, shape)
        values = {layers[0].inputs[0]: int8_extremes(shape)}
        got = layers[0].reference(values)
        np.testing.assert_array_equal(got, ref.expected(layers[0], values), err_msg=str((trial, shape)))
        checked += bool(np.any((got > -128) & (got < 127)))  # not all saturated
    assert checked >= 40


def test_products_from_random_scales_match_the_reference():
    """Products of two int8 activations with random shapes broadcast against each other (lower ranks too), scales
    over 2^-10 .. 2^0 per tensor or per channel along a shared axis, zero points at the extremes: the rule's numpy
    twin equals the reference on every recorded layer."""
    checked = 0
    for trial in range(40):
        full = [int(v) for v in RNG.integers(1, 6, RNG.integers(1, 5))]
        shapes = []
        for _ in range(2):
            shape = [n if RNG.random() < 0.7 else 1 for n in full]
            shapes.append(tuple(shape[int(RNG.integers(0, len(full))) if RNG.random() < 0.3 else 0:]))
        out_shape = np.broadcast_shapes(*shapes)
        ndim = len(out_shape)
        axis = max(range(ndim), key=lambda d: out_shape[d]) if trial % 2 and max(out_shape) > 1 else None
        width = 1 if axis is None else out_shape[axis]
        grids = []
        for shape in shapes:
            own = None if axis is None else axis - (ndim - len(shape))
            channels = width if own is not None and own >= 0 and shape[own] == width else 1
            grids.append((log_uniform(channels, -10, 0), zero_points(channels), own if channels > 1 else -1))
        (s_a, z_a, _), (s_b, z_b, _) = grids
        s_o = (s_a * s_b * 2.0 ** RNG.uniform(7, 9, width)).astype(np.float32)
        mean = (z_a + 0.5) * (z_b + 0.5) * (s_a.astype(np.float64) * s_b / s_o)  # of a product, in output steps
        z_o = np.clip(np.round(-mean), -128, 127).astype(np.int64)

        def body(bb, av, bv):
            a, b = (bb.emit(dq(v, s, z.astype(np.int8), axis=d)) for v, (s, z, d) in zip((av, bv), grids))
            y = bb.emit(relax.op.multiply(a, b))
            return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=-1 if axis is None else axis)

        _, layers = integerize_layers(module({"a": (shapes[0], "int8"), "b": (shapes[1], "int8")}, body))
        assert [layer.op for layer in layers] == ["product"], (trial, shapes)
        values = dict(zip(layers[0].inputs, (int8_extremes(s) for s in shapes)))
        got = layers[0].reference(values)
        np.testing.assert_array_equal(got, ref.expected(layers[0], values), err_msg=str((trial, shapes)))
        checked += bool(np.any((got > -128) & (got < 127)))  # not all saturated
    assert checked >= 34
