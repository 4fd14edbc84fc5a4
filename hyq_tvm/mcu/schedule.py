"""A schedule for one core without vectors: elementwise blocks inlined, and the blocks that consume a
reduction computed right after each of its outputs, so that accumulators need no buffer of their own."""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import dlight

from ..relax.schedule import KEEP, inline, is_reduction, points, trivial_loops
from .gemm import GEMM, schedule_gemm

UNROLL_MAX = 7   # reduction loops up to this long (kernel windows) are unrolled
UNROLL_BY = 4    # longer innermost reduction loops are unrolled by this factor


def _selects(block: tirx.SBlock) -> bool:
    """Whether the block's update takes a max or a min."""
    found = [False]
    tvm_ffi.structural_map(block.body, [((tirx.Max, tirx.Min), lambda e: found.__setitem__(0, True) or e)])
    return found[0]


def _schedule_reduction(sch: s_tir.Schedule, block) -> None:
    """The reduction `block` initialized before its reduction loops (not tested inside them); in a sum, its short
    reduction loops (a kernel window's rows and columns) unrolled and a long innermost one unrolled by UNROLL_BY;
    its spatial consumers computed inside its innermost spatial loop (in a chain: the consumers of those too)."""
    loops = trivial_loops(sch, block)
    if loops is None:
        return
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == tirx.IterVar.DataPar]
    if not spatial or kinds[:len(spatial)] != [tirx.IterVar.DataPar] * len(spatial):
        return
    reduce = loops[len(spatial):]
    if reduce:
        selects = _selects(sch.get(block))
        sch.decompose_reduction(block, reduce[0])
        if selects:   # TVM's C code generator reuses a max / min operand loaded before the unrolled copies' stores
            reduce = []
        for loop in reduce[1:]:
            if int(sch.get(loop).extent) <= UNROLL_MAX:
                sch.unroll(loop)
        extent = int(sch.get(reduce[-1]).extent) if reduce else 0
        if extent > UNROLL_MAX and extent % UNROLL_BY == 0:   # a long sum: UNROLL_BY products per iteration
            sch.unroll(sch.split(reduce[-1], [None, UNROLL_BY])[1])
    todo = list(sch.get_consumers(block))
    while todo:
        consumer = todo.pop(0)
        if is_reduction(sch, consumer) or KEEP in sch.get(consumer).annotations:
            continue
        try:
            sch.reverse_compute_at(consumer, spatial[-1])
        except s_tir.schedule.ScheduleError:
            continue
        todo.extend(sch.get_consumers(consumer))


def _keep_row_values(sch: s_tir.Schedule) -> None:
    """Mark KEEP (not inlined) the spatial blocks that a spatial consumer reads at fewer points than it computes
    (a per-row mean or divisor read by every element of the row): computed once per row, not once per element."""
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for block in sch.get_child_blocks(root):
        if sch.get(block).name_hint in outputs or is_reduction(sch, block):
            continue
        own = points(sch, block)
        if any(not is_reduction(sch, c) and points(sch, c) > own for c in sch.get_consumers(block)):
            sch.annotate(block, KEEP, "row")


def mcu_schedule(func: tirx.PrimFunc, _target: tvm.target.Target, _tunable: bool = False) -> s_tir.Schedule:
    """The schedule of `func` for a microcontroller core."""
    sch = s_tir.Schedule(func)
    _keep_row_values(sch)
    inline(sch)
    root = sch.get_sblock("root")
    for name in [sch.get(b).name_hint for b in sch.get_child_blocks(root)]:
        block = sch.get_sblock(name)
        if GEMM in sch.get(block).annotations:
            schedule_gemm(sch, block)
        elif is_reduction(sch, block):
            _schedule_reduction(sch, block)
    return sch


MCU_RULE = dlight.ScheduleRule.from_callable("HyqMcu")(mcu_schedule)


def schedule_pass() -> tvm.transform.Pass:
    """Apply `mcu_schedule` to every PrimFunc not marked tirx.is_scheduled."""
    @tvm.transform.module_pass(opt_level=0, name="HyqMcuSchedule")
    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with tvm.target.Target({"kind": "c"}):
            return dlight.ApplyDefaultSchedule(MCU_RULE)(mod)
    return apply
