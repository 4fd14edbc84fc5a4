"""The TIR kernels of the integer graph: requantization, rescaled sums (residual adds, concatenations)
and the integer softmax of full mode.

All end in the fixed-point requantization of requant.py; reference.py is their numpy twin.
"""
from __future__ import annotations

import numpy as np
from tvm import te, tirx

PROB_BITS = 30  # softmax probabilities and exp table entries are Q30 integers


def _requantized(x, q, ls, rs, c, zp, ch, left_shift: bool, out_dtype: str):
    """clip((((x << ls) * q + c) >> rs) + zp, qmin, qmax) for an int64 x, parameters of channel `ch`."""
    info = np.iinfo(out_dtype)
    if left_shift:
        x = x << ls[ch].astype("int64")
    r = (x * q[ch].astype("int64") + c[ch]) >> rs[ch].astype("int64")
    shifted = r + zp[ch].astype("int64")
    return te.max(te.min(shifted, int(info.max)), int(info.min)).astype(out_dtype)


def _requant_params(channels: int):
    q, ls, rs, zp = (te.placeholder((channels,), "int32", name=n) for n in ("q", "ls", "rs", "zp"))
    return q, ls, rs, te.placeholder((channels,), "int64", name="c"), zp


def requantize_primfunc(shape, axis: int, channels: int, left_shift: bool, out_dtype: str = "int8"):
    """PrimFunc(acc, q, ls, rs, c, zp, out): out = clip((((int64(acc) << ls) * q + c) >> rs) + zp, qmin, qmax).

    q, ls, rs, c (int64) and zp hold one value per channel along `axis` (one in all when channels is 1);
    `left_shift` says whether any ls is non-zero. requant.requantize is its numpy twin.
    """
    acc = te.placeholder(shape, "int32", name="acc")
    q, ls, rs, c, zp = _requant_params(channels)

    def body(*i):
        ch = i[axis] if channels > 1 else 0
        return _requantized(acc(*i).astype("int64"), q, ls, rs, c, zp, ch, left_shift, out_dtype)

    return te.create_prim_func([acc, q, ls, rs, c, zp, te.compute(shape, body, name="requantize")])


def rescale_primfunc(shape, axis: int, channels: int, inputs: int, out_dtype: str = "int8"):
    """PrimFunc(x_0, .., x_{n-1}, z, k, c, rs, zp, out): int8 tensors of one shape rescaled to one grid and summed,

        out = clip(((sum_i (int64(x_i) - z_i) * k_i + c) >> rs) + zp, qmin, qmax)

    z (int32) and k (int64) are (n, channels), c (int64), rs and zp (int32) are (channels,): one value per
    channel along `axis` (one in all when channels is 1). requant.rescale is its numpy twin.
    """
    xs = [te.placeholder(shape, "int8", name=f"x{i}") for i in range(inputs)]
    z = te.placeholder((inputs, channels), "int32", name="z")
    k = te.placeholder((inputs, channels), "int64", name="k")
    c = te.placeholder((channels,), "int64", name="c")
    rs, zp = (te.placeholder((channels,), "int32", name=n) for n in ("rs", "zp"))
    info = np.iinfo(out_dtype)

    def body(*i):
        ch = i[axis] if channels > 1 else 0
        total = c[ch]
        for j, x in enumerate(xs):
            total = total + (x(*i).astype("int64") - z[j, ch].astype("int64")) * k[j, ch]
        shifted = (total >> rs[ch].astype("int64")) + zp[ch].astype("int64")
        return te.max(te.min(shifted, int(info.max)), int(info.min)).astype(out_dtype)

    return te.create_prim_func([*xs, z, k, c, rs, zp, te.compute(shape, body, name="rescale")])


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
    x = te.placeholder(shape, "int8", name="x")
    table = te.placeholder((256,), "int32", name="table")
    q, ls, rs, c, zp = _requant_params(channels)
    k = te.reduce_axis((0, n), name="k")
    top = te.compute(outer, lambda *i: te.max(x(*i, k).astype("int32"), axis=k), name="top")
    e = te.compute(shape, lambda *i: table[top(*i[:-1]) - x(*i).astype("int32")].astype("int64"), name="exp")
    k2 = te.reduce_axis((0, n), name="k2")
    total = te.compute(outer, lambda *i: te.sum(e(*i, k2), axis=k2), name="total")
    p = te.compute(shape, lambda *i: tirx.floordiv(e(*i) << PROB_BITS, total(*i[:-1])), name="prob")

    def body(*i):
        return _requantized(p(*i), q, ls, rs, c, zp, i[axis] if channels > 1 else 0, left_shift, out_dtype)

    return te.create_prim_func([x, table, q, ls, rs, c, zp, te.compute(shape, body, name="softmax")])
