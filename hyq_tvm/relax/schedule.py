"""The fast CPU build: portable legalizations, operator fusion and a default schedule for every PrimFunc.

TVM 0.27's default pipeline lowers every operator to its own plain loop nest. `build_pipeline` fuses them
(FuseOps / FuseTIR) and schedules each fused PrimFunc that nothing else scheduled (`default_schedule`):
elementwise producers inlined, the outer loops parallel, the innermost spatial loop vectorized by the
target's vector width. Reductions keep their own loop order: only spatial loops move inside them, so each
output is still summed in the same order and float results do not depend on the target's vector width.
`portable.fuse_multiply_add` stays the last step.
"""
from __future__ import annotations

import math
from typing import Callable

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight
from tvm.target.codegen import llvm_get_vector_width

from . import portable

_SBLOCK_REALIZE = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")
PARALLEL_MIN = 1 << 14   # multiply-adds or elements below which a loop nest stays on one thread
ROW_TILE = 4             # output rows computed together in a reduction (register tile)
UNROLL_GATHER = 32       # rows of a gather (an interpolation) at most this wide are unrolled
COSTLY_FLOAT_OPS = 16    # float operations per element above which a block counts as a math function
# schedules of blocks marked by an annotation (key): f(sch, block) -> (the loop its consumers may be computed at,
# how a consumer is computed there (None: it may not), what completes the schedule once they are placed); blocks
# marked KEEP are scheduled by them
ANNOTATED: dict[str, Callable] = {}
KEEP = "hyq.staged"


def int32_lanes(target: tvm.target.Target) -> int:
    """32-bit lanes in a vector register of the target."""
    return max(llvm_get_vector_width(target), 128) // 32


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _factor(extent: int, most: int) -> int:
    """The largest power of two that divides `extent` and is at most `most`."""
    return math.gcd(extent, 1 << (most.bit_length() - 1))


def is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


_PADDING = "prim.if_then_else"
_CHEAP = {_PADDING, "tirx.likely", "tirx.round", "tirx.nearbyint", "tirx.floor", "tirx.ceil", "tirx.trunc",
          "tirx.fabs"}


def _calls(block: tirx.SBlock) -> set[str]:
    """The ops the block calls (tirx.exp, tirx.if_then_else, ...)."""
    found = set()
    tvm_ffi.structural_map(block.body, [(tvm.ir.Call, lambda call: found.add(call.op.name) or call)])
    return found


def _float_ops(block: tirx.SBlock) -> int:
    """How many float multiplies, divides, adds and subtracts the block's body holds."""
    count = [0]

    def seen(expr):
        count[0] += "float" in str(expr.ty)
        return expr
    tvm_ffi.structural_map(block.body, [((tirx.Mul, tirx.Div, tirx.Add, tirx.Sub), seen)])
    return count[0]


def _costly(block: tirx.SBlock) -> bool:
    """Whether the block computes a math function (exp, erf, sigmoid, ... as a call or as a polynomial): not
    worth computing twice, nor lane by lane."""
    return bool(_calls(block) - _CHEAP) or _float_ops(block) > COSTLY_FLOAT_OPS


def _divides(block: tirx.SBlock) -> bool:
    """Whether the block divides by a value it reads or computes (not by a constant)."""
    found = [False]

    def seen(div):
        found[0] = found[0] or not isinstance(div.b, tirx.IntImm)
        return div
    tvm_ffi.structural_map(block.body, [((tirx.Div, tirx.FloorDiv, tirx.FloorMod, tirx.Mod), seen)])
    return found[0]


def _gathers(block: tirx.SBlock) -> bool:
    """Whether the block reads at indices computed in floats (an interpolation's int64 cast of a float):
    lane by lane in any vector."""
    found = [False]

    def seen(cast):
        found[0] = found[0] or (str(cast.ty) == "int64" and "float" in str(cast.value.ty))
        return cast
    tvm_ffi.structural_map(block.body, [(tirx.Cast, seen)])
    return found[0]


