"""The integer graph's arithmetic in numpy, op by op, to check the compiled graph bit for bit.

Every function takes integer inputs and returns what the matching step of the integerized Relax
graph returns. The convolution and matmul work on the centered values (x_q - z) directly, so the
zero-point algebra of integerize.py is checked rather than repeated.
"""
from __future__ import annotations

import numpy as np

from ..errors import HyqError
from .kernels import PROB_BITS, NormParams
from .requant import fixed_point_multiplier, requantize, rescale

INT32 = np.iinfo(np.int32)


def along(values, axis: int, ndim: int) -> np.ndarray:
    """A scalar or per-channel vector shaped to broadcast along `axis` of an ndim-dimensional tensor."""
    v = np.asarray(values)
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def to_int32(acc: np.ndarray, what: str) -> np.ndarray:
    """`acc` as int32, or a HyqError if an int32 accumulator would have overflowed."""
    if acc.size and (acc.min() < INT32.min or acc.max() > INT32.max):
        raise HyqError(f"{what}: the int32 accumulator overflows")
    return acc.astype(np.int32)


def conv2d(x, w, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1) -> np.ndarray:
    """Exact int64 NCHW x OIHW convolution; padding is (top, left, bottom, right) as in Relax."""
    x, w = np.asarray(x, np.int64), np.asarray(w, np.int64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilation, padding
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))).reshape(n, groups, cg, h + pt + pb, wd + pl + pr)
    wg = w.reshape(groups, o // groups, cg, kh, kw)
    out = np.zeros((n, groups, o // groups, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[..., i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            out += np.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, i, j])
    return out.reshape(n, o, oh, ow)


def qconv2d(x_q, z_a, w_q, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1) -> np.ndarray:
    """int32 conv2d(x_q - z_a, w_q): z_a per tensor or per input channel, zero padding of the centered input."""
    x = np.asarray(x_q, np.int64) - along(z_a, 1, 4).astype(np.int64)
    return to_int32(conv2d(x, w_q, strides, padding, dilation, groups), "conv2d")


def qmatmul(a_q, z_a, b_q, z_b) -> np.ndarray:
    """int32 (a_q - z_a) @ (b_q - z_b); z_a per tensor or per reduced channel, z_b per tensor."""
    a = np.asarray(a_q, np.int64) - along(z_a, np.ndim(a_q) - 1, np.ndim(a_q)).astype(np.int64)
    b = np.asarray(b_q, np.int64) - np.int64(z_b)
    return to_int32(np.matmul(a, b), "matmul")


def requantize_acc(acc: np.ndarray, acc_scale, out_scale, out_zero_point, axis: int,
                   out_dtype: str = "int8", bias=0.0) -> np.ndarray:
    """acc + bias (scale acc_scale; bias real, per channel) requantized to (out_scale, out_zero_point)
    with the Q31 fixed-point rule of requant.py."""
    multiplier = np.asarray(acc_scale, np.float64) / np.asarray(out_scale, np.float64)
    q, shift = fixed_point_multiplier(multiplier)
    info = np.iinfo(out_dtype)
    ndim = acc.ndim
    return requantize(acc, along(q, axis, ndim), along(shift, axis, ndim), along(out_zero_point, axis, ndim),
                      int(info.min), int(info.max), out_dtype, along(bias, axis, ndim))


def dequantize_acc(acc: np.ndarray, acc_scale, axis: int, dtype: str = "float32") -> np.ndarray:
    """float(acc) * acc_scale, both in `dtype`: the single multiply that leaves the integer graph."""
    scale = along(np.asarray(acc_scale, np.float64).astype(dtype), axis, acc.ndim)
    return acc.astype(dtype) * scale


def softmax_probs(x_q: np.ndarray, table: np.ndarray) -> np.ndarray:
    """int32 Q30 probabilities of an int8 tensor over its last axis: (e << 30) // sum(e), e = table[max - x]."""
    x = np.asarray(x_q, np.int64)
    e = np.asarray(table, np.int64)[x.max(axis=-1, keepdims=True) - x]
    return ((e << PROB_BITS) // e.sum(axis=-1, keepdims=True)).astype(np.int32)


def rescaled_sum(xs, zero_points, scales, out_scale, out_zero_point, axis: int, out_dtype: str = "int8") -> np.ndarray:
    """sum_i (x_i - z_i) * s_i on the output grid (s_o, z_o), rounded once: a residual add of int8 tensors."""
    ndim = np.ndim(xs[0])
    info = np.iinfo(out_dtype)
    return rescale(xs, [along(z, axis, ndim) for z in zero_points], [along(s, axis, ndim) for s in scales],
                   along(out_scale, axis, ndim), along(out_zero_point, axis, ndim), int(info.min), int(info.max),
                   out_dtype)


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


def lookup(x_q, table, axis: int) -> np.ndarray:
    """table[channel, x + 128] of an int8 tensor: one 256-entry row per channel along `axis`, or one row."""
    x = np.asarray(x_q, np.int64) + 128
    if table.shape[0] == 1:
        return table[0][x]
    return table[np.arange(table.shape[0]).reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)]), x]
