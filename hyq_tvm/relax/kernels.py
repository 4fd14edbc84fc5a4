"""The TIR kernels of the integer graph: requantization, rescaled sums (residual adds, concatenations),
table lookups (elementwise functions of int8 tensors) and the integer softmax and normalization of full mode.

The requantizing ones end in the fixed-point rule of requant.py; reference.py is their numpy twin.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx

from ..errors import HyqError

PROB_BITS = 30  # softmax probabilities and exp table entries are Q30 integers


def _saturated(value, out_dtype: str):
    """An int64 value clipped to the range of `out_dtype` and cast to it."""
    info = np.iinfo(out_dtype)
    return te.max(te.min(value, int(info.max)), int(info.min)).astype(out_dtype)


def _requantized(x, q, ls, rs, c, zp, ch, left_shift: bool, out_dtype: str):
    """clip((((x << ls) * q + c) >> rs) + zp, qmin, qmax) for an int64 x, parameters of channel `ch`."""
    if left_shift:
        x = x << ls[ch].astype("int64")
    r = (x * q[ch].astype("int64") + c[ch]) >> rs[ch].astype("int64")
    return _saturated(r + zp[ch].astype("int64"), out_dtype)


def _dims(shape) -> tuple:
    """A shape as int64 dims, as Relax's own legalized kernels have them (FuseTIR matches buffers by type)."""
    return tuple(tirx.IntImm("int64", int(d)) for d in shape)


def _placeholder(shape, dtype: str, name: str) -> te.Tensor:
    return te.placeholder(_dims(shape), dtype, name=name)


def _requant_params(channels: int):
    q, ls, rs, zp = (_placeholder((channels,), "int32", n) for n in ("q", "ls", "rs", "zp"))
    return q, ls, rs, _placeholder((channels,), "int64", "c"), zp


def requantize_primfunc(shape, axis: int, channels: int, left_shift: bool, out_dtype: str = "int8"):
    """PrimFunc(acc, q, ls, rs, c, zp, out): out = clip((((int64(acc) << ls) * q + c) >> rs) + zp, qmin, qmax).

    q, ls, rs, c (int64) and zp hold one value per channel along `axis` (one in all when channels is 1);
    `left_shift` says whether any ls is non-zero. requant.requantize is its numpy twin.
    """
    acc = _placeholder(shape, "int32", "acc")
    q, ls, rs, c, zp = _requant_params(channels)

    def body(*i):
        ch = i[axis] if channels > 1 else 0
        return _requantized(acc(*i).astype("int64"), q, ls, rs, c, zp, ch, left_shift, out_dtype)

    return te.create_prim_func([acc, q, ls, rs, c, zp, te.compute(_dims(shape), body, name="requantize")])


def rescale_primfunc(shape, axis: int, channels: int, inputs: int, out_dtype: str = "int8"):
    """PrimFunc(x_0, .., x_{n-1}, z, k, c, rs, zp, out): int8 tensors of one shape rescaled to one grid and summed,

        out = clip(((sum_i (int64(x_i) - z_i) * k_i + c) >> rs) + zp, qmin, qmax)

    z (int32) and k (int64) are (n, channels), c (int64), rs and zp (int32) are (channels,): one value per
    channel along `axis` (one in all when channels is 1). requant.rescale is its numpy twin.
    """
    xs = [_placeholder(shape, "int8", f"x{i}") for i in range(inputs)]
    z = _placeholder((inputs, channels), "int32", "z")
    k = _placeholder((inputs, channels), "int64", "k")
    c = _placeholder((channels,), "int64", "c")
    rs, zp = (_placeholder((channels,), "int32", n) for n in ("rs", "zp"))

    def body(*i):
        ch = i[axis] if channels > 1 else 0
        total = c[ch]
        for j, x in enumerate(xs):
            total = total + (x(*i).astype("int64") - z[j, ch].astype("int64")) * k[j, ch]
        return _saturated((total >> rs[ch].astype("int64")) + zp[ch].astype("int64"), out_dtype)

    return te.create_prim_func([*xs, z, k, c, rs, zp, te.compute(_dims(shape), body, name="rescale")])


