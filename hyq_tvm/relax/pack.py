"""Int8 GEMMs whose constant weights are packed at compile time for the target's dot-product instruction.

`pack_weights(target)` rewrites relax.matmul (int8 activations x constant int8 (K, N) weight) and 1x1
relax.nn.conv2d (stride 1, no padding, one group, NCHW / OIHW, int8 input, constant int8 weight), both with
out_dtype int32, into call_tir of one scheduled, tensorized GEMM kernel per shape:
- x86-64 with AVX-512 VNNI: vpdpbusd multiplies uint8 by int8. The activations enter as a + 128 (uint8)
  and the kernel adds -128 * the column sums of W back (exact). Weights packed (N/16, K/4, 16, 4).
- aarch64: smull + sadalp + addp (NEON, int8 x int8). Weights packed (N/4, K/4, 4, 4).
Other targets get the module unchanged. A 1x1 convolution (batch 1) is the GEMM of its input read as (H*W, C),
written back as NCHW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, s_tir, te
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

from .schedule import PARALLEL_MIN, _factor

ROWS = 4   # output rows per register tile


def _dot_desc(lanes: int, a_dtype: str) -> tvm.tirx.PrimFunc:
    """C[i] += A[k] * B[i, k] for i < lanes, k < 4: what one instruction group of the target computes."""
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), a_dtype, offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")
    return desc


@T.prim_func(s_tir=True)
def _vnni_impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
               c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    # LLVM >= 22 declares vpdpbusd.512 on <64 x i8> operands (TVM's own dot_16x4_vnni passes <16 x i32>).
    with T.sblock("root"):
        T.reads(c[0:16], a[0:4], b[0:16, 0:4])
        T.writes(c[0:16])
        a4 = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
        c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), c.vload([0], "int32x16"),
            T.reinterpret(T.broadcast(a4, 16), dtype="uint8x64"), b.vload([0, 0], "int8x64"), dtype="int32x16")


@T.prim_func(s_tir=True)
def _neon_impl(a: T.Buffer((4,), "int8", offset_factor=1), b: T.Buffer((4, 4), "int8", offset_factor=1),
               c: T.Buffer((4,), "int32", offset_factor=1)) -> None:
    # rows 0-1 and 2-3 of B times A twice over: smull to int16, saddlp to int32 pairs, addp to one sum per row.
    with T.sblock("root"):
        T.reads(c[0:4], a[0:4], b[0:4, 0:4])
        T.writes(c[0:4])
        a8 = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "int8x4"), dtype="int32"), 2), dtype="int8x8")
        b16 = b.vload([0, 0], "int8x16")
        low = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                                      T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                                              a8, T.vectorlow(b16, dtype="int8x8"), dtype="int16x8"),
                                      dtype="int32x4")
        high = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                                       T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                                               a8, T.vectorhigh(b16, dtype="int8x8"), dtype="int16x8"),
                                       dtype="int32x4")
        c[T.ramp(T.int32(0), 1, 4)] = c.vload([0], "int32x4") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"), low, high, dtype="int32x4")


@dataclass(frozen=True)
class Dot:
    """A dot-product instruction group: `lanes` int32 outputs, each the sum of 4 int8 products."""

    intrin: str
    lanes: int
    shift: bool   # activations enter as uint8 (a + 128)


VNNI = Dot("hyq_dot_16x4_vnni", 16, True)
NEON = Dot("hyq_dot_4x4_neon", 4, False)
s_tir.TensorIntrin.register(VNNI.intrin, _dot_desc(VNNI.lanes, "uint8"), _vnni_impl, override=True)
s_tir.TensorIntrin.register(NEON.intrin, _dot_desc(NEON.lanes, "int8"), _neon_impl, override=True)


def dot_for(target: tvm.target.Target) -> Dot | None:
    """The dot-product instruction group the packed kernels use on `target`, or None."""
    if target.kind.name != "llvm":
        return None
    if target.attrs.get("feature.is_aarch64", False):
        return NEON
    return VNNI if target_has_features("avx512vnni", target) else None


def pack(weight: np.ndarray, dot: Dot) -> tuple[np.ndarray, np.ndarray]:
    """A (K, N) int8 weight as (N/lanes, K/4, lanes, 4), zero-padded, and the int32 term the kernel adds per column."""
    k, n = weight.shape
    padded = np.zeros((-(-k // 4) * 4, -(-n // dot.lanes) * dot.lanes), np.int8)
    padded[:k, :n] = weight
    kp, np_ = padded.shape
    packed = padded.reshape(kp // 4, 4, np_ // dot.lanes, dot.lanes).transpose(2, 0, 3, 1)
    offset = -128 * weight.astype(np.int32).sum(axis=0) if dot.shift else np.zeros(n, np.int32)
    return np.ascontiguousarray(packed), offset.astype(np.int32)


def gemm(m: int, k: int, n: int, dot: Dot, image: tuple[int, int] | None = None) -> tvm.tirx.PrimFunc:
    """out[m, n] = sum_k a[m, k] * w[k, n] (int8 -> int32) with w packed by `pack`, scheduled and tensorized.
    image (h, w), h * w = m: a given as (1, k, h, w) and out as (1, n, h, w), a 1x1 NCHW convolution."""
    kp, np_, lanes = -(-k // 4) * 4, -(-n // dot.lanes) * dot.lanes, dot.lanes
    a = te.placeholder((1, k, *image) if image else (m, k), "int8", "a")
    w = te.placeholder((np_ // lanes, kp // 4, lanes, 4), "int8", "w")
    offset = te.placeholder((n,), "int32", "offset")
    zero, operand = (128, "uint8") if dot.shift else (0, "int8")
    plain = not dot.shift and k == kp and not image   # a is already the kernel's operand

    def load(i, j):
        value = a[0, j, i // image[1], i % image[1]] if image else a[i, j]
        return (value.astype("int32") + zero).astype(operand)
    au = a if plain else te.compute((m, kp), lambda i, j: te.if_then_else(
        j < k, load(i, j), tvm.tirx.const(zero, operand)), name="a_in")
    r = te.reduce_axis((0, kp), "r")
    acc = te.compute((m, np_), lambda i, j: te.sum(
        au[i, r].astype("int32") * w[j // lanes, r // 4, j % lanes, r % 4].astype("int32"), axis=r), name="acc")
    if image:
        out = te.compute((1, n, *image), lambda _, j, y, x: acc[y * image[1] + x, j] + offset[j], name="out")
    else:
        out = te.compute((m, n), lambda i, j: acc[i, j] + offset[j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, w, offset, out]))

    if not plain:
        sch.vectorize(sch.split(sch.fuse(*sch.get_loops(sch.get_sblock("a_in"))), [None, 4])[1])
    block = sch.get_sblock("acc")
    i, j, r = sch.get_loops(block)
    io, ii = sch.split(i, [None, _factor(m, ROWS)])
    jo, ji = sch.split(j, [None, lanes])
    ro, ri = sch.split(r, [None, 4])
    sch.reorder(io, jo, ro, ii, ji, ri)
    outer = sch.fuse(io, jo)
    if m * n * k >= PARALLEL_MIN:
        sch.parallel(outer)
    sch.unroll(ii)
    out_block = sch.get_sblock("out")
    sch.reverse_compute_at(out_block, outer)
    sch.vectorize(sch.get_loops(out_block)[-1])
    init = sch.decompose_reduction(block, ro)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ji, dot.intrin)
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # 8: kOpaque, not fused


def _const_int8(expr: relax.Expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.expr.Constant) and expr.ty.dtype == "int8":
        return expr.value.numpy()
    return None


def _int8(expr: relax.Expr) -> bool:
    return isinstance(expr.ty, relax.TensorType) and expr.ty.dtype == "int8"


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, dot: Dot):
        super().__init__(mod)
        self.dot, self.kernels = dot, {}

    def _gemm(self, a: relax.Expr, weight: np.ndarray) -> relax.Expr:
        """call_tir of the packed GEMM of the activations `a`, (M, K) or (1, K, H, W), by the (K, N) `weight`."""
        shape, n = [int(d) for d in a.ty.shape], weight.shape[1]
        image = tuple(shape[2:]) if len(shape) == 4 else None
        m, k = (math.prod(image), shape[1]) if image else shape
        key = (m, k, n, image)
        if key not in self.kernels:
            name = f"hyq_gemm_{m}x{k}x{n}" + "_nchw" * bool(image)
            self.kernels[key] = self.builder_.add_func(gemm(m, k, n, self.dot, image), name)
        packed, offset = pack(weight, self.dot)
        out = (1, n, *image) if image else (m, n)
        return relax.call_tir(self.kernels[key], [a, relax.const(packed), relax.const(offset)],
                              relax.TensorType(out, "int32"))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or len(call.args) != 2 or not _int8(call.args[0]):
            return call
        x, weight = call.args[0], _const_int8(call.args[1])
        attrs, name = call.attrs, call.op.name
        if weight is None or str(getattr(attrs, "out_dtype", "")) != "int32":
            return call
        shape = [int(d) for d in x.ty.shape]
        if name == "relax.matmul" and weight.ndim == 2:
            a = self.builder_.emit(relax.op.reshape(x, (math.prod(shape[:-1]), shape[-1])))
            out = self.builder_.emit(self._gemm(a, weight))
            return relax.op.reshape(out, (*shape[:-1], weight.shape[1]))
        if (name == "relax.nn.conv2d" and weight.shape[2:] == (1, 1) and int(attrs.groups) == 1 and shape[0] == 1
                and attrs.data_layout == "NCHW" and attrs.kernel_layout == "OIHW" and attrs.out_layout == "NCHW"
                and all(int(v) == 1 for v in [*attrs.strides, *attrs.dilation])
                and all(int(v) == 0 for v in attrs.padding)):
            return self._gemm(x, weight[:, :, 0, 0].T)
        return call


def pack_weights(target: tvm.target.Target) -> tvm.transform.Pass:
    """Rewrite int8 GEMMs with constant weights into packed, tensorized kernels for `target` (see module doc)."""
    @tvm.transform.module_pass(opt_level=0, name="HyqPackWeights")
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        dot = dot_for(target)
        if dot is None:
            return mod
        packer = _Packer(mod, dot)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                packer.builder_.update_func(gv, packer.visit_expr(func))
        return packer.builder_.get()
    return transform
