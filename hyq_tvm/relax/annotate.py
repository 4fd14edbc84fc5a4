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

import numpy as np
import tvm
from tvm import relax

from ..errors import HyqError
from ..quant.plan import LayerQuant, QuantPlan
from ..quant.qdq import ActivationQDQ, activation_qdq, channel_axis, qparams, weight_values
from .importer import is_mark, mark_calls, mark_name


def _const(values: np.ndarray, dtype: str) -> relax.Expr:
    return relax.const(np.asarray(values, dtype=dtype), dtype)


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
        return self.activation(x, activation_qdq(entry, role))

    def activation(self, x: relax.Expr, qdq: ActivationQDQ) -> relax.Expr:
        q = self.builder_.emit(relax.op.quantize(x, _const(qdq.scale, "float32"), _const(qdq.zero, "int8"),
                                                 axis=qdq.axis))
        if qdq.clip is not None:
            q = self.builder_.emit(relax.op.clip(q, *qdq.clip))
        return relax.op.dequantize(q, _const(qdq.dq_scale, "float32"), _const(qdq.zero, "int8"), axis=qdq.axis)

    def weight(self, w: relax.Expr, entry: LayerQuant) -> relax.Expr:
        t = entry.weight
        scale, zero = qparams(t)
        return relax.op.dequantize(_const(weight_values(w.value.numpy(), entry), "int8"), _const(scale, "float32"),
                                   _const(zero, "int8"), axis=channel_axis(t))


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
