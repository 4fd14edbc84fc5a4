"""Products of two int8 activations:

    quantize(multiply(dequantize(a_q), dequantize(b_q)))     a_q, b_q not constants, shapes broadcast

become one kernel: the int32 product (a - z_a) * (b - z_b), requantized to the output grid with the exact
multiplier s_a * s_b / s_o (requant.py's fixed point). Scales and zero points may vary along one axis of the
result; a product with a constant operand is left to other rules.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.dpl import is_const, is_op, wildcard

from .kernel import dims, placeholder
from .operand import Operand, along, channel_axes, consts, operand, output, per_channel, shape_of
from .requantize import requant_params, requant_placeholders, requantize_acc, requantized
from .rule import Context, IntegerLayer, RealParams, Rule

_A = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_B = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_MULTIPLY = is_op("relax.multiply")(_A, _B)
PATTERN = is_op("relax.quantize")(_MULTIPLY, is_const(), is_const())


def _broadcast_index(index, shape) -> list:
    """The index into an operand of `shape` of the broadcast result's `index` (numpy rules)."""
    return [0 if n == 1 else i for i, n in zip(index[len(index) - len(shape):], shape)]


def product_primfunc(a_shape, b_shape, out_shape, axis: int, width: int, left_shift: bool, out_dtype: str = "int8"):
    """PrimFunc(a, b, za, zb, q, ls, rs, c, zp, out): out = requantize((a - za) * (b - zb)) of int8 a and b
    broadcast to `out_shape`, the product in int32.

    za, zb (int32) and the requantization parameters hold one value per channel along the result's `axis`
    (one in all when width is 1). product is its numpy twin.
    """
    a, b = placeholder(a_shape, "int8", "a"), placeholder(b_shape, "int8", "b")
    za, zb = placeholder((width,), "int32", "za"), placeholder((width,), "int32", "zb")
    q, ls, rs, c, zp = requant_placeholders(width)

    def body(*i):
        ch = i[axis] if width > 1 else 0
        acc = ((a(*_broadcast_index(i, a_shape)).astype("int32") - za[ch])
               * (b(*_broadcast_index(i, b_shape)).astype("int32") - zb[ch]))
        return requantized(acc.astype("int64"), q, ls, rs, c, zp, ch, left_shift, out_dtype)

    return te.create_prim_func([a, b, za, zb, q, ls, rs, c, zp, te.compute(dims(out_shape), body, name="product")])


def _on_result(op: Operand, ndim: int) -> Operand:
    """The operand with its channel axis counted on the broadcast result of rank `ndim`."""
    return replace(op, axis=op.axis + ndim - op.data.ty.ndim)


def rewrite(ctx: Context, root: relax.Call, m: dict) -> relax.Expr:
    """The product kernel, or root when an operand is a constant or the parameters vary along two axes."""
    mul = m[_MULTIPLY]
    if any(isinstance(m[p].args[0], tvm.ir.expr.Constant) for p in (_A, _B)):
        return root
    where = ctx.where(mul, m[_A])
    shape = shape_of(root, where)
    a, b = (_on_result(operand(m[p], where), len(shape)) for p in (_A, _B))
    out = output(root, where)
    axes = channel_axes(a, b, out)
    if len(axes) > 1:
        return root
    axis = axes.pop() if axes else out.axis
    channels = shape[axis]
    s_a, z_a, s_b, z_b, s_o, z_o = (per_channel(v, o, axis, channels, f"the {what}", where) for v, o, what in (
        (a.scale, a, "scale of A"), (a.zero_point, a, "zero point of A"), (b.scale, b, "scale of B"),
        (b.zero_point, b, "zero point of B"), (out.scale, out, "output scale"),
        (out.zero_point, out, "output zero point")))
    width = max(np.size(v) for v in (s_a, z_a, s_b, z_b, s_o, z_o))
    spans = [np.maximum(127 - z, z + 128) for z in (z_a, z_b)]
    acc_scale = s_a * s_b  # exact in float64: two float32 scales
    params = [np.broadcast_to(p, (width,)) for p in requant_params(acc_scale, s_o, z_o, None, spans[0] * spans[1],
                                                                    where)]
    out_dtype = str(root.attrs.out_dtype)
    a_shape, b_shape = shape_of(a.data, where), shape_of(b.data, where)
    key = ("product", a_shape, b_shape, shape, axis, width, bool(np.any(params[1])), out_dtype)
    gv = ctx.kernel(key, lambda: product_primfunc(*key[1:]))
    ctx.record(root, m[_A], "product", {}, (a.data, b.data), None, (a.zero_point, b.zero_point), bias=None,
               acc_scale=acc_scale, axis=axis, out_scale=s_o, out_zero_point=z_o, out_dtype=out_dtype,
               real=RealParams((a.scale, b.scale)))
    zs = [np.broadcast_to(z, (width,)).astype(np.int32) for z in (z_a, z_b)]
    return relax.call_tir(gv, [a.data, b.data, *consts([*zs, *params])], relax.TensorType(shape, out_dtype))


def product(a_q, a_zero_point, b_q, b_zero_point, acc_scale, out_scale, out_zero_point, axis: int,
            out_dtype: str = "int8") -> np.ndarray:
    """(a - z_a) * (b - z_b) of two int8 tensors, broadcast, requantized from acc_scale (s_a * s_b) to
    (s_o, z_o); parameters () or per channel along the result's `axis`."""
    ndim = max(np.ndim(a_q), np.ndim(b_q))
    a, b = (np.asarray(t, np.int64).reshape((1,) * (ndim - np.ndim(t)) + np.shape(t)) - along(z, axis, ndim)
            for t, z in ((a_q, a_zero_point), (b_q, b_zero_point)))
    return requantize_acc(a * b, acc_scale, out_scale, out_zero_point, axis, out_dtype)


def reference(layer: IntegerLayer, values: dict) -> np.ndarray:
    a, b = (values[v] for v in layer.inputs)
    z_a, z_b = layer.zero_points
    return product(a, z_a, b, z_b, layer.acc_scale, layer.out_scale, layer.out_zero_point, layer.axis,
                   layer.out_dtype)


PRODUCT = Rule("product", PATTERN, rewrite, reference)
