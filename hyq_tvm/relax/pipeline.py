"""The compiler's stages as TVM passes: a QuantPlan lowered to an integer Relax module, then built.

    lower(plan) = Sequential([ImportPlan, Annotate, Integerize])(empty module)
    build(mod, target) = the build passes of portable.py (the same float bits on every LLVM target)

Every command, report and test goes from a plan to a library through these two functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tvm

from ..errors import HyqError
from ..quant.plan import QuantPlan
from .annotate import annotate
from .importer import import_model, input_layers
from .integer import IntegerLayer, integerize_pass
from .portable import compile_module


@dataclass(frozen=True)
class Lowered:
    """An integer Relax module, its integer layers (for the bit-exact check) and the plan layers that
    quantize its input."""

    mod: tvm.IRModule
    layers: list[IntegerLayer]
    input_layers: list[str]


def import_pass(plan: QuantPlan, weights: str | Path | None = None,
                inputs: list[str] | None = None) -> tvm.transform.Pass:
    """Pass that replaces an empty module by the plan's model in Relax, every plan layer marked once;
    appends the plan layers that quantize the model input to `inputs`."""
    def transform(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if len(mod.functions_items()):
            raise HyqError("ImportPlan starts from an empty module")
        imported = import_model(plan, weights)
        if inputs is not None:
            inputs.extend(input_layers(imported))
        return imported
    return tvm.transform.module_pass(transform, opt_level=0, name="hyq.ImportPlan")


def annotate_pass(plan: QuantPlan) -> tvm.transform.Pass:
    """Pass that replaces every plan mark by the plan's quantize / dequantize."""
    return tvm.transform.module_pass(lambda mod, _ctx: annotate(mod, plan), opt_level=0, name="hyq.Annotate")


def lower(plan: QuantPlan, weights: str | Path | None = None) -> Lowered:
    """The plan's model as an integer Relax module (weights: the checkpoint; default the embedded proxy)."""
    inputs: list[str] = []
    layers: list[IntegerLayer] = []
    passes = [import_pass(plan, weights, inputs), annotate_pass(plan), integerize_pass(layers)]
    mod = tvm.transform.Sequential(passes, name="hyq.Lower")(tvm.IRModule())
    return Lowered(mod, layers, inputs)


def build(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Executable:
    """The Relax module compiled for `target` by the build passes."""
    return compile_module(mod, target)
