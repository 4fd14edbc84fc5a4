"""The kernels of a static graph as C: TVM's `c` code generator, argument checks left out (the generated graph
runner passes each kernel the tensors it was compiled for), TVM's headers replaced by the project's shim."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from ..errors import HyqError
from ..relax.schedule import is_reduction
from .gemm import MACS

TARGET = {"kind": "c"}
SHIM = "hyq_shim.h"
DOT_C = r"""
/* hyq_dot_<tm>x<tn>(a, w, c, k): c[i * tn + j] += sum_r a[i * k + r] * w[j * k + r] for i < tm, j < tn, r < k
   (int8 rows, int32 sums): MVE (vmladava) on cores with Helium, SMLAD on cores with the DSP extension, else C. */
#if defined(__ARM_FEATURE_MVE) && (__ARM_FEATURE_MVE & 1)
#include <arm_mve.h>
#define HYQ_DOT_STEP 16
#define HYQ_DOT(c, x, y) c = vmladavaq_s8(c, x, y)
#define HYQ_DOT_LOAD(v, p, r) int8x16_t v = vldrbq_z_s8((p) + (r), vctp8q((uint32_t)(k - (r))))
#elif defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#include <arm_acle.h>
#define HYQ_DOT_STEP 4
#define HYQ_DOT(c, x, y) c = __smlad(x##e, y##e, __smlad(x##o, y##o, c))
#define HYQ_DOT_LOAD(v, p, r) int32_t v, v##o; __builtin_memcpy(&v, (p) + (r), 4); \
    int32_t v##e = __sxtb16(v); __asm__("sxtb16 %0, %1, ror #8" : "=r"(v##o) : "r"(v))
#endif
#ifdef HYQ_DOT_STEP
#define HYQ_DOT_END (HYQ_DOT_STEP == 16 ? k : k & ~3)
#else
#define HYQ_DOT_END 0
#endif

static inline int32_t hyq_dot_2x2(void *a_, void *w_, void *c_, int32_t k) {
  const int8_t *a = (const int8_t *)a_, *w = (const int8_t *)w_, *a1 = a + k, *w1 = w + k;
  int32_t *c = (int32_t *)c_;
  int32_t c00 = c[0], c01 = c[1], c10 = c[2], c11 = c[3], r = 0;
#ifdef HYQ_DOT_STEP
  for (; r < HYQ_DOT_END; r += HYQ_DOT_STEP) {
    HYQ_DOT_LOAD(x0, a, r); HYQ_DOT_LOAD(x1, a1, r); HYQ_DOT_LOAD(y0, w, r); HYQ_DOT_LOAD(y1, w1, r);
    HYQ_DOT(c00, x0, y0); HYQ_DOT(c01, x0, y1); HYQ_DOT(c10, x1, y0); HYQ_DOT(c11, x1, y1);
  }
#endif
  for (; r < k; ++r) {
    c00 += a[r] * w[r]; c01 += a[r] * w1[r]; c10 += a1[r] * w[r]; c11 += a1[r] * w1[r];
  }
  c[0] = c00; c[1] = c01; c[2] = c10; c[3] = c11;
  return 0;
}

static inline int32_t hyq_dot_1x2(void *a_, void *w_, void *c_, int32_t k) {
  const int8_t *a = (const int8_t *)a_, *w = (const int8_t *)w_, *w1 = w + k;
  int32_t *c = (int32_t *)c_;
  int32_t c00 = c[0], c01 = c[1], r = 0;
#ifdef HYQ_DOT_STEP
  for (; r < HYQ_DOT_END; r += HYQ_DOT_STEP) {
    HYQ_DOT_LOAD(x0, a, r); HYQ_DOT_LOAD(y0, w, r); HYQ_DOT_LOAD(y1, w1, r);
    HYQ_DOT(c00, x0, y0); HYQ_DOT(c01, x0, y1);
  }
#endif
  for (; r < k; ++r) {
    c00 += a[r] * w[r]; c01 += a[r] * w1[r];
  }
  c[0] = c00; c[1] = c01;
  return 0;
}
"""
_TVM_INCLUDE = re.compile(r'^#include "tvm/.*"\n', re.MULTILINE)


@dataclass(frozen=True)
class KernelSource:
    """The kernels' C source and the workspace bytes each allocates at most (TVMBackendAllocWorkspace)."""

    source: str
    workspace: dict[str, int]


def _workspace(func: tirx.PrimFunc) -> int:
    """Bytes the lowered `func` takes from TVMBackendAllocWorkspace, summed (an upper bound of its peak), each
    allocation rounded up to 16 bytes as the shim does."""
    sizes: list[int] = []

    def visit(call):
        if call.op.name == "tirx.TVMBackendAllocWorkspace":
            size = call.args[2]
            if not isinstance(size, tirx.IntImm):
                raise HyqError(f"a kernel allocates a workspace of dynamic size {size}")
            sizes.append(-(-int(size.value) // 16) * 16)
        return call

    tvm_ffi.structural_map(func.body, [(tvm.ir.Call, visit)])
    return sum(sizes)


def _integer_sqrt(cast: tirx.Cast) -> tirx.PrimExpr:
    """int64(floor(sqrt(float64(x)))) -> hyq_isqrt(x) (the shim's integer square root: the same value, no float)."""
    floor = cast.value
    if (str(cast.ty) == "int64" and isinstance(floor, tvm.ir.Call) and floor.op.name == "tirx.floor"
            and isinstance(floor.args[0], tvm.ir.Call) and floor.args[0].op.name == "tirx.sqrt"
            and isinstance(floor.args[0].args[0], tirx.Cast) and str(floor.args[0].args[0].value.ty) == "int64"):
        return tirx.call_extern("int64", "hyq_isqrt", floor.args[0].args[0].value)
    return cast


def kernel_source(kernels: tvm.IRModule) -> KernelSource:
    """C for every PrimFunc of `kernels`, entry points named after them (`__tvm_ffi_<name>`)."""
    target = tvm.target.Target(TARGET)
    mod = tvm.IRModule({gv: tvm_ffi.structural_map(f, [(tirx.Cast, _integer_sqrt)]).with_attr("global_symbol", gv.name_hint)
                        for gv, f in kernels.functions_items()})
    mod = tirx.transform.BindTarget(target.with_host(target))(mod)
    pipeline, finalize_host, _ = tirx.get_default_tir_pipeline(target)
    with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
        mod = finalize_host()(pipeline(mod))
        mod = tirx.transform.SkipAssert()(mod)
        source = tvm.get_global_func("target.build.c")(mod, target).inspect_source()
    workspace = {gv.name_hint: _workspace(f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    source = _TVM_INCLUDE.sub("", source, count=0)
    return KernelSource(f'#include "{SHIM}"\n{DOT_C}' + source, {k: v for k, v in workspace.items() if v})


GEMMS = ("conv2d", "group_conv2d", "matmul", "depthwise")   # names of the reduction blocks that multiply-accumulate


def gemm_macs(func: tirx.PrimFunc) -> int:
    """Multiply-accumulates of the kernel's convolution and matmul blocks: the product of each block's iterator
    extents (outputs x the products each sums), or what a tiled GEMM's block says (gemm.MACS)."""
    sch = s_tir.Schedule(func)
    total = 0
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        if MACS in stmt.annotations:
            total += int(stmt.annotations[MACS])
        elif stmt.name_hint.startswith(GEMMS) and is_reduction(sch, block):
            total += math.prod(int(iv.dom.extent) for iv in stmt.iter_vars)
    return total
