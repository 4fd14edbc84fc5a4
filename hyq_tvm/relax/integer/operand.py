"""Reading quantized operands: the integer tensor, constant scale and zero point of a (de)quantize call,
and the checks that a per-channel parameter runs along the axis a rule needs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ...errors import HyqError


@dataclass(frozen=True)
class Operand:
    """A dequantized operand: the integer tensor and its constant scale and zero point."""

    data: relax.Expr
    scale: np.ndarray       # float64, () or (C,)
    zero_point: np.ndarray  # int64, () or (C,)
    axis: int               # non-negative channel axis of `expr`
    axes: tuple[int, ...] | None = None  # permutation applied to an activation (permute_dims after dequantize)

    @property
    def values(self) -> np.ndarray | None:
        return self.data.value.numpy() if isinstance(self.data, tvm.ir.expr.Constant) else None

    @property
    def expr(self) -> relax.Expr:
        """The integer operand as the op sees it."""
        return self.data if self.axes is None else relax.op.permute_dims(self.data, self.axes)


def shape_of(expr: relax.Expr, where: str) -> tuple[int, ...]:
    """The static shape of `expr`; a HyqError when it is not static."""
    shape = expr.ty.shape
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        raise HyqError(f"{where}: needs a static shape, got {shape}")
    return tuple(int(d) for d in shape)


def dtype_of(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _qparams(call: relax.Call, ndim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Scale (float64) and zero point (int64), each () or (C,), and the axis of a (de)quantize call."""
    s = call.args[1].value.numpy().astype(np.float64).reshape(-1)
    z = call.args[2].value.numpy().astype(np.int64).reshape(-1)
    return (s.reshape(()) if s.size == 1 else s), (z.reshape(()) if z.size == 1 else z), int(call.attrs.axis) % ndim


def operand(dq: relax.Call, where: str) -> Operand:
    """Read a dequantize call: its int8 input and constant scale / zero point."""
    data = dq.args[0]
    if dtype_of(data) != "int8":
        raise HyqError(f"{where}: dequantizes {dtype_of(data)}; only int8 tensors are integerized")
    return Operand(data, *_qparams(dq, data.ty.ndim))


def output(quant: relax.Call, where: str) -> Operand:
    """The scale / zero point of a quantize call, in the form of a dequantized operand."""
    return Operand(quant, *_qparams(quant, len(shape_of(quant, where))))


def uniform(values: np.ndarray) -> np.ndarray | None:
    """The single value of a scalar or constant vector, else None."""
    return values.reshape(-1)[:1].reshape(()) if np.all(values == values.reshape(-1)[0]) else None


def per_channel(values: np.ndarray, op: Operand, axis: int, channels: int, what: str, where: str) -> np.ndarray:
    """A scale or zero point as () or (channels,), checking it runs along `axis`."""
    single = uniform(values)
    if single is not None:
        return single
    if op.axis != axis or values.size != channels:
        raise HyqError(f"{where}: {what} is per channel along axis {op.axis} ({values.size} values);"
                       f" only axis {axis} with {channels} channels can be integerized")
    return values


def scalar(values: np.ndarray, what: str, where: str) -> np.ndarray:
    """A per-tensor value; a HyqError when it is a varying per-channel one."""
    value = uniform(values)
    if value is None:
        raise HyqError(f"{where}: {what} must be per tensor here (it is summed over)")
    return value


def channel_axes(*operands: Operand) -> set[int]:
    """The axes along which the operands' scales or zero points vary (empty: all per tensor)."""
    return {o.axis for o in operands if uniform(o.scale) is None or uniform(o.zero_point) is None}


def along(values, axis: int, ndim: int) -> np.ndarray:
    """A scalar or per-channel vector shaped to broadcast along `axis` of an ndim-dimensional tensor."""
    v = np.asarray(values)
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def clip_bounds(call: relax.Call) -> tuple[float, float]:
    """(min, max) of a relax.clip call."""
    return tuple(float(getattr(v.value, "value", v.value)) for v in call.args[1:3])


def consts(arrays) -> list[relax.Constant]:
    """Relax constants of numpy arrays, each in its own dtype."""
    return [relax.const(a, str(a.dtype)) for a in arrays]