def _feeds_costly(sch: s_tir.Schedule, block) -> bool:
    """Whether a math function consumes the block's output, directly or through other blocks."""
    todo = list(sch.get_consumers(block))
    while todo:
        consumer = todo.pop()
        if _costly(sch.get(consumer)):
            return True
        todo.extend(sch.get_consumers(consumer))
    return False


def points(sch: s_tir.Schedule, block) -> int:
    """How many times the block's body runs: the product of its iterators' extents."""
    return math.prod(int(iv.dom.extent) for iv in sch.get(block).iter_vars)


def _per_row(sch: s_tir.Schedule, block) -> bool:
    """Whether the spatial block computes a math function or a division that a consumer reads at fewer points than
    it computes (a per-row value, computed once per element if inlined)."""
    stmt = sch.get(block)
    return (not is_reduction(sch, block) and (_costly(stmt) or _divides(stmt))
            and any(points(sch, c) > points(sch, block) for c in sch.get_consumers(block)))


def inline(sch: s_tir.Schedule) -> None:
    """Inline spatial blocks into their consumers (or consumers into them), except math functions into
    several consumers (computed twice) or into padding (computed lane by lane), math functions and divisions
    into a consumer that reads them at fewer points than it computes (a per-row value computed per element),
    and gathers into math functions (which would be computed lane by lane with them)."""
    root = sch.get_sblock("root")
    changed = True
    while changed:
        changed = False
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
        for block in sch.get_child_blocks(root):
            stmt = sch.get(block)
            if stmt.name_hint in outputs or is_reduction(sch, block) or KEEP in stmt.annotations:
                continue
            consumers = sch.get_consumers(block)
            if _costly(stmt) and (len(consumers) > 1 or any(_PADDING in _calls(sch.get(c)) for c in consumers)):
                continue
            if _per_row(sch, block):
                continue
            if _gathers(stmt) and _feeds_costly(sch, block):
                continue
            try:
                sch.compute_inline(block)
            except s_tir.schedule.ScheduleError:
                continue
            changed = True
            break
    for block in reversed(sch.get_child_blocks(root)[1:]):
        stmt = sch.get(block)
        if KEEP in stmt.annotations or is_reduction(sch, block):
            continue
        producers = [sch.get(p) for p in sch.get_producers(block)]
        padded = _PADDING in _calls(stmt)
        if (padded and any(_costly(p) for p in producers)) or (
                not padded and _costly(stmt) and any(_gathers(p) for p in producers)):
            continue   # a math function computed in padding, or next to a gather: lane by lane
        if any(_per_row(sch, p) for p in sch.get_producers(block)):
            continue   # TVM 0.27 fails reverse-inlining into a producer computed at fewer points (a batch norm's sqrt)
        try:
            sch.reverse_compute_inline(block)
        except s_tir.schedule.ScheduleError:
            pass


def trivial_loops(sch: s_tir.Schedule, block) -> list | None:
    """The block's loops, one per block iterator in the same order, or None when bound otherwise."""
    loops = sch.get_loops(block)
    values = _SBLOCK_REALIZE(sch, block).iter_values
    if len(loops) != len(values) or any(not v.same_as(sch.get(l).loop_var) for l, v in zip(loops, values)):
        return None
    return loops


def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int, within: int = 0) -> list:
    """Vectorize the block's innermost loop (split by the largest power of two dividing it) unless it is one of
    the `within` outermost; the outer loops."""
    loops = sch.get_loops(block)[within:]
    if not loops:
        return []
    if trivial_loops(sch, block) is not None:   # rows the vector does not divide: vectorize several at once
        while len(loops) > 1 and _factor(_extent(sch, loops[-1]), lanes) < lanes:
            loops = [*loops[:-2], sch.fuse(loops[-2], loops[-1])]
    vec = _factor(_extent(sch, loops[-1]), lanes)
    if vec < 2:
        return loops
    outer, inner = sch.split(loops[-1], [None, vec])
    sch.vectorize(inner)
    return [*loops[:-1], outer]


