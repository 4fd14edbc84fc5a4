"""Integer conv2d / matmul: int8 x int8 -> int32 with the zero-point terms as offsets, then either requantized
(bias in the rounding term, a ReLU / clip as an int8 clamp) or, for a float output, one float multiply.

    [quantize(] [relu | clip(] [add(] OP(dequantize(x_q, s_a, z_a), B) [, bias)] [)] [, s_o, z_o)]

OP is `relax.nn.conv2d` (NCHW/OIHW, any groups) or `relax.matmul`; B is a symmetric constant weight
`dequantize(w_q, s_w, 0)` (per tensor or per output channel; for matmul also under `permute_dims`) or,
for matmul, a dequantized activation.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from tvm import relax, te
from tvm.relax.dpl import is_const, is_op, wildcard

from ...errors import HyqError
from ..requant import exact_ratio
from .kernel import dims, placeholder
from .operand import (
    Operand,
    along,
    clip_bounds,
    consts,
    dtype_of,
    operand,
    output,
    per_channel,
    scalar,
    shape_of,
)
from .requantize import (
    requant_params,
    requant_placeholders,
    requantize_acc,
    requantized,
)
from .rule import Context, IntegerLayer, RealParams, Rule

INT32 = np.iinfo(np.int32)

_A = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_B = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_B_T = is_op("relax.permute_dims")(_B)
_CONV = is_op("relax.nn.conv2d")(_A, _B)
_MATMUL = is_op("relax.matmul")(_A, _B | _B_T)
CORE = _CONV | _MATMUL
_BIAS = is_op("relax.add")(CORE, is_const())
_RELU = is_op("relax.nn.relu")(_BIAS | CORE)
_CLIP = is_op("relax.clip")(_BIAS | CORE, wildcard(), wildcard())
QUANTIZED = is_op("relax.quantize")(_RELU | _CLIP | _BIAS | CORE, is_const(), is_const())


@dataclass(frozen=True)
class _Core:
    """An integer conv2d / matmul: its int32 result, constant int32 offset and per-channel scale."""

    acc: relax.Expr
    offset: np.ndarray | None  # int64, broadcasts against acc
    scale: np.ndarray          # float64 accumulator scale, () or (C,) along `axis`
    axis: int
    op: str                    # "conv2d" or "matmul"
    inputs: tuple[relax.Expr, ...]       # the integer activation(s)
    weight: np.ndarray | None            # int8 constant operand: OIHW, or (K, N) for matmul
    zero_points: tuple[np.ndarray, ...]  # of A and B, int64 () or per channel
    attrs: dict[str, Any] = field(default_factory=dict)
    in_scales: tuple[np.ndarray, ...] = ()  # as read: conv2d per input channel, matmul per tensor
    weight_scale: np.ndarray | None = None  # as read: () or per output channel


def _transposed(op: Operand, perm_call: relax.Call) -> Operand:
    """The operand seen through permute_dims (a linear layer's transposed weight)."""
    ndim = op.data.ty.ndim
    axes = list(range(ndim))[::-1] if perm_call.attrs.axes is None else [int(i) for i in perm_call.attrs.axes]
    if op.values is not None:
        return replace(op, data=relax.const(np.transpose(op.values, axes)), axis=axes.index(op.axis))
    return replace(op, axes=tuple(axes), axis=axes.index(op.axis))


def _weight(op: Operand, axis: int, channels: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, scale () or (channels,)) of a constant, symmetric weight."""
    if op.values is None:
        raise HyqError(f"{where}: the weight is not a constant")
    if np.any(op.zero_point != 0):
        raise HyqError(f"{where}: the weight has non-zero zero points; weights must be symmetric")
    return op.values, per_channel(op.scale, op, axis, channels, "the weight scale", where)


def _padded_with_zero_points(x: relax.Expr, z_a: np.ndarray, shape, padding) -> relax.Expr:
    """x_q padded with its zero points (z_a per tensor or per channel), so that the centered input
    x_q - z_a is zero-padded as in the float conv2d and the zero-point term is one sum per channel."""
    top, left, bottom, right = padding
    pad_width = [0, 0, 0, 0, top, bottom, left, right]
    if z_a.ndim == 0:
        return relax.op.nn.pad(x, pad_width, pad_value=float(z_a))
    # per channel: pad x_q - z_a (exact in int16) with zeros, then add z_a back
    z = relax.const(z_a.astype(np.int16).reshape(1, shape[1], 1, 1), "int16")
    centered = relax.op.subtract(relax.op.astype(x, "int16"), z)
    return relax.op.astype(relax.op.add(relax.op.nn.pad(centered, pad_width), z), "int8")


def _conv2d(call: relax.Call, a: Operand, w: Operand, where: str) -> _Core:
    """int8 conv2d with int32 accumulation; the activation scale must be constant within each group."""
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    if layouts != ("NCHW", "OIHW", "NCHW"):
        raise HyqError(f"{where}: layouts {'/'.join(layouts)}; only NCHW/OIHW/NCHW is integerized")
    in_shape = shape_of(a.data, where)
    w_q, s_w = _weight(w, 0, shape_of(w.data, where)[0], where)
    groups, out_ch = int(attrs.groups), w_q.shape[0]
    s_in = s_a = per_channel(a.scale, a, 1, in_shape[1], "the input scale", where)
    if s_a.ndim:
        per_group = s_a.reshape(groups, -1)
        if np.any(per_group != per_group[:, :1]):
            raise HyqError(f"{where}: the input scale varies within a convolution group;"
                           " fold channel-wise input scales into the weight")
        s_a = np.repeat(per_group[:, 0], out_ch // groups)
    z_a = per_channel(a.zero_point, a, 1, in_shape[1], "the input zero point", where)
    padding = tuple(int(p) for p in attrs.padding)
    x, offset = a.data, None
    if np.any(z_a):
        if any(padding):
            x, padding = _padded_with_zero_points(x, z_a, in_shape, padding), (0, 0, 0, 0)
        z = np.broadcast_to(z_a, (in_shape[1],)).reshape(groups, 1, -1, 1, 1).astype(np.int64)
        w_sum = (w_q.astype(np.int64).reshape(groups, out_ch // groups, -1, *w_q.shape[2:]) * z).sum(axis=(2, 3, 4))
        offset = -w_sum.reshape(1, out_ch, 1, 1)
    acc = relax.op.nn.conv2d(x, relax.const(w_q), strides=attrs.strides, padding=padding,
                             dilation=attrs.dilation, groups=groups, out_dtype="int32")
    conv_attrs = {k: tuple(int(v) for v in getattr(attrs, k)) for k in ("strides", "padding", "dilation")}
    return _Core(acc, offset, s_a * s_w, 1, "conv2d", (a.data,), w_q, (z_a, np.int64(0)),
                 {**conv_attrs, "groups": groups}, (s_in,), s_w)


def _matmul_weight(a: Operand, b: Operand, where: str) -> _Core:
    """int8 x @ W with a constant (K, N) weight, per-tensor or per-N weight scales."""
    if b.values.ndim != 2:
        raise HyqError(f"{where}: a constant matmul operand must be a 2-D weight, got {b.values.ndim}-D")
    k = b.values.shape[0]
    w_q, s_w = _weight(b, 1, b.values.shape[1], where)
    z_a = per_channel(a.zero_point, a, a.data.ty.ndim - 1, k, "the input zero point", where)
    acc = relax.op.matmul(a.data, relax.const(w_q), out_dtype="int32")
    offset = -(np.broadcast_to(z_a, (k,)) @ w_q.astype(np.int64)) if np.any(z_a) else None
    s_a = scalar(a.scale, "the input scale", where)
    return _Core(acc, offset, s_a * s_w, -1, "matmul", (a.data,), w_q, (z_a, np.int64(0)), {}, (s_a,), s_w)


def _matmul_activations(a: Operand, b: Operand, where: str) -> _Core:
    """int8 a @ b of two activations (per-tensor quantized) with the zero-point terms computed at run time."""
    s_a, s_b = scalar(a.scale, "the scale of A", where), scalar(b.scale, "the scale of B", where)
    z_a, z_b = scalar(a.zero_point, "the zero point of A", where), scalar(b.zero_point, "the zero point of B", where)
    acc = relax.op.matmul(a.data, b.expr, out_dtype="int32")
    if z_a:
        col = relax.op.sum(relax.op.astype(b.expr, "int32"), axis=[-2], keepdims=True)
        acc = relax.op.subtract(acc, relax.op.multiply(col, relax.const(int(z_a), "int32")))
    if z_b:
        row = relax.op.sum(relax.op.astype(a.data, "int32"), axis=[-1], keepdims=True)
        acc = relax.op.subtract(acc, relax.op.multiply(row, relax.const(int(z_b), "int32")))
    k = shape_of(a.data, where)[-1]
    offset = np.array(k * int(z_a) * int(z_b), np.int64) if z_a and z_b else None
    return _Core(acc, offset, s_a * s_b, -1, "matmul", (a.data, b.data), None, (z_a, z_b), {"b_axes": b.axes},
                 (s_a, s_b))


def _core(m: dict, where: str) -> _Core:
    """The integer conv2d / matmul of a match."""
    a, b = operand(m[_A], where), operand(m[_B], where)
    if _CONV in m:
        return _conv2d(m[_CONV], a, b, where)
    if _B_T in m:
        b = _transposed(b, m[_B_T])
    return _matmul_weight(a, b, where) if b.values is not None else _matmul_activations(a, b, where)


def _span(x: relax.Expr, zero_point) -> int:
    """The largest |x - z| over the values of x's dtype and its zero points z."""
    info, z = np.iinfo(dtype_of(x)), np.asarray(zero_point, np.int64)
    return int(np.max(np.maximum(info.max - z, z - info.min)))


def _acc_bound(core: _Core, where: str) -> np.ndarray:
    """The largest |accumulator| (int64, () or per output channel) over every input its dtype allows, zero-point
    terms included; a HyqError if the int32 accumulator could overflow, on the way (acc - offset) or at the end."""
    spans = [_span(x, z) for x, z in zip(core.inputs, core.zero_points)]
    if core.weight is None:  # two activations: K products of their spans
        bound = np.int64(shape_of(core.inputs[0], where)[-1]) * spans[0] * spans[1]
    else:
        w = np.abs(core.weight.astype(np.int64))
        bound = (w.reshape(len(w), -1).sum(axis=1) if core.op == "conv2d" else w.sum(axis=0)) * spans[0]
    offset = 0 if core.offset is None else np.abs(core.offset).reshape(-1)
    if np.any(bound + offset > INT32.max):
        raise HyqError(f"{where}: the int32 accumulator can reach {int(np.max(bound + offset))}, beyond int32")
    return bound


def _accumulate(core: _Core, where: str) -> relax.Expr:
    """acc + offset in int32."""
    if core.offset is None:
        return core.acc
    if np.any(core.offset < INT32.min) or np.any(core.offset > INT32.max):
        raise HyqError(f"{where}: the int32 zero-point offset overflows")
    return relax.op.add(core.acc, relax.const(core.offset.astype(np.int32)))


def _bias_vector(bias: np.ndarray, out_shape, axis: int, where: str) -> np.ndarray:
    """A constant added to the output as () or a vector along the channel axis."""
    shape = (1,) * (len(out_shape) - bias.ndim) + bias.shape
    if len(shape) != len(out_shape) or any(d != 1 for i, d in enumerate(shape) if i != axis):
        raise HyqError(f"{where}: the added constant of shape {bias.shape} is not a per-channel bias")
    return bias.astype(np.float64).reshape(-1) if bias.size > 1 else bias.astype(np.float64).reshape(())


def _function(m: dict) -> tuple[str | None, tuple[float, ...]]:
    """The ReLU / clip of a match before its quantize, as RealParams.function and args."""
    if _RELU in m:
        return "relu", ()
    return ("clip", clip_bounds(m[_CLIP])) if _CLIP in m else (None, ())


def _clamp(m: dict, s_o: np.ndarray, z_o: np.ndarray, out_dtype: str):
    """int64 (low, high) bounds, () or per channel, of the ReLU / clip of a match on the output grid, or None."""
    info = np.iinfo(out_dtype)
    if _RELU in m:
        low, high = np.asarray(z_o, np.float64), np.float64(info.max)
    elif _CLIP in m:
        low, high = (np.round(np.clip(v / s_o, -2.0 ** 40, 2.0 ** 40)) + z_o for v in clip_bounds(m[_CLIP]))
    else:
        return None
    return tuple(np.clip(v, info.min, info.max).astype(np.int64) for v in (low, high))


def _record(ctx: Context, root: relax.Call, m: dict, core: _Core, real_bias=None, **out) -> None:
    function, args = _function(m)
    real = RealParams(core.in_scales, core.weight_scale, real_bias, function, args)
    ctx.record(root, m[_A], core.op, core.attrs, core.inputs, core.weight, core.zero_points, real=real, **out)


def requantize_primfunc(shape, axis: int, channels: int, left_shift: bool, out_dtype: str = "int8"):
    """PrimFunc(acc, q, ls, rs, c, zp, out): out = clip((((int64(acc) << ls) * q + c) >> rs) + zp, qmin, qmax).

    q, ls, rs, c (int64) and zp hold one value per channel along `axis` (one in all when channels is 1);
    `left_shift` says whether any ls is non-zero. requant.requantize is its numpy twin.
    """
    acc = placeholder(shape, "int32", "acc")
    q, ls, rs, c, zp = requant_placeholders(channels)

    def body(*i):
        ch = i[axis] if channels > 1 else 0
        return requantized(acc(*i).astype("int64"), q, ls, rs, c, zp, ch, left_shift, out_dtype)

    return te.create_prim_func([acc, q, ls, rs, c, zp, te.compute(dims(shape), body, name="requantize")])


def rewrite_quantized(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """quantize([relu | clip(] [add(] core [, bias)] [)]): int32 accumulation, Q31 requantization, int8 clamp."""
    where = ctx.where(m[_CONV] if _CONV in m else m[_MATMUL], m[_A])
    core = _core(m, where)
    bound = _acc_bound(core, where)
    shape = shape_of(root, where)
    axis = core.axis % len(shape)
    channels = shape[axis]
    bias = real_bias = None
    if _BIAS in m:
        real_bias = _bias_vector(m[_BIAS].args[1].value.numpy(), shape, axis, where)
        bias = exact_ratio(real_bias, core.scale)
    acc = _accumulate(core, where)
    out = output(root, where)
    s_o = per_channel(out.scale, out, axis, channels, "the output scale", where)
    z_o = per_channel(out.zero_point, out, axis, channels, "the output zero point", where)
    params = requant_params(core.scale, s_o, z_o, bias, bound, where)
    out_dtype = str(root.attrs.out_dtype)
    key = ("requantize", shape, axis, params[0].size, bool(np.any(params[1])), out_dtype)
    gv = ctx.kernel(key, lambda: requantize_primfunc(*key[1:]))
    result = relax.call_tir(gv, [acc, *consts(params)], relax.TensorType(shape, out_dtype))
    clamp = _clamp(m, s_o, z_o, out_dtype)
    if clamp is not None:
        low, high = (relax.const(along(v, axis, len(shape)).astype(out_dtype), out_dtype) for v in clamp)
        result = relax.op.minimum(relax.op.maximum(result, low), high)
    _record(ctx, root, m, core, real_bias, bias=bias, acc_scale=core.scale, axis=axis, out_scale=s_o, out_zero_point=z_o,
            out_dtype=out_dtype, clamp=clamp)
    return result


def rewrite_dequantized(ctx: Context, op: relax.Call, m: dict) -> relax.Expr:
    """A core whose output stays float: int32 accumulation, then one float multiply."""
    where = ctx.where(op, m[_A])
    core = _core(m, where)
    _acc_bound(core, where)
    dtype = dtype_of(op)
    ndim = len(shape_of(op, where))
    acc = relax.op.astype(_accumulate(core, where), dtype)
    scale = along(core.scale.astype(dtype), core.axis % ndim, ndim)
    _record(ctx, op, m, core, bias=None, acc_scale=core.scale, axis=core.axis % ndim, out_scale=None,
            out_zero_point=None, out_dtype=dtype)
    return relax.op.multiply(acc, relax.const(scale, dtype))


def to_int32(acc: np.ndarray, what: str) -> np.ndarray:
    """`acc` as int32, or a HyqError if an int32 accumulator would have overflowed."""
    if acc.size and (acc.min() < INT32.min or acc.max() > INT32.max):
        raise HyqError(f"{what}: the int32 accumulator overflows")
    return acc.astype(np.int32)


def conv2d(x, w, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1) -> np.ndarray:
    """Exact int64 NCHW x OIHW convolution; padding is (top, left, bottom, right) as in Relax."""
    x, w = np.asarray(x, np.int64), np.asarray(w, np.int64)
    n, _, h, wd = x.shape
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


def dequantize_acc(acc: np.ndarray, acc_scale, axis: int, dtype: str = "float32") -> np.ndarray:
    """float(acc) * acc_scale, both in `dtype`: the single multiply that leaves the integer graph."""
    scale = along(np.asarray(acc_scale, np.float64).astype(dtype), axis, acc.ndim)
    return acc.astype(dtype) * scale


def _reference_acc(layer: IntegerLayer, values: dict) -> np.ndarray:
    """The layer's int32 accumulator, zero-point terms included."""
    a = values[layer.inputs[0]]
    z_a, z_b = layer.zero_points
    if layer.op == "conv2d":
        return qconv2d(a, z_a, layer.weight, **layer.attrs)
    if layer.weight is not None:
        return qmatmul(a, z_a, layer.weight, z_b)
    b = values[layer.inputs[1]]
    return qmatmul(a, z_a, b if layer.attrs["b_axes"] is None else b.transpose(layer.attrs["b_axes"]), z_b)


def reference_quantized(layer: IntegerLayer, values: dict) -> np.ndarray:
    """The accumulator requantized with the layer's bias, then clamped."""
    out = requantize_acc(_reference_acc(layer, values), layer.acc_scale, layer.out_scale, layer.out_zero_point,
                         layer.axis, layer.out_dtype, 0.0 if layer.bias is None else layer.bias)
    if layer.clamp is None:
        return out
    low, high = (along(v, layer.axis, out.ndim) for v in layer.clamp)
    return np.clip(out, low, high).astype(layer.out_dtype)


def reference_dequantized(layer: IntegerLayer, values: dict) -> np.ndarray:
    """The accumulator times its scale, in float."""
    return dequantize_acc(_reference_acc(layer, values), layer.acc_scale, layer.axis, layer.out_dtype)


GEMM = Rule("gemm", QUANTIZED, rewrite_quantized, reference_quantized)
GEMM_FLOAT = Rule("gemm_float", CORE, rewrite_dequantized, reference_dequantized)