def lookup_primfunc(shape, axis: int, channels: int, out_dtype: str = "int8"):
    """PrimFunc(x, table, out): out = table[channel, x + 128] for an int8 x; table is (channels, 256) of
    out_dtype, one row per channel along `axis` (one in all when channels is 1). reference.lookup is its twin."""
    x = _placeholder(shape, "int8", "x")
    table = _placeholder((channels, 256), out_dtype, "table")

    def body(*i):
        return table[i[axis] if channels > 1 else 0, x(*i).astype("int32") + 128]

    return te.create_prim_func([x, table, te.compute(_dims(shape), body, name="lookup")])


def lookup_table(func, in_scale, in_zero_point, out_scale, out_zero_point, channels: int,
                 out_dtype: str = "int8") -> np.ndarray:
    """(channels, 256) table of quantize(func(dequantize(q))) for every int8 q: func on float64 values, rounded
    half to even like the fake-quant model. Scales and zero points are () or (channels,)."""
    q = np.arange(-128, 128, dtype=np.float64)
    col = [np.broadcast_to(np.asarray(v, np.float64), (channels,))[:, None]
           for v in (in_scale, in_zero_point, out_scale, out_zero_point)]
    s_in, z_in, s_o, z_o = col
    info = np.iinfo(out_dtype)
    return np.clip(np.round(func(s_in * (q - z_in)) / s_o) + z_o, info.min, info.max).astype(out_dtype)


def softmax_table(scale: float) -> np.ndarray:
    """int32 table[d] = round(exp(-scale * d) * 2^30) for d = 0 .. 255: exp of an int8 input below its maximum."""
    d = np.arange(256, dtype=np.float64)
    return np.floor(np.exp(-float(scale) * d) * 2.0 ** PROB_BITS + 0.5).astype(np.int32)


def softmax_primfunc(shape, axis: int, channels: int, left_shift: bool, out_dtype: str = "int8"):
    """PrimFunc(x, table, q, ls, rs, c, zp, out): softmax over the last axis of an int8 x, requantized.

        e = table[max(x) - x]          exp on the input grid, Q30
        p = (e << 30) // sum(e)        the probability, Q30 (floor)
        out = requantize(p, q, ls, rs, c, zp)

    The requantization parameters hold one value per channel along `axis` (or one in all).
    reference.softmax_probs and requant.requantize are its numpy twin.
    """
    *outer, n = shape
    x = _placeholder(shape, "int8", "x")
    table = _placeholder((256,), "int32", "table")
    q, ls, rs, c, zp = _requant_params(channels)
    k = te.reduce_axis((0, n), name="k")
    top = te.compute(_dims(outer), lambda *i: te.max(x(*i, k).astype("int32"), axis=k), name="top")
    e = te.compute(_dims(shape), lambda *i: table[top(*i[:-1]) - x(*i).astype("int32")].astype("int64"), name="exp")
    k2 = te.reduce_axis((0, n), name="k2")
    total = te.compute(_dims(outer), lambda *i: te.sum(e(*i, k2), axis=k2), name="total")
    p = te.compute(_dims(shape), lambda *i: tirx.floordiv(e(*i) << PROB_BITS, total(*i[:-1])), name="prob")

    def body(*i):
        return _requantized(p(*i), q, ls, rs, c, zp, i[axis] if channels > 1 else 0, left_shift, out_dtype)

    return te.create_prim_func([x, table, q, ls, rs, c, zp, te.compute(_dims(shape), body, name="softmax")])


NORM_INPUT_BITS = 16  # at most: the widest input channel's step is 2^16 grid steps (|t| < 2^24), so that
                      # the variance stays below 2^52, where the float64 square root is exact


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


