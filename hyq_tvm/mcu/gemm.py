"""Int8 GEMMs of a microcontroller build, their sums taken by the shim's dot-product kernels (hyq_dot_<tm>x<tn>:
SMLAD on cores with the DSP extension, MVE on cores with Helium, plain C elsewhere).

    conv2d(x, W)   (batch 1, one group, NCHW / OIHW, int8 x constant int8 -> int32)
    matmul(x, W)   (int8 activations x constant int8 (K, N) weight -> int32)
        ->  call_tir(gemm, [x, R])    R: the weight as (N, K) rows, N padded to even with zero rows

The kernel copies `tm` rows of its operand (an image's pixels read through the convolution's window, or a
matmul's rows) into one contiguous block, then sums every tm x tn tile of outputs over K in one call, both
operands contiguous in K; the operations after it (zero-point correction, requantization) are fused into the
tile (op pattern kOutEWiseFusable).
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, s_tir, te
from tvm.script import tirx as T

from ..relax.schedule import KEEP
from ..relax.window import Window, dims, flat_index, split_index
from . import int4

GEMM = "hyq.mcu_gemm"   # annotation of the accumulation block: "tm:tn"
MACS = "hyq.macs"       # ... and its multiply-accumulates (output channels not padded)
TN = 2                   # output channels (weight rows) per tile


def dot_name(tm: int, tn: int, k: int) -> str:
    return f"hyq_dot_{tm}x{tn}_k{k}"


def _register(tm: int, tn: int, k: int) -> str:
    """The tensor intrinsic c[i, j] += sum_r a[i, r] * w[j, r] (i < tm, j < tn, r < k) as a call of the shim's
    hyq_dot_<tm>x<tn>(a, w, c, k), registered once."""
    name = dot_name(tm, tn, k)
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((tm, k), "int8", offset_factor=1), w: T.Buffer((tn, k), "int8", offset_factor=1),
             c: T.Buffer((tm, tn), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:tm, 0:tn], a[0:tm, 0:k], w[0:tn, 0:k])
            T.writes(c[0:tm, 0:tn])
            for i, j, r in T.grid(tm, tn, k):
                with T.sblock("update"):
                    vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                    c[vi, vj] = c[vi, vj] + T.cast(a[vi, vr], "int32") * T.cast(w[vj, vr], "int32")

    @T.prim_func(s_tir=True)
    def desc_row(a: T.Buffer((1, k), "int8", offset_factor=1), w: T.Buffer((tn, k), "int8", offset_factor=1),
                 c: T.Buffer((1, tn), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0, 0:tn], a[0, 0:k], w[0:tn, 0:k])
            T.writes(c[0, 0:tn])
            for j, r in T.grid(tn, k):
                with T.sblock("update"):
                    vj, vr = T.axis.remap("SR", [j, r])
                    c[0, vj] = c[0, vj] + T.cast(a[0, vr], "int32") * T.cast(w[vj, vr], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((tm, k), "int8", offset_factor=1), w: T.Buffer((tn, k), "int8", offset_factor=1),
             c: T.Buffer((tm, tn), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:tm, 0:tn], a[0:tm, 0:k], w[0:tn, 0:k])
            T.writes(c[0:tm, 0:tn])
            T.evaluate(T.call_extern("int32", f"hyq_dot_{tm}x{tn}", a.access_ptr("r"), w.access_ptr("r"),
                                     c.access_ptr("rw"), k))

    s_tir.TensorIntrin.register(name, desc if tm > 1 else desc_row, impl)   # one row: no row loop
    return name


def weight_rows(weight: np.ndarray) -> np.ndarray:
    """A (K, N) weight as (N, K) rows, N padded to a multiple of TN with zero rows."""
    k, n = weight.shape
    rows = np.zeros((-(-n // TN) * TN, k), np.int8)
    rows[:n] = weight.T
    return rows


def _annotated(func: tvm.tirx.PrimFunc, tm: int, macs: int, window: tuple[int, int] = (1, 1)) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    sch.annotate(sch.get_sblock("acc"), GEMM, f"{tm}:{TN}")
    sch.annotate(sch.get_sblock("acc"), MACS, macs)
    sch.annotate(sch.get_sblock("a_in"), KEEP, "%d:%d" % window)   # not inlined: copied once per row tile
    return sch.mod["main"].without_attr("global_symbol").with_attr("op_pattern", 4)


def _gemm(a: te.Tensor, operand, m: int, k: int, n: int, out_shape: list, out_index, tm: int,
          window: tuple[int, int] = (1, 1)) -> tvm.tirx.PrimFunc:
    """acc[i, j] = sum_r a_in[i, r] * w[j, r] for a_in[i, r] = operand(i, r) (m x k, r running over the (kh, kw)
    `window` fastest), w (n padded, k) rows; out = acc read at out_index(output index)."""
    padded = -(-n // TN) * TN
    w = te.placeholder(dims(padded, k), "int8", "w")
    a_in = te.compute(dims(m, k), operand, name="a_in")
    r = te.reduce_axis((tvm.tirx.IntImm("int64", 0), tvm.tirx.IntImm("int64", k)), "r")
    acc = te.compute(dims(m, padded), lambda i, j: te.sum(
        a_in[i, r].astype("int32") * w[j, r].astype("int32"), axis=r), name="acc")
    out = te.compute(dims(*out_shape), lambda *i: acc[out_index(i)], name="out")
    return _annotated(te.create_prim_func([a, w, out]), tm, m * n * k, window)


def conv_gemm(window: Window, n: int) -> tvm.tirx.PrimFunc:
    """out (1, n, oh, ow) = the convolution of the (1, C, H, W) image a through `window` by w (n, C * kh * kw) rows:
    row i of the operand is output pixel i, column r the window's (channel, dy, dx); tiles of 2 pixels where
    they lie in one image row, else 1."""
    (c, h, wd), (kh, kw), (top, left, _, _) = window.in_shape, window.kernel, window.padding
    (sh, sw), (dh, dw), (oh, ow) = window.strides, window.dilation, window.out_hw
    a = te.placeholder(dims(1, c, h, wd), "int8", "a")

    def operand(i, r):
        y = i // ow * sh + r // kw % kh * dh - top
        x = i % ow * sw + r % kw * dw - left
        inside = [cond for cond, needed in ((y >= 0, top), (y < h, True), (x >= 0, left), (x < wd, True)) if needed]
        value = a[0, r // (kh * kw), y, x]
        return te.if_then_else(tvm.tirx.all(*inside), value, tvm.tirx.const(0, "int8")) if any(window.padding) else value
    tm = 2 if ow % 2 == 0 else 1
    return _gemm(a, operand, oh * ow, c * kh * kw, n, [1, n, oh, ow], lambda i: (i[2] * ow + i[3], i[1]), tm, (kh, kw))


def matmul_gemm(rows: tuple[int, ...], k: int, n: int) -> tvm.tirx.PrimFunc:
    """out (*rows, n) = a (*rows, k) times w (n, k) rows; tiles of 2 rows where the last row dimension is even."""
    a = te.placeholder(dims(*rows, k), "int8", "a")

    def operand(i, r):
        return a[(*split_index(i, rows), r)]

    def flat(index):
        return flat_index(index[:-1], rows), index[-1]
    tm = 2 if rows[-1] % 2 == 0 else 1
    return _gemm(a, operand, math.prod(rows), k, n, [*rows, n], flat, tm)


def schedule_gemm(sch: s_tir.Schedule, acc) -> None:
    """Tile the GEMM block `acc` (tm pixels or rows x TN channels), its operand rows copied once per row tile,
    the consumers computed in each tile, the tile's sum one call of the shim's dot kernel."""
    tm, tn = (int(v) for v in str(sch.get(acc).annotations[GEMM]).split(":"))
    (a_in,) = sch.get_producers(acc)
    i, j, r = sch.get_loops(acc)
    k = int(sch.get(r).extent)
    io, ii = sch.split(i, [None, tm])
    jo, ji = sch.split(j, [None, tn])
    sch.reorder(io, jo, ii, ji, r)
    sch.compute_at(a_in, io)
    kh, kw = (int(v) for v in str(sch.get(a_in).annotations[KEEP]).split(":"))
    if kh * kw > 1:   # (channel, dy, dx) as three loops, the window's unrolled: no division per element
        _, dy, dx = sch.split(sch.get_loops(a_in)[-1], [None, kh, kw])
        sch.unroll(dy)
        sch.unroll(dx)
    for consumer in sch.get_consumers(acc):
        sch.reverse_compute_at(consumer, jo)
    sch.decompose_reduction(acc, ii)
    sch.transform_layout(acc, ("write", 0), lambda y, x: (y // tm, x // tn, y % tm, x % tn))
    sch.tensorize(ii if tm > 1 else ji, _register(tm, tn, k))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.unpack = int4.Unpacker(self.builder_)

    def _kernel(self, key: tuple, make, name: str) -> relax.GlobalVar:
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(make(), name)
        return self.kernels[key]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if (not isinstance(call.op, tvm.ir.Op) or len(call.args) != 2 or not isinstance(call.args[1], tvm.ir.expr.Constant)
                or str(getattr(call.attrs, "out_dtype", "")) != "int32" or call.args[0].ty.dtype != "int8"
                or call.args[1].ty.dtype != "int8"):
            return call
        x, weight = call.args[0], call.args[1].value.numpy()
        shape = [int(d) for d in x.ty.shape]
        name, attrs = call.op.name, call.attrs
        if name == "relax.matmul" and weight.ndim == 2 and len(shape) >= 2:
            k, n = weight.shape
            rows = tuple(shape[:-1])
            gv = self._kernel(("matmul", rows, k, n), lambda: matmul_gemm(rows, k, n), f"hyq_gemm_{math.prod(rows)}x{k}x{n}")
            return relax.call_tir(gv, [x, self.unpack(weight_rows(weight))], relax.TensorType((*rows, n), "int32"))
        if (name != "relax.nn.conv2d" or shape[0] != 1 or int(attrs.groups) != 1
                or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW")):
            return call
        window = Window(tuple(shape[1:]), weight.shape[2:], *(tuple(int(v) for v in getattr(attrs, a))
                                                              for a in ("strides", "dilation", "padding")),
                        tuple(int(d) for d in call.ty.shape)[2:])
        n = weight.shape[0]
        gv = self._kernel(("conv", window, n), lambda: conv_gemm(window, n),
                          f"hyq_conv_{math.prod(window.out_hw)}x{math.prod(weight.shape[1:])}x{n}")
        rows = weight_rows(weight.reshape(n, -1).T)
        return relax.call_tir(gv, [x, self.unpack(rows)], relax.TensorType((1, n, *window.out_hw), "int32"))


def gemm_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with its int8 conv2d / matmul by constant weights as the tiled GEMM kernels of this module (weights
    that fit in 4 bits packed two per byte, int4.py)."""
    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()
