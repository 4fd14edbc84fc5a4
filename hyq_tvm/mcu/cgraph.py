"""The integer graph of an integer-mode plan as a static list of kernel calls: int8 in, int8 out.

    strip_ends(mod)    main(x: float32) = dequantize(g(quantize(x)))  ->  main(q: int8) = g(q), and the two grids
    static_graph(mod)  the stripped module, its GEMMs tiled (gemm.py), its 4-bit weights packed (int4.py),
                       legalized, fused and scheduled for a microcontroller, read into Values (constants, the
                       input, the output, intermediates) and Steps (one kernel call each), its constants
                       narrowed (narrow.py)
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from ..errors import HyqError
from ..relax import portable
from .gemm import gemm_kernels
from .graph import Grid, StaticGraph, Step, Value
from .int4 import pack_weights_int4
from .narrow import narrow_constants
from .schedule import schedule_pass


def _grid(call: relax.Call) -> Grid:
    scale, zero = (np.atleast_1d(a.value.numpy()) for a in call.args[1:3])
    return Grid(tuple(float(s) for s in scale), tuple(int(z) for z in zero), int(call.attrs.axis))


def _const_call(expr: relax.Expr, op: str) -> bool:
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == op
            and all(isinstance(a, Constant) for a in expr.args[1:]))


def strip_ends(mod: tvm.IRModule) -> tuple[tvm.IRModule, Grid, Grid]:
    """main taking the quantized input and giving the quantized output: the float input's quantize and the
    output's dequantize removed; their grids. HyqError where main does not start and end so (a plan not in
    integer mode)."""
    func = mod["main"]
    (x,) = func.params
    blocks = list(func.body.blocks)
    if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
        raise HyqError("the integer graph's main is not one dataflow block")
    bindings = list(blocks[0].bindings)
    first, last = bindings[0], bindings[-1]
    if not (_const_call(first.value, "relax.quantize") and first.value.args[0].same_as(x)
            and _const_call(last.value, "relax.dequantize") and func.body.body.same_as(last.var)):
        raise HyqError("the graph does not start with the input's quantize and end with the output's dequantize: "
                       "a microcontroller build needs a plan calibrated with --mode integer")
    q = relax.Var("input", relax.TensorType(first.var.ty.shape, "int8"))
    y = last.value.args[0]
    out = relax.Var("output", y.ty)
    body = [relax.VarBinding(first.var, q), *bindings[1:-1], relax.VarBinding(out, y)]
    stripped = relax.Function([q], relax.SeqExpr([relax.DataflowBlock(body)], out), y.ty,
                              attrs=func.attrs)
    mod = tvm.IRModule({gv: stripped if gv.name_hint == "main" else f for gv, f in mod.functions_items()})
    mod = relax.transform.CanonicalizeBindings()(mod)
    return mod, _grid(first.value), _grid(last.value)


def lowering_passes() -> tvm.transform.Pass:
    """Constants folded, 4-bit weights packed, legalized, fused (as for the Linux boards, but constants no longer
    folded: that would unpack the weights again), then scheduled for a microcontroller; reshapes as views."""
    gemms = tvm.transform.module_pass(lambda mod, _ctx: gemm_kernels(mod), opt_level=0, name="hyq.McuGemm")
    pack = tvm.transform.module_pass(lambda mod, _ctx: pack_weights_int4(mod), opt_level=0, name="hyq.PackInt4")
    return tvm.transform.Sequential([relax.transform.FoldConstant(), gemms, pack, relax.transform.LegalizeOps(portable.LEGALIZE),
                                     relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
                                     relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(),
                                     schedule_pass(), relax.transform.RewriteDataflowReshape()], name="hyq.McuLower")


def _tensor(name: str, ty) -> Value:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise HyqError(f"{name}: a microcontroller build needs tensors of static shape, not {ty}")
    return Value(name, tuple(int(d) for d in ty.shape), str(ty.dtype))


class _Reader:
    """Values and steps of main, in binding order."""

    def __init__(self):
        self.values: dict[str, Value] = {}
        self.steps: list[Step] = []
        self.views: dict[str, str] = {}
        self.names: dict[relax.Var, str] = {}   # a var bound to one tensor -> its value
        self.tuples: dict[relax.Var, list[str]] = {}
        self.constants: dict[int, str] = {}

    def add(self, value: Value) -> str:
        self.values[value.name] = value
        return value.name

    def arg(self, expr: relax.Expr) -> str:
        if isinstance(expr, Constant):
            key = expr.__hash__()
            if key not in self.constants:
                data = expr.value.numpy()
                self.constants[key] = self.add(Value(f"c{len(self.constants)}", tuple(data.shape), str(data.dtype),
                                                     np.ascontiguousarray(data)))
            return self.constants[key]
        if isinstance(expr, relax.Var) and expr in self.names:
            return self.names[expr]
        raise HyqError(f"a microcontroller build cannot pass {type(expr).__name__} {expr} to a kernel")

    def bind(self, var: relax.Var, value: relax.Expr) -> None:
        if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            gv, args = value.args[0], [self.arg(a) for a in value.args[1].fields]
            ty = value.ty
            fields = ty.fields if isinstance(ty, relax.TupleType) else [ty]
            step = f"s{len(self.steps)}"
            outs = [self.add(_tensor(f"{step}_{i}" if len(fields) > 1 else step, f)) for i, f in enumerate(fields)]
            self.steps.append(Step(gv.name_hint, (*args, *outs), len(outs)))
            if isinstance(ty, relax.TupleType):
                self.tuples[var] = outs
            else:
                self.names[var] = outs[0]
        elif isinstance(value, relax.TupleGetItem) and value.tuple_value in self.tuples:
            self.names[var] = self.tuples[value.tuple_value][value.index]
        elif isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.reshape")):
            base = self.arg(value.args[0])
            view = self.add(_tensor(f"v{len(self.views)}", value.ty))
            self.names[var] = view
            self.views[view] = self.views.get(base, base)
        elif isinstance(value, relax.Var):
            self.names[var] = self.arg(value)
        else:
            raise HyqError(f"a microcontroller build cannot run {value} (only kernel calls and reshapes)")


def static_graph(mod: tvm.IRModule) -> StaticGraph:
    """The integer graph `mod` (lowered in integer mode) as kernel calls on int8 input and output."""
    mod, input_grid, output_grid = strip_ends(mod)
    mod = lowering_passes()(mod)
    func = mod["main"]
    reader = _Reader()
    (param,) = func.params
    reader.names[param] = reader.add(_tensor("input", param.ty))
    for block in func.body.blocks:
        for binding in block.bindings:
            reader.bind(binding.var, binding.value)
    output = reader.arg(func.body.body)
    if output in reader.views or output == "input" or reader.values[output].data is not None:
        raise HyqError("the graph's output is not computed by a kernel")
    called = {step.kernel for step in reader.steps}
    kernels = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint in called})
    return narrow_constants(StaticGraph(kernels, reader.values, reader.steps, "input", output, reader.views, input_grid, output_grid))
