"""The numbers of the quantize / dequantize pairs a QuantPlan implies, as numpy arrays.

Shared by every backend that turns the plan into a QDQ graph (the Relax annotation, the ONNX
export), so both quantize exactly like the fake-quant model of hyq_tvm/quant/modules.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import WEIGHTED_OPS, LayerQuant, TensorQuant
from .quantizer import qrange


def qparams(t: TensorQuant) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int8) of a plan tensor: () per tensor, (C,) per channel."""
    scale = np.asarray(t.scale, np.float32)
    zero = np.asarray(t.zero_point, np.int8)
    return (scale, zero) if t.per_channel else (scale.reshape(()), zero.reshape(()))


def channel_axis(t: TensorQuant) -> int:
    """The channel axis of a channel-wise plan tensor, -1 for a per-tensor one."""
    return int(t.axis) if t.per_channel else -1


def _broadcast(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A scalar or per-channel vector shaped to broadcast along `axis` of an ndim-dimensional array."""
    if values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def folded_weight(w: np.ndarray, act_scale: np.ndarray) -> np.ndarray:
    """The float32 weight (OI or OIHW) with the input scale(s) multiplied into its input channels."""
    if act_scale.ndim == 0:
        return w * act_scale
    if w.ndim == 2:
        return w * act_scale.reshape(1, -1)
    groups = act_scale.size // w.shape[1]
    per_out = np.repeat(act_scale.reshape(groups, -1), w.shape[0] // groups, axis=0)
    return w * per_out[:, :, None, None]


def quantize_values(x: np.ndarray, t: TensorQuant) -> np.ndarray:
    """int8 clip(round(x / s) + z) of a constant with the plan tensor `t` (axis as in the plan)."""
    scale, zero = qparams(t)
    qmin, qmax = qrange(t.bits)
    axis = channel_axis(t) % x.ndim
    q = np.round(x / _broadcast(scale, axis, x.ndim)) + _broadcast(zero, axis, x.ndim).astype(np.float32)
    return np.clip(q, qmin, qmax).astype(np.int8)


def weight_values(w: np.ndarray, entry: LayerQuant) -> np.ndarray:
    """The int8 weight of a conv2d / linear plan layer: its float weight folded with the input scale, quantized."""
    act_scale, _ = qparams(entry.inputs[0])
    return quantize_values(folded_weight(w, act_scale), entry.weight)


@dataclass(frozen=True)
class ActivationQDQ:
    """quantize(x, scale, zero, axis), clipped to `clip` when the values have fewer than 8 bits,
    then dequantize(q, dq_scale, zero, axis)."""

    scale: np.ndarray        # float32, () or (C,)
    zero: np.ndarray         # int8, like scale
    axis: int
    clip: tuple[int, int] | None
    dq_scale: np.ndarray     # ones where the scale is folded into the consumer's weight, else scale


def activation_qdq(entry: LayerQuant, role: str) -> ActivationQDQ:
    """The QDQ of the activation input `role` ("input0", "input1") of a plan layer."""
    t = entry.inputs[int(role[-1])]
    scale, zero = qparams(t)
    bounds = qrange(t.bits)
    return ActivationQDQ(scale, zero, channel_axis(t), None if bounds == (-128, 127) else bounds,
                         np.ones_like(scale) if entry.op in WEIGHTED_OPS else scale)  # s folded into W
