"""The compiler's stages as TVM passes: a QuantPlan lowered to an integer Relax module, then built.

    lower(plan) = Sequential([ImportPlan, Annotate, Integerize])(empty module); in integer mode batch norms are
                  decomposed (before Annotate) and dequantizes sunk below layout ops (before Integerize)
    build(mod, target) = Sequential([PackWeights, fusion, default schedule, TVM's lowering, explicit FMAs])
    build(mod, target, schedules) = the same with the tuned kernels of a MetaSchedule database (tuning.py)
                                    scheduled from it between fusion and the default schedule

Every command, report and test goes from a plan to a library through these two functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax

from ..errors import HyqError
from ..quant.plan import QuantPlan
from .annotate import annotate
from .importer import import_model, input_layers
from .integer import IntegerLayer, integerize_pass
from .pack import pack_weights
from .schedule import build_pipeline
from .sink import sink_pass
from .tuning import apply_database, build_stages


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
    integer = plan.calibration.get("mode") == "integer"
    decompose = [relax.transform.DecomposeOpsForInference(), relax.transform.FoldConstant()] if integer else []
    passes = [import_pass(plan, weights, inputs), *decompose, annotate_pass(plan), *([sink_pass()] if integer else []),
              integerize_pass(layers)]
    mod = tvm.transform.Sequential(passes, name="hyq.Lower")(tvm.IRModule())
    return Lowered(mod, layers, inputs)


def build_passes(target: tvm.target.Target, schedules: str | Path | None = None) -> tvm.transform.Pass:
    """Constant int8 weights packed for the target's dot-product instructions, then the build pipeline of
    schedule.py (fused, scheduled, float islands with the same bits on every LLVM target); with `schedules`, a
    tuning database folder, the kernels it holds take their tuned schedule before the default one."""
    if schedules is None:
        return tvm.transform.Sequential([pack_weights(target), build_pipeline(target)], name="hyq.Build")
    fused, rest = build_stages(target)
    return tvm.transform.Sequential([*fused, apply_database(schedules, target), *rest], name="hyq.Build")


def build(mod: tvm.IRModule, target: tvm.target.Target, schedules: str | Path | None = None) -> tvm.runtime.Executable:
    """The Relax module compiled for `target` by the build passes (with the tuning database folder `schedules`)."""
    return tvm.compile(mod, target=target, relax_pipeline=build_passes(target, schedules))
