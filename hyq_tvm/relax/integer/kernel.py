"""TE building blocks shared by the rules' TIR kernels."""
from __future__ import annotations

import numpy as np
from tvm import te, tirx


def dims(shape) -> tuple:
    """A shape as int64 dims, as Relax's own legalized kernels have them (FuseTIR matches buffers by type)."""
    return tuple(tirx.IntImm("int64", int(d)) for d in shape)


def placeholder(shape, dtype: str, name: str) -> te.Tensor:
    return te.placeholder(dims(shape), dtype, name=name)


def saturated(value, out_dtype: str):
    """An int64 value clipped to the range of `out_dtype` and cast to it."""
    info = np.iinfo(out_dtype)
    return te.max(te.min(value, int(info.max)), int(info.min)).astype(out_dtype)
