"""Compile a Relax module so that its float computations give the same bits on every LLVM target.

The integer kernels are exact anywhere; the float islands (dequantize, LayerNorm, SiLU, GELU, softmax of
partial mode) are not, for two reasons found by running one module on x86-64 and on aarch64:
- TVM lets LLVM contract a * b + c into a fused multiply-add wherever the backend likes, and the x86 and
  AArch64 backends like different places (a LayerNorm's sum of squares: 384 FMAs on x86-64, 32 on the
  Cortex-A72). `fuse_multiply_add` makes every float product that feeds an add or subtract an explicit
  fused multiply-add (`llvm.fma`: one rounding, the same on every target; fewer instructions than a product
  and a sum), and fences (`llvm.arithmetic.fence`) a second product in the same sum, so that LLVM has nothing
  left to contract.
- erf and tanh are libm calls, and glibc's erff differs between x86-64 and aarch64. They are legalized
  with TVM's own polynomials (topi.fast_erf / fast_tanh, within 7 ULP of the true value) instead.
exp (in SiLU, sigmoid and softmax) is TVM's polynomial topi.fast_exp rather than libm's expf: the same bits on
both targets as well, and made of adds, multiplies and a floor, so it vectorizes (expf is called lane by lane).
A softmax along its last axis reduces each row (max, sum) in one fixed order that vectorizes (`_row_reduce`) and
multiplies by the reciprocal of the sum; quantize by a constant scale multiplies by its reciprocal, computed at
compile time (both as ATen on the CPU): no division per element.
"""
from __future__ import annotations

import math

import numpy as np

import tvm
import tvm_ffi
from tvm import relax, te, tirx, topi

FENCE = "llvm.arithmetic.fence"
FMA = "llvm.fma"


def _product(expr: tirx.PrimExpr) -> bool:
    return isinstance(expr, tirx.Mul) and "float" in str(expr.ty)


def _fence(expr: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.call_llvm_pure_intrin(str(expr.ty), FENCE, expr) if _product(expr) else expr


def _fused(expr):
    """An add / subtract of a float product as one explicit fused multiply-add (a single rounding, the same on
    every target that has the instruction), any second product fenced."""
    a, b = expr.a, expr.b
    ty = str(expr.ty)
    if isinstance(expr, tirx.Sub):
        if _product(a):
            return tirx.call_llvm_pure_intrin(ty, FMA, a.a, a.b, -_fence(b))
        if _product(b):
            return tirx.call_llvm_pure_intrin(ty, FMA, -b.a, b.b, a)
        return expr
    if _product(a):
        return tirx.call_llvm_pure_intrin(ty, FMA, a.a, a.b, _fence(b))
    if _product(b):
        return tirx.call_llvm_pure_intrin(ty, FMA, b.a, b.b, a)
    return expr


@tvm.transform.module_pass(opt_level=0, name="FuseMultiplyAdd")
def fuse_multiply_add(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Every PrimFunc with each float product that feeds an add or subtract fused into it explicitly (llvm.fma),
    so that LLVM has nothing left to contract as the target likes."""
    funcs = {gv: tvm_ffi.structural_map(f, [((tirx.Add, tirx.Sub), _fused)])
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


PARTIALS = 16   # a softmax row is reduced as this many interleaved partial results, then those in order


def _row_reduce(x: te.Tensor, axis: int, combine, name: str) -> te.Tensor:
    """x reduced along the last `axis` (keepdims) in a fixed order that vectorizes: PARTIALS interleaved partial
    results (partial j takes elements j, j + PARTIALS, ...), then those in order."""
    n = int(x.shape[axis])
    parts = PARTIALS if n % PARTIALS == 0 else 1
    k = te.reduce_axis((0, n // parts), f"{name}_k")
    partial = te.compute((*x.shape[:axis], parts), lambda *i: combine(x(*i[:-1], k * parts + i[-1]), axis=k),
                         name=f"{name}_partial")
    j = te.reduce_axis((0, parts), f"{name}_j")
    return te.compute((*x.shape[:axis], 1), lambda *i: combine(partial(*i[:-1], j), axis=j), name=name)


def _softmax_of(x: te.Tensor, axis: int) -> te.Tensor:
    """exp(x - max) times the reciprocal of its sum (one division per row, as ATen's CPU softmax), the max and the
    sum reduced by `_row_reduce`."""
    axis = axis % len(x.shape)
    if axis != len(x.shape) - 1:
        return topi.nn.fast_softmax(x, axis)
    exp = _exp(topi.subtract(x, _row_reduce(x, axis, te.max, "row_max")))
    total = _row_reduce(exp, axis, te.sum, "row_sum")
    one = tirx.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: exp(*i) * (one / total(*i[:-1], 0)), name="softmax")


def _softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(_softmax_of, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax")


def _quantize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """round(x * (1 / scale)) + zero point, clipped (as ATen's fake quantization); the reciprocal of a constant
    scale computed once at compile time, so that no element pays for a division."""
    x, scale, zero = call.args
    if not isinstance(scale, tvm.ir.expr.Constant) or not isinstance(zero, tvm.ir.expr.Constant):
        return tvm.ir.Op.get("relax.quantize").get_attr("FLegalize")(bb, call)
    inverse = (np.float32(1.0) / scale.value.numpy().astype(np.float32)).reshape(-1)
    zeros = zero.value.numpy().reshape(-1)
    dtype, axis = str(call.attrs.out_dtype), int(call.attrs.axis)
    info = np.iinfo(dtype)

    def compute(data: te.Tensor, inv: te.Tensor, zp: te.Tensor) -> te.Tensor:
        def element(*i):
            at = lambda t: t[i[axis % len(i)] if t.shape[0] > 1 else 0]   # noqa: E731
            value = te.round(data(*i) * at(inv)) + at(zp).astype(data.dtype)
            return te.max(te.min(value, tirx.const(info.max, data.dtype)), tirx.const(info.min, data.dtype)).astype(dtype)
        return te.compute(data.shape, element, name="quantized")
    return bb.call_te(compute, x, relax.const(inverse), relax.const(zeros), primfunc_name_hint="quantize")


LEGALIZE = {
    "relax.exp": _unary("exp", _exp),
    "relax.sigmoid": _unary("sigmoid", _sigmoid),
    "relax.nn.silu": _unary("silu", _silu),
    "relax.nn.softmax": _softmax,
    "relax.quantize": _quantize,
    "relax.erf": _unary("erf", topi.fast_erf),
    "relax.tanh": _unary("tanh", topi.fast_tanh),
    "relax.nn.gelu": _unary("gelu", _gelu),
    "relax.nn.gelu_tanh": _unary("gelu_tanh", _gelu_tanh),
}