def _parallel(sch: s_tir.Schedule, loops: list, work: int):
    """Fuse `loops` into one, parallel when `work` is worth a thread pool; the fused loop."""
    loop = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if work >= PARALLEL_MIN and _extent(sch, loop) > 1:
        sch.parallel(loop)
    return loop


def _schedule_spatial(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    work = math.prod(_extent(sch, l) for l in loops)
    if _gathers(sch.get(block)) or (_PADDING in _calls(sch.get(block))
                                     and _factor(_extent(sch, loops[-1]), lanes) < lanes):
        # a gather, or a padded row whose width the vector does not divide: LLVM does far better with the plain
        # row loop (loads hoisted, bounds checks vectorized) than with lanes split out of it
        outer = loops[:-1]
        if _gathers(sch.get(block)) and _extent(sch, loops[-1]) <= UNROLL_GATHER:
            sch.unroll(loops[-1])   # each column's indices and weights constants
    else:
        outer = _vectorize_inner(sch, block, lanes)
    if outer:
        _parallel(sch, outer, work)


def _schedule_reduction(sch: s_tir.Schedule, block, lanes: int):
    """Tile a reduction's spatial loops around its unchanged reduction loops; the outer loop, or None."""
    loops = trivial_loops(sch, block)
    if loops is None:
        return None
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = [l for l, k in zip(loops, kinds) if k == tirx.IterVar.DataPar]
    reduce = [l for l, k in zip(loops, kinds) if k == tirx.IterVar.CommReduce]
    if not spatial or len(spatial) + len(reduce) != len(loops):
        return None
    work = math.prod(_extent(sch, l) for l in loops)
    col = spatial[-1]
    col_o, col_i = sch.split(col, [None, _factor(_extent(sch, col), lanes)])
    outer, inner = spatial[:-1], [col_i]
    if outer:
        row_o, row_i = sch.split(outer[-1], [None, _factor(_extent(sch, outer[-1]), ROW_TILE)])
        outer, inner = [*outer[:-1], row_o], [row_i, col_i]
    sch.reorder(*outer, col_o, *reduce, *inner)
    fused = _parallel(sch, [*outer, col_o], work)
    if len(inner) == 2:
        sch.unroll(inner[0])
    if _extent(sch, col_i) > 1:
        sch.vectorize(col_i)
    sch.decompose_reduction(block, reduce[0])
    return fused


def _uses(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    found = [False]
    tvm_ffi.structural_map(expr, [(tirx.Var, lambda v: found.__setitem__(0, found[0] or v.same_as(var)) or v)])
    return found[0]


def _follow_reduction(sch: s_tir.Schedule, block, anchor, lanes: int) -> bool:
    """Compute a reduction inside the tile loop `anchor` of the reduction before it (a softmax's sum in the tile of
    its max: the rows stay in cache), its reduction loops unchanged and outside the vectorized spatial loop, so
    that each output is still summed in the same order; whether it could (not where a tile holds only part of
    what one output sums)."""
    tile_loop = sch.get(anchor)
    if not any(any(sch.get(l).same_as(tile_loop) for l in sch.get_loops(p)) for p in sch.get_producers(block)):
        return False   # it reads nothing the tile computes
    trial = sch.copy()
    try:
        trial.reverse_compute_at(block, anchor)
    except s_tir.schedule.ScheduleError:
        return False
    tile = trial.get(anchor).loop_var
    for iv, value in zip(trial.get(block).iter_vars, _SBLOCK_REALIZE(trial, block).iter_values):
        if iv.iter_type == tirx.IterVar.CommReduce and _uses(value, tile):
            return False
    sch.reverse_compute_at(block, anchor)
    loops = sch.get_loops(block)
    inner = loops[next(i for i, l in enumerate(loops) if sch.get(l).same_as(sch.get(anchor))) + 1:]
    reduced = set()   # loop variables bound to the block's reduction iterators
    for iv, value in zip(sch.get(block).iter_vars, _SBLOCK_REALIZE(sch, block).iter_values):
        if iv.iter_type == tirx.IterVar.CommReduce:
            tvm_ffi.structural_map(value, [(tirx.Var, lambda v: reduced.add(v.name) or v)])
    reduce = [l for l in inner if sch.get(l).loop_var.name in reduced]
    spatial = [l for l in inner if sch.get(l).loop_var.name not in reduced]
    if not reduce or inner != [*spatial, *reduce]:
        return True
    if spatial:
        sch.reorder(*spatial[:-1], *reduce, spatial[-1])
        vec = _factor(_extent(sch, spatial[-1]), lanes)
        if vec > 1:
            sch.vectorize(sch.split(spatial[-1], [None, vec])[1])
    sch.decompose_reduction(block, reduce[0])
    return True


def place_in_tile(sch: s_tir.Schedule, anchor, lanes: int) -> Callable:
    """How a spatial consumer is computed inside the tile loop `anchor`: its own loops there, the innermost
    vectorized."""
    def place(block) -> None:
        sch.reverse_compute_at(block, anchor)
        _vectorize_inner(sch, block, lanes, within=1)
    return place


def default_schedule(func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool = False) -> s_tir.Schedule | None:
    """A schedule of `func` for the CPU `target`: inlined, parallel, vectorized; None if not a CPU target."""
    if target.kind.name != "llvm":
        return None
    lanes = int32_lanes(target)
    sch = s_tir.Schedule(func)
    inline(sch)
    root = sch.get_sblock("root")
    anchor = None   # the outermost loop of the last reduction (all its outer loops fused): where its consumers go
    place = None    # how a consumer is computed at the anchor
    finishes = []   # what annotated blocks' schedules do once their consumers are placed
    for name in [sch.get(b).name_hint for b in sch.get_child_blocks(root)]:
        block = sch.get_sblock(name)
        annotations = sch.get(block).annotations
        if KEEP in annotations:
            continue
        rule = next((ANNOTATED[key] for key in annotations if key in ANNOTATED), None)
        if rule is not None:
            anchor, place, finish = rule(sch, block)
            anchor = anchor if place else None
            finishes.append(finish)
            continue
        if is_reduction(sch, block):
            if anchor is None or not _follow_reduction(sch, block, anchor, lanes):
                anchor = _schedule_reduction(sch, block, lanes)
                place = place_in_tile(sch, anchor, lanes)
            continue
        if anchor is not None and _PADDING in _calls(sch.get(block)):
            anchor = None   # a padded output is written by its own loops
        if anchor is not None:
            try:
                place(block)
                continue
            except s_tir.schedule.ScheduleError:
                pass
        _schedule_spatial(sch, block, lanes)
    for finish in finishes:
        finish()
    return sch


DEFAULT_RULE = dlight.ScheduleRule.from_callable("HyqDefaultCPU")(default_schedule)


def schedule_pass(target: tvm.target.Target) -> tvm.transform.Pass:
    """Apply `default_schedule` to every PrimFunc not marked tirx.is_scheduled."""
    @tvm.transform.module_pass(opt_level=0, name="HyqDefaultSchedule")
    def apply(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        with target:
            return dlight.ApplyDefaultSchedule(DEFAULT_RULE)(mod)
    return apply


def fusion() -> tvm.transform.Pass:
    """Relax operator fusion as in relax's zero / static_shape_tuning pipelines."""
    return tvm.transform.Sequential([relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                                     relax.transform.FuseOps(), relax.transform.FuseTIR(),
                                     relax.transform.DeadCodeElimination()])


def build_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """Portable legalizations, fusion, a default schedule for `target`, TVM's default lowering, and the
    explicit fused multiply-adds last."""
    return tvm.transform.Sequential([relax.transform.LegalizeOps(portable.LEGALIZE), fusion(),
                                     schedule_pass(target), relax.get_pipeline("default"),
                                     portable.fuse_multiply_add])
