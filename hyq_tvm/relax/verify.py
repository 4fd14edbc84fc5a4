"""Check a compiled integer graph layer by layer against the independent reference, bit for bit.

`debug_module` adds `main_debug` to an integerized module: `main` that also returns the integer
input(s) and the result of every IntegerLayer (from integerize_layers). `check_layers` runs it once
and recomputes each layer's result with the independent reference (integer/reference.py: its own
multipliers, tables and norm grid, derived exactly from the layer's real numbers, not the rules'
constants) from the inputs TVM produced, so a mismatch stays in the layer that made it. Float islands
between layers are checked only through the integer inputs they feed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..errors import HyqError
from .integer import IntegerLayer
from .integer.reference import expected
from .pipeline import build

DEBUG = "main_debug"


@dataclass(frozen=True)
class LayerCheck:
    """How the compiled result of one integer layer compares with the reference."""

    name: str
    op: str
    output: str  # dtype of the layer's result: int8 requantized, float32 dequantized
    exact: bool
    mismatches: int
    max_abs_diff: float


def probes(layers: list[IntegerLayer]) -> list[relax.Var]:
    """Every layer's input and result vars, once each, in layer order."""
    return list(dict.fromkeys(v for layer in layers for v in (*layer.inputs, layer.result)))


def _debug_main(main: relax.Function, wanted: list[relax.Var]) -> relax.Function:
    """`main` (its own vars) returning (its output, *wanted), each dataflow var exported from its block."""
    exported: dict[relax.Var, relax.Var] = {}
    wanted_set = set(wanted)
    bb = relax.BlockBuilder()
    with bb.function(DEBUG, list(main.params)):
        for block in main.body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                for binding in block.bindings:
                    bb.emit_normalized(binding)
                continue
            with bb.dataflow():
                for binding in block.bindings:
                    bb.emit_normalized(binding)
                for binding in block.bindings:
                    if binding.var in wanted_set:
                        exported[binding.var] = bb.emit_output(binding.var, name_hint=f"{binding.var.name}_probe")
        lost = [v.name for v in wanted if isinstance(v, relax.DataflowVar) and v not in exported]
        if lost:
            raise HyqError(f"@main does not bind the integer layer var(s) {', '.join(lost)}")
        bb.emit_func_output(relax.Tuple([main.body.body, *(exported.get(v, v) for v in wanted)]))
    return bb.get()[DEBUG]


def debug_module(mod: tvm.IRModule, layers: list[IntegerLayer]) -> tvm.IRModule:
    """`mod` with `main` (on fresh vars) and DEBUG, which also returns every layer's inputs and result."""
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out["main"] = relax.utils.copy_with_new_vars(mod["main"])
    out[DEBUG] = _debug_main(mod["main"], probes(layers))
    return out


def compare(layer: IntegerLayer, got: np.ndarray, want: np.ndarray) -> LayerCheck:
    """The LayerCheck of TVM's result `got` against the reference `want`."""
    if got.shape != want.shape or got.dtype != want.dtype:
        raise HyqError(f"layer {layer.name!r}: TVM gives {got.dtype}{list(got.shape)},"
                       f" the reference {want.dtype}{list(want.shape)}")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    mismatches = int(np.count_nonzero(got != want))
    return LayerCheck(layer.name, layer.op, layer.out_dtype, bool(np.array_equal(got, want)), mismatches,
                      float(diff.max()) if diff.size else 0.0)


def run_debug(vm: relax.VirtualMachine, layers: list[IntegerLayer], x: np.ndarray
              ) -> tuple[np.ndarray, dict[relax.Var, np.ndarray]]:
    """DEBUG's output and the value of every probe var for the input `x`."""
    output, *values = (t.numpy() for t in vm[DEBUG](tvm.runtime.tensor(x)))
    return output, dict(zip(probes(layers), values))


def check_values(layers: list[IntegerLayer], values: dict[relax.Var, np.ndarray]) -> list[LayerCheck]:
    """Every layer's result in `values` checked against the reference computed from its inputs there."""
    return [compare(layer, values[layer.result], expected(layer, values)) for layer in layers]


def check_layers(vm: relax.VirtualMachine, layers: list[IntegerLayer], x: np.ndarray) -> list[LayerCheck]:
    """Run DEBUG on `x` and check every integer layer of the compiled graph against the reference."""
    return check_values(layers, run_debug(vm, layers, x)[1])


def first_mismatch(checks: list[LayerCheck]) -> LayerCheck | None:
    """The first layer (in graph order) that is not bit-exact, if any."""
    return next((c for c in checks if not c.exact), None)


def assert_bitexact(checks: list[LayerCheck]) -> None:
    """A HyqError naming the first layer that is not bit-exact."""
    bad = first_mismatch(checks)
    if bad is not None:
        raise HyqError(f"integer layer {bad.name!r} ({bad.op}->{bad.output}) is not bit-exact:"
                       f" {bad.mismatches} value(s) differ, by up to {bad.max_abs_diff:g}")


def debug_vm(mod: tvm.IRModule, layers: list[IntegerLayer], target: tvm.target.Target) -> relax.VirtualMachine:
    """debug_module(mod, layers) built for `target` (a CPU) and loaded."""
    return relax.VirtualMachine(build(debug_module(mod, layers), target), tvm.cpu())


def verify(mod: tvm.IRModule, layers: list[IntegerLayer], x: np.ndarray,
           target: tvm.target.Target) -> list[LayerCheck]:
    """Build debug_module(mod, layers) for `target`, run it on `x` (CPU) and check every layer."""
    return check_layers(debug_vm(mod, layers, target), layers, x)