def norm_params(in_scale, gamma, beta, out_scale, eps: float, channels: int, count: int) -> NormParams:
    """The NormParams of a LayerNorm / GroupNorm(1) over `count` elements with these float parameters
    (arrays () or (C,)), chosen so that no int64 term of the kernel overflows for int8 inputs (|x - z| < 2^8).

    Input grid: |t| < 2^(8 + b) with b input bits, |d| < 2^(9 + b), sum(d^2) < count * 2^(18 + 2b) < 2^62.
    Output: |d * gain| and |offset * sigma| < 2^61 with sigma < 2^(9 + b), so |gain|, |offset| < 2^(52 - b).
    """
    input_bits = min(NORM_INPUT_BITS, (62 - 18 - int(np.ceil(np.log2(count)))) // 2)
    s_in = np.broadcast_to(np.asarray(in_scale, np.float64), (channels,))
    unit = s_in.max() * 2.0 ** -input_bits
    multiplier = np.floor(s_in / unit + 0.5).astype(np.int64)
    eps_steps = int(np.floor(eps / unit ** 2 + 0.5))
    ratio = [np.broadcast_to(np.asarray(v, np.float64) / np.asarray(out_scale, np.float64), (channels,))
             for v in (gamma, beta)]
    largest = max(float(np.abs(r).max()) for r in ratio)
    shift = min(30, 52 - input_bits - max(0, int(np.ceil(np.log2(largest + 1)))))
    if shift < 8 or eps_steps >= 2 ** 51:
        raise HyqError(f"a norm's gain or offset ({largest:g} output steps) or epsilon ({eps_steps} grid steps)"
                       " is too large for the integer norm")
    gain, offset = (np.floor(r * 2.0 ** shift + 0.5).astype(np.int64) for r in ratio)
    return NormParams(multiplier, eps_steps, gain, offset, shift)


def norm_primfunc(shape, axis: int, reduce_axes: tuple[int, ...], shift: int, out_dtype: str = "int8"):
    """PrimFunc(x, z, m, g, b, zp, eps, out): a LayerNorm / GroupNorm(1) of int8 x over `reduce_axes`, quantized.

        t = (x - z) * m                   each channel (along `axis`) on one integer grid, int64
        mu = floor(sum(t) / n + 1/2)      n: the number of reduced elements
        d = t - mu
        sigma = max(isqrt(floor(sum(d^2) / n) + eps), 1)
        out = clip(floor((d * g + b * sigma) / (sigma << shift) + 1/2) + zp)

    z, m, g, b, zp are per channel along `axis`; eps is a 1-element int64 tensor; g and b have `shift`
    fractional bits. isqrt is the correctly rounded float64 sqrt, floored: exact (and the same on every
    IEEE machine) for arguments below 2^52, which norm_params keeps the variance under.
    reference.integer_norm is its numpy twin.
    """
    x = _placeholder(shape, "int8", "x")
    channels = shape[axis]
    z = _placeholder((channels,), "int32", "z")
    m, g, b = (_placeholder((channels,), "int64", n) for n in ("m", "g", "b"))
    zp = _placeholder((channels,), "int32", "zp")
    eps = _placeholder((1,), "int64", "eps")
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
        return te.compute(_dims(row_shape), body, name=name)

    total = reduce("total", lambda i, row: t_of(i))
    mean = te.compute(_dims(row_shape), lambda *row: tirx.floordiv(total(*row) + count // 2, count), name="mean")
    square = reduce("square", lambda i, row: (t_of(i) - mean(*row)) * (t_of(i) - mean(*row)))

    def sigma_of(*row):
        var = tirx.floordiv(square(*row), count) + eps[0]
        return te.max(tirx.floor(tirx.sqrt(var.astype("float64"))).astype("int64"), tirx.const(1, "int64"))

    sigma = te.compute(_dims(row_shape), sigma_of, name="sigma")

    def body(*i):
        row = [i[k] for k in kept]
        ch = i[axis]
        s = sigma(*row)
        num = (t_of(i) - mean(*row)) * g[ch] + b[ch] * s + (s << (shift - 1))
        return _saturated(tirx.floordiv(num, s << shift) + zp[ch].astype("int64"), out_dtype)

    return te.create_prim_func([x, z, m, g, b, zp, eps, te.compute(_dims(shape), body, name="norm")])
