"""Replace the importer's hyq.mark calls by the QuantPlan's quantize / dequantize (the QDQ graph).

The float QDQ graph computes the fake-quant arithmetic of hyq_tvm/quant/modules.py:

    conv2d / linear input:  dequantize(clip(quantize(x, s_a, z_a)), 1, z_a)  = x_int (unit scale:
                            s_a is folded into the weight)
    conv2d / linear weight: dequantize(w_q, s_w, z_w) with the constant int8
                            w_q = clip(round(w * s_a / s_w) + z_w), computed here from the float weight
    matmul operand, norm / softmax input: dequantize(clip(quantize(x, s, z)), s, z)

quantize rounds half to even like torch.round; clip restricts b-bit values (carried in int8) to
their range when b < 8. Everything between the marks (softmax, LayerNorm, GELU, SiLU, ...) stays float.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..errors import HyqError
from ..quant.plan import QuantPlan
from ..quant.quantizer import qrange
from .importer import is_mark, mark_calls, mark_name

WEIGHTED_OPS = ("conv2d", "linear")


def _const(values: np.ndarray, dtype: str) -> relax.Expr:
    return relax.const(np.asarray(values, dtype=dtype), dtype)


def _qparams(t: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int8) of a plan tensor: () per tensor, (C,) per channel."""
    scale = np.asarray(t["scale"], np.float32)
    zero = np.asarray(t["zero_point"], np.int8)
    return (scale, zero) if t["granularity"] == "channel" else (scale.reshape(()), zero.reshape(()))


def _axis(t: dict[str, Any]) -> int:
    return int(t["axis"]) if t["granularity"] == "channel" else -1


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


def quantize_values(x: np.ndarray, t: dict[str, Any]) -> np.ndarray:
    """int8 clip(round(x / s) + z) of a constant with the plan tensor `t` (axis as in the plan)."""
    scale, zero = _qparams(t)
    qmin, qmax = qrange(t["bits"])
    axis = _axis(t) % x.ndim
    q = np.round(x / _broadcast(scale, axis, x.ndim)) + _broadcast(zero, axis, x.ndim).astype(np.float32)
    return np.clip(q, qmin, qmax).astype(np.int8)


@relax.expr_functor.mutator
class _Annotator(relax.PyExprMutator):
    """Rewrites each hyq.mark call into the QDQ of its plan entry."""

    def __init__(self, mod: tvm.IRModule, plan: QuantPlan):
        super().__init__(mod)
        self.plan = plan

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if not is_mark(call):
            return super().visit_call_(call)
        layer, role = mark_name(call)
        entry = self.plan.layers[layer]
        x = self.visit_expr(call.args[1])
        if role == "weight":
            return self.weight(x, entry)
        t = entry["inputs"][int(role[-1])]
        return self.activation(x, t, unit_scale=entry["op"] in WEIGHTED_OPS)

    def activation(self, x: relax.Expr, t: dict[str, Any], unit_scale: bool) -> relax.Expr:
        scale, zero = _qparams(t)
        axis = _axis(t)
        q = self.builder_.emit(relax.op.quantize(x, _const(scale, "float32"), _const(zero, "int8"), axis=axis))
        qmin, qmax = qrange(t["bits"])
        if (qmin, qmax) != (-128, 127):
            q = self.builder_.emit(relax.op.clip(q, qmin, qmax))
        dq_scale = np.ones_like(scale) if unit_scale else scale
        return relax.op.dequantize(q, _const(dq_scale, "float32"), _const(zero, "int8"), axis=axis)

    def weight(self, w: relax.Expr, entry: dict[str, Any]) -> relax.Expr:
        act_scale, _ = _qparams(entry["inputs"][0])
        t = entry["weight"]
        folded = folded_weight(w.value.numpy(), act_scale)
        scale, zero = _qparams(t)
        return relax.op.dequantize(_const(quantize_values(folded, t), "int8"), _const(scale, "float32"),
                                   _const(zero, "int8"), axis=_axis(t))


def _check(mod: tvm.IRModule, plan: QuantPlan) -> None:
    """A HyqError for a mark of a layer the plan lacks or of a weight that is not a constant."""
    for call in mark_calls(mod):
        layer, role = mark_name(call)
        if layer not in plan.layers:
            raise HyqError(f"the Relax graph marks layer {layer!r}, which the plan does not quantize")
        if role == "weight" and not isinstance(call.args[1], tvm.ir.expr.Constant):
            raise HyqError(f"layer {layer!r}: its weight is not a constant in the Relax graph")


def annotate(mod: tvm.IRModule, plan: QuantPlan) -> tvm.IRModule:
    """The module with every hyq.mark replaced by the plan's quantize / dequantize."""
    _check(mod, plan)
    annotator = _Annotator(mod, plan)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            annotator.builder_.update_func(gv, annotator.visit_expr(func))
    return annotator.builder_.get()
