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

TARGET = {"kind": "c"}
SHIM = "hyq_shim.h"
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
    return KernelSource(f'#include "{SHIM}"\n' + source, {k: v for k, v in workspace.items() if v})


GEMMS = ("conv2d", "matmul", "depthwise")   # names of the reduction blocks that multiply-accumulate


def gemm_macs(func: tirx.PrimFunc) -> int:
    """Multiply-accumulates of the kernel's convolution and matmul blocks: the product of each block's iterator
    extents (outputs x the products each sums)."""
    sch = s_tir.Schedule(func)
    total = 0
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        if stmt.name_hint.startswith(GEMMS) and is_reduction(sch, block):
            total += math.prod(int(iv.dom.extent) for iv in stmt.iter_vars)
    return total
