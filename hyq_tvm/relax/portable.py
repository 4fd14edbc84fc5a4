"""Compile a Relax module so that its float computations give the same bits on every LLVM target.

The integer kernels are exact anywhere; the float islands (dequantize, LayerNorm, SiLU, GELU, softmax of
partial mode) are not, for two reasons found by running one module on x86-64 and on aarch64:
- TVM lets LLVM contract a * b + c into a fused multiply-add wherever the backend likes, and the x86 and
  AArch64 backends like different places (a LayerNorm's sum of squares: 384 FMAs on x86-64, 32 on the
  Cortex-A72). `fence_contraction` wraps every float product that feeds an add or subtract in
  `llvm.arithmetic.fence`, so each product is rounded on its own, as IEEE and numpy do.
- erf and tanh are libm calls, and glibc's erff differs between x86-64 and aarch64. They are legalized
  with TVM's own polynomials (topi.fast_erf / fast_tanh, within 7 ULP of the true value) instead.
exp (in SiLU, sigmoid and softmax) is TVM's polynomial topi.fast_exp rather than libm's expf: the same bits on
both targets as well, and made of adds, multiplies and a floor, so it vectorizes (expf is called lane by lane).
"""
from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import relax, te, tirx, topi

FENCE = "llvm.arithmetic.fence"


def _fence(expr: tirx.PrimExpr) -> tirx.PrimExpr:
    if isinstance(expr, tirx.Mul) and "float" in str(expr.ty):
        return tirx.call_llvm_pure_intrin(str(expr.ty), FENCE, expr)
    return expr


def _fenced_operands(expr):
    """An add / subtract whose float product operands are fenced."""
    a, b = _fence(expr.a), _fence(expr.b)
    return expr if a.same_as(expr.a) and b.same_as(expr.b) else type(expr)(a, b)


@tvm.transform.module_pass(opt_level=0, name="FenceContraction")
def fence_contraction(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Every PrimFunc with its float products fenced from the adds and subtracts that consume them."""
    funcs = {gv: tvm_ffi.structural_map(f, [((tirx.Add, tirx.Sub), _fenced_operands)])
             if isinstance(f, tirx.PrimFunc) else f for gv, f in mod.functions_items()}
    return tvm.IRModule(funcs, attrs=mod.attrs)


def _unary(name: str, compute):
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        return bb.call_te(compute, call.args[0], primfunc_name_hint=name)
    return legalize


def _gelu(x: te.Tensor) -> te.Tensor:
    half = tirx.const(0.5, x.dtype)
    return x * (half + topi.fast_erf(x * tirx.const(math.sqrt(0.5), x.dtype)) * half)


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    inner = tirx.const(math.sqrt(2.0 / math.pi), x.dtype) * x * (1 + tirx.const(0.044715, x.dtype) * x * x)
    return tirx.const(0.5, x.dtype) * x * (1 + topi.fast_tanh(inner))


def _sigmoid(x: te.Tensor) -> te.Tensor:
    one, exp = tirx.const(1.0, x.dtype), _exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: one / (one + exp(*i)), name="sigmoid")


def _silu(x: te.Tensor) -> te.Tensor:
    """x / (1 + exp(-x)): x * sigmoid(x) with one division per element instead of a division and a product."""
    one, exp = tirx.const(1.0, x.dtype), _exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: x(*i) / (one + exp(*i)), name="silu")


def _exp(x: te.Tensor) -> te.Tensor:
    return topi.fast_exp(x) if x.dtype == "float32" else topi.exp(x)


def _softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    x = call.args[0]
    compute = topi.nn.fast_softmax if x.ty.dtype == "float32" else topi.nn.softmax
    return bb.call_te(compute, x, int(call.attrs.axis), primfunc_name_hint="softmax")


LEGALIZE = {
    "relax.exp": _unary("exp", _exp),
    "relax.sigmoid": _unary("sigmoid", _sigmoid),
    "relax.nn.silu": _unary("silu", _silu),
    "relax.nn.softmax": _softmax,
    "relax.erf": _unary("erf", topi.fast_erf),
    "relax.tanh": _unary("tanh", topi.fast_tanh),
    "relax.nn.gelu": _unary("gelu", _gelu),
    "relax.nn.gelu_tanh": _unary("gelu_tanh", _gelu_tanh),
}
