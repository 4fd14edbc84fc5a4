"""Int8 GEMMs whose constant weights are packed at compile time for the target's dot-product instruction.

`pack_weights(target)` rewrites relax.matmul (int8 activations x constant int8 (K, N) weight) and relax.nn.conv2d
(batch 1, one group, NCHW / OIHW, int8 input, constant int8 weight; any kernel size, stride, dilation and zero
padding), both with out_dtype int32, into call_tir of one scheduled, tensorized GEMM kernel per shape; a matmul
of two int8 activations into a GEMM that packs its right operand at run time (`matmul_gemm`), and a depthwise
conv2d into the channel-lane kernel of depthwise.py:
- x86-64 with AVX-512 VNNI: vpdpbusd multiplies uint8 by int8. The activations enter as a + 128 (uint8)
  and the kernel adds -128 * the column sums of W back (exact). Weights packed (N/16, K/4, 16, 4).
- aarch64: sdot where the target has +dotprod (Armv8.2, e.g. Cortex-A76), else smull + saddlp + addp (NEON,
  Armv8.0, e.g. Cortex-A72 / A53), int8 x int8. Weights packed (N/4, K/4, 4, 4).
Other targets get the module unchanged. A convolution is the GEMM of its input read window by window (im2col:
row = output pixel, column = (channel, dy, dx)) by its weight as (C*kh*kw, O), written back as NCHW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax, s_tir, te
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

from . import depthwise, schedule
from .window import Window, dims, flat_index, split_index
from .schedule import PARALLEL_MIN, _extent, _factor

ROWS = 8         # output rows per register tile ...
ROWS_LONG_K = 16  # ... and where the sum is at least LONG_K long (more accumulators amortize each operand load)
LONG_K = 256
PACKED = "hyq.packed"   # annotation of a packed kernel's accumulation block: "layout:intrinsic:out_w:aligned"
STAGED = "hyq.staged"   # annotation of the padding / im2col blocks that feed it


def _dot_desc(lanes: int, a_dtype: str, b_dtype: str = "int8") -> tvm.tirx.PrimFunc:
    """C[i] += A[k] * B[i, k] for i < lanes, k < 4: what one instruction group of the target computes."""
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), a_dtype, offset_factor=1), b: T.Buffer((lanes, 4), b_dtype, offset_factor=1),
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
def _vnni_lanes_impl(a: T.Buffer((4,), "int8", offset_factor=1), b: T.Buffer((16, 4), "uint8", offset_factor=1),
                     c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    # the same instruction with the roles swapped: B (uint8 activations) in lanes, A (int8 weights) broadcast.
    with T.sblock("root"):
        T.reads(c[0:16], a[0:4], b[0:16, 0:4])
        T.writes(c[0:16])
        a4 = T.reinterpret(a.vload([0], "int8x4"), dtype="int32")
        c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), c.vload([0], "int32x16"),
            b.vload([0, 0], "uint8x64"), T.reinterpret(T.broadcast(a4, 16), dtype="int8x64"), dtype="int32x16")


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


@T.prim_func(s_tir=True)
def _sdot_impl(a: T.Buffer((4,), "int8", offset_factor=1), b: T.Buffer((4, 4), "int8", offset_factor=1),
               c: T.Buffer((4,), "int32", offset_factor=1)) -> None:
    # Armv8.2 dot product: lane i of C += the 4 products of row i of B with A (broadcast to every lane).
    with T.sblock("root"):
        T.reads(c[0:4], a[0:4], b[0:4, 0:4])
        T.writes(c[0:4])
        a16 = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
        c[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), c.vload([0], "int32x4"),
            b.vload([0, 0], "int8x16"), a16, dtype="int32x4")


@dataclass(frozen=True)
class Dot:
    """A dot-product instruction group: `lanes` int32 outputs, each the sum of 4 int8 products."""

    intrin: str         # activations broadcast, weights in lanes
    lanes_intrin: str   # weights broadcast, activations in lanes
    lanes: int
    shift: bool         # activations enter as uint8 (a + 128)


VNNI = Dot("hyq_dot_16x4_vnni", "hyq_dot_16x4_vnni_lanes", 16, True)
NEON = Dot("hyq_dot_4x4_neon", "hyq_dot_4x4_neon", 4, False)   # int8 x int8: one instruction group serves both
SDOT = Dot("hyq_dot_4x4_sdot", "hyq_dot_4x4_sdot", 4, False)
DOTS = {dot.intrin: dot for dot in (VNNI, NEON, SDOT)}
s_tir.TensorIntrin.register(VNNI.intrin, _dot_desc(VNNI.lanes, "uint8"), _vnni_impl, override=True)
s_tir.TensorIntrin.register(VNNI.lanes_intrin, _dot_desc(VNNI.lanes, "int8", "uint8"), _vnni_lanes_impl, override=True)
s_tir.TensorIntrin.register(NEON.intrin, _dot_desc(NEON.lanes, "int8"), _neon_impl, override=True)
s_tir.TensorIntrin.register(SDOT.intrin, _dot_desc(SDOT.lanes, "int8"), _sdot_impl, override=True)


def dot_for(target: tvm.target.Target) -> Dot | None:
    """The dot-product instruction group the packed kernels use on `target`, or None."""
    if target.kind.name != "llvm":
        return None
    if target.attrs.get("feature.is_aarch64", False):
        return SDOT if target_has_features("dotprod", target) else NEON
    return VNNI if target_has_features("avx512vnni", target) else None


def shift_offset(weight: np.ndarray, dot: Dot) -> np.ndarray:
    """The int32 term a kernel adds per column of the (K, N) weight: -128 * its column sums when the activations
    enter shifted by +128, else zero."""
    offset = -128 * weight.astype(np.int32).sum(axis=0) if dot.shift else np.zeros(weight.shape[1], np.int32)
    return offset.astype(np.int32)


def pack(weight: np.ndarray, dot: Dot) -> np.ndarray:
    """A (K, N) int8 weight as (N/lanes, K/4, lanes, 4), zero-padded."""
    k, n = weight.shape
    padded = np.zeros((-(-k // 4) * 4, -(-n // dot.lanes) * dot.lanes), np.int8)
    padded[:k, :n] = weight
    kp, np_ = padded.shape
    packed = padded.reshape(kp // 4, 4, np_ // dot.lanes, dot.lanes).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(packed)


def _operand(dot: Dot) -> tuple[int, str]:
    """What the kernel adds to an int8 activation, and the type the instruction takes it in."""
    return (128, "uint8") if dot.shift else (0, "int8")


def _annotated(func: tvm.tirx.PrimFunc, layout: str, dot: Dot, staged: dict[str, str], out_w: int = 0,
               aligned: bool = True) -> tvm.tirx.PrimFunc:
    """The kernel with its accumulation block marked PACKED (layout, instruction, output width, whether a tile's
    output is whole rows or part of one) and its operand blocks STAGED (block name -> "pad", "rows": (..., k) or
    "lanes": (..., k / 4, lanes, 4)), fusable with the elementwise operations after it (op_pattern 4:
    kOutEWiseFusable)."""
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    sch.annotate(acc, PACKED, f"{layout}:{dot.intrin}:{out_w}:{int(aligned)}")
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint in staged:
            sch.annotate(block, STAGED, staged[sch.get(block).name_hint])
    return sch.mod["main"].without_attr("global_symbol").with_attr("op_pattern", 4)


def _row_tile(rows: int, k: int) -> int:
    """Output rows per register tile of a packed kernel with `rows` rows summing over k."""
    return _factor(rows, ROWS_LONG_K if k >= LONG_K else ROWS)


def gemm(k: int, n: int, dot: Dot, rows: tuple[int, ...] | None = None, window: Window | None = None) -> tvm.tirx.PrimFunc:
    """out[..., n] = sum_k a[..., k] * w[k, n] (int8 -> int32) for activations a of shape (*rows, k), w packed by
    `pack` (scheduled by `schedule_packed`). With a `window` instead of rows, a is a (1, C, H, W) image read
    through it and out is (1, n, out_h, out_w): a convolution."""
    m = math.prod(window.out_hw) if window else math.prod(rows)
    kp, np_, lanes = -(-k // 4) * 4, -(-n // dot.lanes) * dot.lanes, dot.lanes
    a = te.placeholder(dims(1, *window.in_shape) if window else dims(*rows, k), "int8", "a")
    w = te.placeholder(dims(np_ // lanes, kp // 4, lanes, 4), "int8", "w")
    offset = te.placeholder(dims(n), "int32", "offset")
    zero, operand = _operand(dot)
    plain = not dot.shift and k == kp and not window and len(rows) == 1   # a is already the kernel's operand
    image = window.padded(a) if window else None

    def load(i, j):
        value = window.read(image, i, j) if window else a[(*split_index(i, rows), j)]
        return (value.astype("int32") + zero).astype(operand)
    au = a if plain else te.compute(dims(m, kp), lambda i, j: te.if_then_else(
        j < k, load(i, j), tvm.tirx.const(zero, operand)), name="a_in")
    r = te.reduce_axis((tvm.tirx.IntImm("int64", 0), tvm.tirx.IntImm("int64", kp)), "r")
    acc = te.compute(dims(m, np_), lambda i, j: te.sum(
        au[i, r].astype("int32") * w[j // lanes, r // 4, j % lanes, r % 4].astype("int32"), axis=r), name="acc")
    if window:
        ow = window.out_hw[1]
        out = te.compute(dims(1, n, *window.out_hw), lambda _, j, y, x: acc[y * ow + x, j] + offset[j], name="out")
        aligned = True
    else:
        out = te.compute(dims(*rows, n), lambda *i: acc[flat_index(i[:-1], rows), i[-1]] + offset[i[-1]],
                         name="out")
        aligned = rows[-1] % _row_tile(m, kp) == 0   # a tile of rows lies within one run of the last dimension
    return _annotated(te.create_prim_func([a, w, offset, out]), "rows", dot, {"pad": "pad", "a_in": "rows"},
                      aligned=aligned)


def pack_rows(weight: np.ndarray) -> np.ndarray:
    """A (K, N) int8 weight as (N, K) rows, K zero-padded to a multiple of 4."""
    k, n = weight.shape
    rows = np.zeros((n, -(-k // 4) * 4), np.int8)
    rows[:, :k] = weight.T
    return rows


def conv_gemm(window: Window, k: int, n: int, dot: Dot) -> tvm.tirx.PrimFunc:
    """out[n, p] = sum_k w[n, k] * a[k, p] (int8 -> int32) for the output pixels p of a convolution reading the
    (1, C, H, W) image a through `window`, w as `pack_rows`: the pixels in the instruction's lanes, the weights
    broadcast, so the result is written channel by channel as NCHW (scheduled by `schedule_packed`)."""
    lanes, m = dot.lanes, math.prod(window.out_hw)
    kp, mp = -(-k // 4) * 4, -(-m // lanes) * lanes
    a = te.placeholder(dims(1, *window.in_shape), "int8", "a")
    w = te.placeholder(dims(n, kp), "int8", "w")
    offset = te.placeholder(dims(n), "int32", "offset")
    zero, operand = _operand(dot)
    image = window.padded(a)

    def load(r4, i, q):
        value = (window.read(image, i, r4 * 4 + q).astype("int32") + zero).astype(operand)
        inside = [cond for cond, needed in ((i < m, mp > m), (r4 * 4 + q < k, kp > k)) if needed]
        return te.if_then_else(tvm.tirx.all(*inside), value, tvm.tirx.const(zero, operand)) if inside else value
    a_in = te.compute(dims(kp // 4, mp, 4), load, name="a_in")
    r = te.reduce_axis((tvm.tirx.IntImm("int64", 0), tvm.tirx.IntImm("int64", kp)), "r")
    acc = te.compute(dims(n, mp), lambda j, i: te.sum(
        w[j, r].astype("int32") * a_in[r // 4, i, r % 4].astype("int32"), axis=r), name="acc")
    ow = window.out_hw[1]
    out = te.compute(dims(1, n, *window.out_hw), lambda _, j, y, x: acc[j, y * ow + x] + offset[j], name="out")
    aligned = m % lanes == 0 and (ow % lanes == 0 or lanes % ow == 0)   # a tile: whole rows or part of one
    return _annotated(te.create_prim_func([a, w, offset, out]), "lanes", dot, {"pad": "pad", "a_in": "lanes"},
                      ow, aligned)


def matmul_gemm(batch: tuple[int, ...], m: int, k: int, n: int, dot: Dot) -> tvm.tirx.PrimFunc:
    """out[..., i, j] = sum_k a[..., i, k] * b[..., k, j] (int8 -> int32) for two activations: b copied at run
    time into the instruction's lanes layout (j in the lanes, groups of 4 k), a broadcast 4 values at a time
    (scheduled by `schedule_packed`), plus offset[..., j]: where the instruction takes a as uint8, a enters as
    a + 128 and the offset is -128 * the sum of column j of b (else zero)."""
    lanes = dot.lanes
    kp, np_ = -(-k // 4) * 4, -(-n // lanes) * lanes
    a = te.placeholder(dims(*batch, m, k), "int8", "a")
    b = te.placeholder(dims(*batch, k, n), "int8", "b")
    zero, operand = _operand(dot)
    plain = not dot.shift and k == kp
    a_in = a if plain else te.compute(dims(*batch, m, kp), lambda *i: te.if_then_else(
        i[-1] < k, (a[i].astype("int32") + zero).astype(operand), tvm.tirx.const(zero, operand)), name="a_in")

    def load(*index):   # (*batch, k / 4, j, k % 4)
        *g, r4, j, q = index
        inside = [cond for cond, needed in ((r4 * 4 + q < k, kp > k), (j < n, np_ > n)) if needed]
        value = b[(*g, r4 * 4 + q, j)]
        return te.if_then_else(tvm.tirx.all(*inside), value, tvm.tirx.const(0, "int8")) if inside else value
    b_in = te.compute(dims(*batch, kp // 4, np_, 4), load, name="b_in")
    r = te.reduce_axis((tvm.tirx.IntImm("int64", 0), tvm.tirx.IntImm("int64", kp)), "r")
    acc = te.compute(dims(*batch, m, np_), lambda *i: te.sum(
        a_in[(*i[:-1], r)].astype("int32") * b_in[(*i[:-2], r // 4, i[-1], r % 4)].astype("int32"), axis=r),
        name="acc")
    offset = te.placeholder(dims(*batch, n), "int32", "offset")
    out = te.compute(dims(*batch, m, n), lambda *i: acc[i] + offset[(*i[:-2], i[-1])], name="out")
    aligned = m % _row_tile(m, kp) == 0 and n % lanes == 0
    staged = {"a_in": "rows", "b_in": "lanes"}
    return _annotated(te.create_prim_func([a, b, offset, out]), "rows", dot, staged, 0, aligned)


def _schedule_staged(sch: s_tir.Schedule, acc, lanes: int, ow: int) -> None:
    """Vectorize the padding and operand blocks that feed the accumulation block `acc` (ow: a convolution's output
    width, its im2col block filled row by row, the window's indices computed once per row; 0 for a matmul)."""
    for block in sch.get_producers(acc):
        stmt = sch.get(block)
        if STAGED not in stmt.annotations:
            continue
        for producer in sch.get_producers(block):
            if sch.get(producer).annotations.get(STAGED) == "pad":
                loops = sch.get_loops(producer)
                sch.vectorize(sch.split(loops[-1], [None, _factor(_extent(sch, loops[-1]), lanes)])[1])
        loops = sch.get_loops(block)
        if stmt.annotations[STAGED] == "rows":   # (..., k)
            sch.vectorize(sch.split(sch.fuse(*loops), [None, 4])[1])
            continue
        *batch, r4, i, q = loops       # lanes: (k / 4, pixel or column, 4), a matmul's batch in front
        r4 = sch.fuse(*batch, r4) if batch else r4
        if _extent(sch, r4) * _extent(sch, i) * 4 >= PARALLEL_MIN * lanes:   # in vectors
            sch.parallel(r4)
        if ow:                 # row by row (the last one partial where pixels are padded to the lanes), the 4
            # values of a group unrolled: LLVM interleaves them
            sch.split(i, [None, ow])
            sch.unroll(q)
        else:
            sch.vectorize(sch.split(sch.fuse(i, q), [None, 4 * lanes])[1])


def schedule_packed(sch: s_tir.Schedule, acc) -> tuple[object, Callable | None, Callable[[], None]]:
    """Tile a PACKED accumulation block and vectorize its STAGED operands; the outer tile loop, how a consumer is
    computed in it where the output of one tile is a block of whole rows (else None), and what tensorizes the
    block once its consumers are placed."""
    layout, intrin, out_w, aligned = str(sch.get(acc).annotations[PACKED]).split(":")
    dot = DOTS[intrin]
    _schedule_staged(sch, acc, dot.lanes, int(out_w))
    # rows: acc[pixel or row, n], tiles of ROWS rows x lanes of n; lanes: acc[n, pixel], ROWS of n x lanes of pixels
    *batch, rows, cols, r = sch.get_loops(acc)   # a matmul's batch loops in front
    work = math.prod(_extent(sch, loop) for loop in (*batch, rows, cols, r))
    row_o, row_i = sch.split(rows, [None, _row_tile(_extent(sch, rows), _extent(sch, r))])
    col_o, col_i = sch.split(cols, [None, dot.lanes])
    k_o, k_i = sch.split(r, [None, 4])
    sch.reorder(*batch, row_o, col_o, k_o, row_i, col_i, k_i)
    outer = sch.fuse(*batch, row_o, col_o)
    if work // (dot.lanes * 4) >= PARALLEL_MIN:   # in dot-product instructions, each lanes x 4 multiply-adds
        sch.parallel(outer)
    sch.unroll(row_i)

    def tensorize() -> None:
        init = sch.decompose_reduction(acc, k_o)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(col_i, dot.intrin if layout == "rows" else dot.lanes_intrin)
    return outer, schedule.place_in_tile(sch, outer, dot.lanes) if aligned == "1" else None, tensorize


def _const_int8(expr: relax.Expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.expr.Constant) and expr.ty.dtype == "int8":
        return expr.value.numpy()
    return None


def _int8(expr: relax.Expr) -> bool:
    return isinstance(expr.ty, relax.TensorType) and expr.ty.dtype == "int8"


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, dot: Dot | None, lanes: int):
        super().__init__(mod)
        self.dot, self.lanes, self.kernels = dot, lanes, {}

    def _kernel(self, key: tuple, make, name: str) -> relax.GlobalVar:
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(make(), name)
        return self.kernels[key]

    def _gemm(self, a: relax.Expr, weight: np.ndarray, window: Window | None = None) -> relax.Expr:
        """call_tir of the packed GEMM of the (..., K) activations `a`, or of the (1, C, H, W) image `a` read
        through `window`, by the (K, N) `weight`."""
        k, n = weight.shape
        rows = None if window else tuple(int(d) for d in a.ty.shape)[:-1]
        m = math.prod(window.out_hw) if window else math.prod(rows)
        kernel = self._kernel(("rows", rows, k, n, window), lambda: gemm(k, n, self.dot, rows, window),
                              f"hyq_gemm_{m}x{k}x{n}" + ("_conv" if window else ""))
        args = [a, relax.const(pack(weight, self.dot)), relax.const(shift_offset(weight, self.dot))]
        out = (1, n, *window.out_hw) if window else (*rows, n)
        return relax.call_tir(kernel, args, relax.TensorType(out, "int32"))

    def _conv(self, a: relax.Expr, weight: np.ndarray, window: Window) -> relax.Expr:
        """The convolution of the image `a` by the OIHW `weight` through `window`."""
        columns = weight.reshape(weight.shape[0], -1).T
        k, n = columns.shape
        m = math.prod(window.out_hw)
        if m < self.dot.lanes:   # too few pixels to fill the lanes
            return self._gemm(a, columns, window)
        kernel = self._kernel(("lanes", k, n, window), lambda: conv_gemm(window, k, n, self.dot),
                              f"hyq_conv_{m}x{k}x{n}")
        args = [a, relax.const(pack_rows(columns)), relax.const(shift_offset(columns, self.dot))]
        return relax.call_tir(kernel, args, relax.TensorType((1, n, *window.out_hw), "int32"))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or len(call.args) != 2 or not _int8(call.args[0]):
            return call
        x, weight = call.args[0], _const_int8(call.args[1])
        attrs, name = call.attrs, call.op.name
        if str(getattr(attrs, "out_dtype", "")) != "int32":
            return call
        if weight is None:
            return self._matmul(call) if name == "relax.matmul" and self.dot else call
        shape = [int(d) for d in x.ty.shape]
        if name == "relax.matmul" and weight.ndim == 2 and len(shape) >= 2 and self.dot:
            return self._gemm(x, weight)
        if (name != "relax.nn.conv2d" or shape[0] != 1
                or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW")):
            return call
        window = Window(tuple(shape[1:]), weight.shape[2:], *(tuple(int(v) for v in getattr(attrs, a))
                                                              for a in ("strides", "dilation", "padding")),
                        tuple(int(d) for d in call.ty.shape)[2:])
        if int(attrs.groups) == 1 and self.dot:
            return self._conv(x, weight, window)
        if int(attrs.groups) == shape[1] == weight.shape[0] and depthwise.suits(window, self.lanes):
            return self._depthwise(x, weight, window)
        return call

    def _matmul(self, call: relax.Call) -> relax.Expr:
        """call_tir of the packed GEMM of two int8 activations (..., M, K) x (..., K, N) with equal batch shapes,
        or the matmul `call` unchanged."""
        a, b = call.args
        if not _int8(b) or len(a.ty.shape) < 2 or len(a.ty.shape) != len(b.ty.shape):
            return call
        *batch, m, k = (int(d) for d in a.ty.shape)
        *batch_b, _, n = (int(d) for d in b.ty.shape)
        if batch != batch_b or m * n < self.dot.lanes * _row_tile(m, k):
            return call
        kernel = self._kernel(("matmul", tuple(batch), m, k, n), lambda: matmul_gemm(tuple(batch), m, k, n, self.dot),
                              f"hyq_matmul_{math.prod(batch) * m}x{k}x{n}")
        if self.dot.shift:   # -128 * the column sums of b, computed at run time
            offset = self.builder_.emit(relax.op.multiply(relax.op.sum(relax.op.astype(b, "int32"), axis=[-2]),
                                                          relax.const(-128, "int32")))
        else:
            offset = relax.const(np.zeros((*batch, n), np.int32))
        return relax.call_tir(kernel, [a, b, offset], relax.TensorType((*batch, m, n), "int32"))

    def _depthwise(self, a: relax.Expr, weight: np.ndarray, window: Window) -> relax.Expr:
        """The depthwise convolution of the image `a` by the (C, 1, kh, kw) `weight` through `window`."""
        c, oh, ow = window.in_shape[0], *window.out_hw
        kernel = self._kernel(("depthwise", window), lambda: depthwise.depthwise(window, self.lanes),
                              f"hyq_depthwise_{c}x{oh}x{ow}")
        args = [a, relax.const(depthwise.pack(weight, self.lanes))]
        return relax.call_tir(kernel, args, relax.TensorType((1, c, oh, ow), "int32"))


def pack_weights(target: tvm.target.Target) -> tvm.transform.Pass:
    """Rewrite int8 GEMMs with constant weights into packed, tensorized kernels for `target` (see module doc), and
    int8 depthwise convolutions into the channel-lane kernels of depthwise.py."""
    @tvm.transform.module_pass(opt_level=0, name="HyqPackWeights")
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if target.kind.name != "llvm":
            return mod
        packer = _Packer(mod, dot_for(target), schedule.int32_lanes(target))
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                packer.builder_.update_func(gv, packer.visit_expr(func))
        return packer.builder_.get()
    return transform


schedule.ANNOTATED[PACKED] = schedule_packed
