"""What the integer lowering rules share: the Rule record, the state of one run (its kernels, its
IntegerLayer records) and the context a rule's rewrite works in."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, rewrite_call

from ...errors import HyqError
from ..importer import marked_layer


@dataclass(frozen=True)
class RealParams:
    """A layer's numbers as its QDQ graph (the plan, through annotate) states them, before any integer rounding:
    what the independent reference (reference.py) derives its own multipliers, tables and grids from."""

    scales: tuple[np.ndarray, ...]          # float64 dequantize scale of each integer input, () or per channel
                                            # (conv2d: per input channel; the others: along the layer's axis)
    weight_scale: np.ndarray | None = None  # float64, () or per output channel
    bias: np.ndarray | None = None          # float64 constant added to a conv2d / matmul (real units), () or (C,)
    function: str | None = None             # the op before the quantize: "relu" / "clip" after a conv2d /
                                            # matmul, the Relax op name of a lookup
    args: tuple[float, ...] = ()            # its real arguments: clip (min, max), leakyrelu (alpha,); norm (epsilon,)
    gamma: np.ndarray | None = None         # norm: float64 (C,)
    beta: np.ndarray | None = None          # norm: float64 (C,)
    chain: tuple = ()                       # affine: its steps from the input, in order: (Relax op name, float64
                                            # constant, whether the constant is the left operand)


@dataclass(frozen=True)
class IntegerLayer:
    """One rewritten op of `main`: what its rule's reference needs to recompute its result bit for bit, and
    (`real`) what the independent reference needs to derive it again from the plan's numbers.

    `inputs` and `result` are Relax vars of the integerized function. An op whose output is both
    requantized and used in float (a residual) has one record per result.
    """

    name: str                 # plan layer (from the marked var names), else the result var's name
    op: str                   # "conv2d", "matmul", "softmax", "norm", "lookup", "add", "subtract", "concat",
                              # "requantize" (q(dq(x)) onto another grid), "affine" (constant +, -, *, / chain),
                              # "pool" (average / mean / sum), "product" (of two activations) or "resize"
    rule: Rule = field(repr=False, compare=False)
    attrs: dict[str, Any]     # conv2d: strides, padding, dilation, groups; matmul of activations: b_axes;
                              # softmax, lookup: table; norm: params (NormParams), reduce_axes;
                              # add / concat: scales (one per input, along axis), dim (concat)
    inputs: tuple[relax.Var, ...]
    weight: np.ndarray | None
    zero_points: tuple[np.ndarray, ...]
    bias: np.ndarray | None   # exact bias in accumulator steps (Fractions: bias / acc_scale), () or (C,) along axis
    acc_scale: np.ndarray     # float64, () or (C,) along axis
    axis: int                 # non-negative channel axis of the result
    out_scale: np.ndarray | None
    out_zero_point: np.ndarray | None
    out_dtype: str
    result: relax.Var
    clamp: tuple[np.ndarray, np.ndarray] | None = None  # int64 (low, high) of a ReLU / clip after requantization
    real: RealParams | None = None  # the real numbers the integer constants above were derived from

    def reference(self, values: dict[relax.Var, np.ndarray]) -> np.ndarray:
        """The result recomputed by the rule's numpy reference from the integer inputs in `values`."""
        return self.rule.reference(self, values)


class Lowering:
    """The state of one integerize run: the module being built, its kernels and the layers of `main`."""

    def __init__(self, mod: tvm.IRModule):
        self.builder = relax.BlockBuilder(mod)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.layers: dict[relax.Var, IntegerLayer] = {}

    def kernel(self, key: tuple, make: Callable[[], tvm.tirx.PrimFunc]) -> tvm.ir.GlobalVar:
        """The module's PrimFunc for `key`, made by `make()` and added on first use as hyq_<key[0]><n>."""
        if key not in self.kernels:
            name = f"hyq_{key[0]}{sum(k[0] == key[0] for k in self.kernels)}"
            self.kernels[key] = self.builder.add_func(make().with_attr("global_symbol", name), name)
        return self.kernels[key]


def bound_var(func: relax.Function, value: relax.Expr) -> relax.Var | None:
    """The var `func` binds `value` to, if any."""
    return next((b.var for block in func.body.blocks for b in block.bindings if b.value.same_as(value)), None)


@dataclass(frozen=True)
class Context:
    """Where a rule rewrites: one function of the module, as the rules before it left it."""

    lowering: Lowering
    rule: Rule
    func_name: str
    func: relax.Function

    def where(self, call: relax.Call, first_dq: relax.Call | None = None) -> str:
        """'<op> <var> in @<function>' for the binding that computes `call`, as "layer NAME (...)" when
        `first_dq` is the marked input of plan layer NAME."""
        var = bound_var(self.func, call)
        at = f"{call.op.name} '{var.name if var is not None else '?'}' in @{self.func_name}"
        layer = self.layer(first_dq) if first_dq is not None else None
        return at if layer is None else f"layer {layer!r} ({at})"

    def layer(self, first_dq: relax.Call) -> str | None:
        """The plan layer whose marked input `first_dq` is, else None."""
        act = bound_var(self.func, first_dq)
        return marked_layer(act.name) if act is not None else None

    def kernel(self, key: tuple, make: Callable[[], tvm.tirx.PrimFunc]) -> tvm.ir.GlobalVar:
        return self.lowering.kernel(key, make)

    def record(self, root: relax.Call, first_dq: relax.Call, op: str, attrs: dict, inputs, weight, zero_points,
               **out) -> None:
        """Keep the IntegerLayer of a match rewritten in @main (keyed by its result var), named by the plan
        layer whose marked input `first_dq` is."""
        if self.func_name != "main":
            return
        result = bound_var(self.func, root)
        name = self.layer(first_dq)
        inputs = tuple(inputs)
        if result is None or not all(isinstance(v, relax.Var) for v in inputs):
            raise HyqError(f"{self.where(root)}: its inputs or result are not bound to vars")
        self.lowering.layers[result] = IntegerLayer(name or result.name, op, self.rule, attrs, inputs, weight,
                                                    zero_points, result=result, **out)


@dataclass(frozen=True)
class Rule:
    """One integer lowering: `rewrite(context, root, matches)` turns a match of `pattern` into integer
    arithmetic (or returns root to leave it in float); `reference(layer, values)` recomputes a layer it
    recorded, in numpy."""

    name: str
    pattern: DFPattern
    rewrite: Callable[[Context, relax.Call, dict], relax.Expr]
    reference: Callable[[IntegerLayer, dict[relax.Var, np.ndarray]], np.ndarray]

    def apply(self, lowering: Lowering, func_name: str, func: relax.Function) -> relax.Function:
        """`func` with every match rewritten; the first HyqError of a rewrite is raised (not the FFI's error)."""
        context = Context(lowering, self, func_name, func)
        errors: list[HyqError] = []

        def guarded(root, matches):
            try:
                return self.rewrite(context, root, matches)
            except HyqError as err:
                errors.append(err)
                return root

        out = rewrite_call(self.pattern, guarded, func)
        if errors:
            raise errors[0]
        return out
