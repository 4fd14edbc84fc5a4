"""The integer lowering: the rules applied one after the other to every Relax function, then the check that
no conv2d / matmul is left in floating point.

Scales and zero points must be constants. Anything that cannot be integerized raises a HyqError.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ...errors import HyqError
from .gemm import GEMM, GEMM_FLOAT
from .lookup import LOOKUP
from .norm import NORM
from .operand import dtype_of
from .pool import POOL
from .product import PRODUCT
from .rescale import AFFINE, RESCALE
from .resize import RESIZE
from .rule import IntegerLayer, Lowering
from .softmax import SOFTMAX

# In order of application: a rule sees the graph the rules before it left, so this order decides which match wins.
RULES = (GEMM, GEMM_FLOAT, SOFTMAX, RESCALE, AFFINE, NORM, LOOKUP, RESIZE, POOL, PRODUCT)

INTEGER_OPS = ("relax.nn.conv2d", "relax.matmul")


def _float_heavy_op(e) -> bool:
    """Whether `e` is a conv2d / matmul with a floating-point input."""
    return (isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name in INTEGER_OPS
            and any("float" in dtype_of(arg) for arg in e.args[:2]))


def check_integer(mod: tvm.IRModule) -> None:
    """Raise a HyqError naming the first conv2d / matmul that still computes in floating point."""
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                found: list[relax.Call] = []
                relax.analysis.post_order_visit(
                    binding.value, lambda e, found=found: found.append(e) if _float_heavy_op(e) else None)
                if found:
                    dtypes = "/".join(sorted({dtype_of(arg) for arg in found[0].args[:2]}))
                    raise HyqError(f"{found[0].op.name} '{binding.var.name}' in @{gv.name_hint} still computes in"
                                   f" {dtypes}: its inputs are not dequantized int8 tensors with constant scales")


def integerize_layers(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[IntegerLayer]]:
    """integerize(mod) and the IntegerLayer of every rewritten op of `main`, in binding order.

    Trivial bindings and equal computations (two consumers quantizing one tensor alike) are merged first,
    as the rewrite would merge them afterwards (losing result vars).
    """
    mod = relax.transform.EliminateCommonSubexpr()(relax.transform.CanonicalizeBindings()(mod))
    lowering = Lowering(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            for rule in RULES:
                func = rule.apply(lowering, gv.name_hint, func)
            lowering.builder.update_func(gv, relax.analysis.remove_all_unused(func))
    out = lowering.builder.get()
    check_integer(out)
    if not lowering.layers:
        return out, []
    order = {b.var: i for i, b in enumerate(b for block in out["main"].body.blocks for b in block.bindings)}
    missing = [layer.name for layer in lowering.layers.values() if layer.result not in order]
    if missing:
        raise HyqError(f"integer layer(s) lost their result var in @main: {', '.join(missing)}")
    return out, sorted(lowering.layers.values(), key=lambda layer: order[layer.result])


def integerize(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite every QDQ conv2d / matmul (and what the other rules match) of every Relax function into
    integer arithmetic."""
    return integerize_layers(mod)[0]


def integerize_pass(layers: list[IntegerLayer] | None = None) -> tvm.transform.Pass:
    """Module pass "hyq.Integerize": integerize; appends the integer layers to `layers` when given."""
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out, found = integerize_layers(mod)
        if layers is not None:
            layers.extend(found)
        return out
    return tvm.transform.module_pass(transform, opt_level=0, name="hyq.Integerize")
