"""The build stage: a QuantPlan compiled into an artifact folder (artifact.py): the library for a target,
its host twin, and / or the QDQ ONNX model of the same plan."""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import tvm
from tqdm import tqdm
from tvm import relax

from .artifact import compiler_fingerprint, write_artifact
from .errors import HyqError
from .onnx_qdq import OPSET, export_onnx, qdq_census
from .quant.plan import QuantPlan
from .relax.census import constant_bytes, op_census
from .relax.pipeline import Lowered, build, lower
from .relax.tuning import check_database, database_dir, has_database
from .resources import data_dir
from .targets import TargetSpec, load_target

EMITS = ("tvm", "onnx")
AUTO = "auto"   # schedules=AUTO: the tuning database of the plan and target in schedules/, when there is one


class _Stages:
    """Times named stages and shows them on one progress bar."""

    def __init__(self, total: int, progress: bool):
        self.bar = tqdm(total=total, disable=not progress)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_description(name)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.bar.leave = False  # closing erases the bar: the error message stands alone
            raise
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.bar.update()


def _tensor_facts(expr: relax.Expr) -> dict[str, Any]:
    return {"shape": [int(d) for d in expr.ty.shape], "dtype": str(expr.ty.dtype)}


def _graph_facts(lowered: Lowered, plan: QuantPlan) -> dict[str, Any]:
    """The input (and the quantizer the graph applies to it first), output, op census and constant bytes."""
    mod, layers = lowered.mod, lowered.input_layers
    facts = _tensor_facts(mod["main"].params[0])
    if len(layers) == 1:
        q = plan.layers[layers[0]].inputs[0]
        facts.update(quantized_by=layers[0], bits=q.bits, axis=q.axis, scale=list(q.scale), zero_point=list(q.zero_point))
    return {"input": facts, "output": _tensor_facts(mod["main"].body), "op_census": op_census(mod),
            "weights_bytes": constant_bytes(mod)}


def _schedules(plan: QuantPlan, target: str, schedules: str | Path | None) -> Path | None:
    """The tuning database folder to build with: `schedules` (HyqError if it holds none), or for AUTO
    schedules/TARGET/MODEL-SIZE-wBaB when it holds one, in the working directory (a user's own tuning) or else
    among the databases that ship with the package; else None."""
    if schedules != AUTO:
        return None if schedules is None else check_database(schedules)
    m, c = plan.model, plan.calibration
    key = (target, m["name"], m["img_size"], c["wbits"], c["abits"])
    return next((folder for folder in (database_dir(*key), database_dir(*key, root=data_dir("schedules")))
                 if has_database(folder)), None)


def check_target(target: str, schedules: str | Path | None = AUTO) -> TargetSpec:
    """The spec of `target` once what compile_plan needs besides the plan is found: the target's cross compiler
    and the tuning database folder `schedules` when one is named (not AUTO or None). Cheap: commands call it
    before a slow step such as calibration."""
    spec = load_target(target)
    spec.fcompile()
    if schedules not in (AUTO, None):
        check_database(schedules)
    return spec


def compile_plan(plan: QuantPlan, target: str, out_dir: str | Path, weights: str | Path | None = None,
                 progress: bool = False, emit: tuple[str, ...] = ("tvm",), schedules: str | Path | None = AUTO) -> Path:
    """Write the artifact folder `out_dir` with what `emit` asks for: "tvm", the integer graph built for
    `target` (and for this machine, the host twin, when `target` is another) with the tuning database folder
    `schedules` (AUTO: the plan's in schedules/ if any; None: default schedules only); "onnx", the QDQ ONNX
    model of the same plan. Returns `out_dir`."""
    unknown = sorted(set(emit) - set(EMITS))
    if unknown or not emit:
        raise HyqError(f"cannot emit {', '.join(unknown) or 'nothing'}: choose from {', '.join(EMITS)}")
    spec = check_target(target, schedules if "tvm" in emit else None)
    fcompile = spec.fcompile()
    database = _schedules(plan, target, schedules) if "tvm" in emit else None
    metadata: dict[str, Any] = {"model": plan.model["name"], "emit": list(emit),
                                "calibration": {k: plan.calibration.get(k) for k in ("method", "wbits", "abits", "mode")},
                                "versions": {"tvm": tvm.__version__, "torch": torch.__version__,
                                             "compiler": compiler_fingerprint()}}
    built: dict[str, Any] = {}
    stage = _Stages(("tvm" in emit) * (2 if spec.is_host else 3) + ("onnx" in emit), progress)
    with contextlib.closing(stage.bar), tempfile.TemporaryDirectory() as scratch:
        if "tvm" in emit:
            with stage("lower"):
                lowered = lower(plan, weights)
            tvm_target = spec.tvm_target()
            with stage("build"):
                built["executable"] = build(lowered.mod, tvm_target, database)
            if not spec.is_host:  # the same integer graph for this machine: bench's bit-exact reference
                with stage("host twin"):
                    built["host_executable"] = build(lowered.mod, load_target("host").tvm_target())
            metadata.update(target={**spec.summary(), "tvm": str(tvm_target)}, **_graph_facts(lowered, plan),
                            schedules=None if database is None else str(database))
        if "onnx" in emit:
            with stage("onnx"):
                built["onnx_model"] = export_onnx(plan, Path(scratch) / "model.onnx", weights)
            metadata["onnx"] = {"opset": OPSET, "op_census": qdq_census(built["onnx_model"])}
        metadata["seconds"] = stage.seconds
        return write_artifact(out_dir, plan, metadata, fcompile=fcompile, **built)
