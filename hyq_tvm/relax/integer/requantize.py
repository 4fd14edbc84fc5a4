"""The requantization that integer conv2d / matmul and softmax end in (the fixed-point rule of requant.py):
its constant arrays, its TE expression and its numpy twin."""
from __future__ import annotations

import numpy as np

from ...errors import HyqError
from ..requant import check_range, exact_ratio, fixed_point_multiplier, requantize, rounding_term, shifts
from .kernel import placeholder, saturated
from .operand import along


def requant_params(acc_scale, s_o, z_o, bias, acc_bound, where: str) -> list[np.ndarray]:
    """The requantization arrays q, ls, rs (int32), c (int64) and zp (int32), one per channel, from the exact ratio
    acc_scale / s_o and the bias in accumulator steps (floats or exact Fractions); a HyqError naming
    `where` if they cannot be formed or an accumulator up to acc_bound (int64, () or per channel) could overflow
    them (requant.check_range)."""
    try:
        q, shift = fixed_point_multiplier(exact_ratio(acc_scale, s_o))
        c = rounding_term(q, shift, 0.0 if bias is None else bias)
        check_range(acc_bound, q, shift, c)
    except HyqError as err:
        raise HyqError(f"{where}: {err}") from None
    left, right = shifts(shift)
    width = np.broadcast(q, shift, z_o, c).size
    return [np.broadcast_to(v, (width,)).astype(dtype) for v, dtype in (
        (q, np.int32), (left, np.int32), (right, np.int32), (c, np.int64), (z_o, np.int32))]


def requant_placeholders(channels: int):
    """The placeholders q, ls, rs, c, zp of the requantization arrays."""
    q, ls, rs, zp = (placeholder((channels,), "int32", n) for n in ("q", "ls", "rs", "zp"))
    return q, ls, rs, placeholder((channels,), "int64", "c"), zp


def requantized(x, q, ls, rs, c, zp, ch, left_shift: bool, out_dtype: str):
    """clip((((x << ls) * q + c) >> rs) + zp, qmin, qmax) for an int64 x, parameters of channel `ch`."""
    if left_shift:
        x = x << ls[ch].astype("int64")
    r = (x * q[ch].astype("int64") + c[ch]) >> rs[ch].astype("int64")
    return saturated(r + zp[ch].astype("int64"), out_dtype)


def requantize_acc(acc: np.ndarray, acc_scale, out_scale, out_zero_point, axis: int,
                   out_dtype: str = "int8", bias=0.0) -> np.ndarray:
    """acc + bias (scale acc_scale; bias in accumulator steps, floats or Fractions, per channel) requantized to
    (out_scale, out_zero_point) with the Q31 fixed-point rule of requant.py."""
    q, shift = fixed_point_multiplier(exact_ratio(acc_scale, out_scale))
    info = np.iinfo(out_dtype)
    ndim = acc.ndim
    return requantize(acc, along(q, axis, ndim), along(shift, axis, ndim), along(out_zero_point, axis, ndim),
                      int(info.min), int(info.max), out_dtype, along(bias, axis, ndim))
