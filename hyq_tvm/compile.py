"""Compile a quantized model into an integer TVM library and artifact folder (python -m hyq_tvm.compile)."""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import tvm
from tqdm import tqdm
from tvm import relax

from . import zoo
from .build import write_artifact
from .calibrate import calibrate
from .errors import HyqError, run_cli
from .fileio import sha256_file
from .quant.plan import QuantPlan, check_weights
from .onnx_qdq import OPSET, export_onnx, qdq_census
from .relax import integerize
from .relax.annotate import annotate
from .relax.census import constant_bytes, op_census
from .relax.importer import import_model, input_layers
from .relax.portable import compile_module
from .targets import load_target

EMITS = ("tvm", "onnx")


class _Stages:
    """Times named stages and shows them on one progress bar."""

    def __init__(self, total: int, progress: bool):
        self.bar = tqdm(total=total, disable=not progress)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_description(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.bar.update()


def _lower(plan: QuantPlan, weights: str | Path | None, stage: _Stages) -> tuple[tvm.IRModule, dict[str, Any]]:
    """The plan's model as an integer Relax module, and facts about it for metadata.json."""
    with stage("import"):
        mod, _ = import_model(plan, weights)
        inputs = input_layers(mod)
    with stage("annotate"):
        mod = annotate(mod, plan)
    with stage("integerize"):
        mod = integerize(mod)
    facts = {"input": _input_facts(mod, plan, inputs), "output": _tensor_facts(mod["main"].body),
             "op_census": op_census(mod), "weights_bytes": constant_bytes(mod)}
    return mod, facts


def _tensor_facts(expr: relax.Expr) -> dict[str, Any]:
    return {"shape": [int(d) for d in expr.ty.shape], "dtype": str(expr.ty.dtype)}


def _input_facts(mod: tvm.IRModule, plan: QuantPlan, layers: list[str]) -> dict[str, Any]:
    """Shape and dtype of the input and the quantizer the graph applies to it first."""
    facts = _tensor_facts(mod["main"].params[0])
    quantizer = plan.layers[layers[0]]["inputs"][0] if len(layers) == 1 else None
    if quantizer is not None:
        facts.update(quantized_by=layers[0], **{k: quantizer[k] for k in ("bits", "axis", "scale", "zero_point")})
    return facts


def compile_plan(plan: QuantPlan, target: str, out_dir: str | Path, weights: str | Path | None = None,
                 progress: bool = False, emit: tuple[str, ...] = ("tvm",)) -> Path:
    """Write the artifact folder `out_dir` with what `emit` asks for: "tvm", the integer graph built for
    `target`; "onnx", the QDQ ONNX model of the same plan. Returns `out_dir`."""
    unknown = sorted(set(emit) - set(EMITS))
    if unknown or not emit:
        raise HyqError(f"cannot emit {', '.join(unknown) or 'nothing'}: choose from {', '.join(EMITS)}")
    spec = load_target(target)
    fcompile = spec.fcompile()  # the cross compiler, checked before the long stages
    metadata: dict[str, Any] = {"model": plan.model["name"], "emit": list(emit),
                                "calibration": {k: plan.calibration.get(k) for k in ("method", "wbits", "abits", "mode")},
                                "versions": {"tvm": tvm.__version__, "torch": torch.__version__}}
    built: dict[str, Any] = {}
    stage = _Stages(("tvm" in emit) * (4 if spec.is_host else 5) + ("onnx" in emit), progress)
    with contextlib.closing(stage.bar), tempfile.TemporaryDirectory() as scratch:
        if "tvm" in emit:
            mod, facts = _lower(plan, weights, stage)
            tvm_target = spec.tvm_target()
            with stage("build"):
                built["executable"] = compile_module(mod, tvm_target)
            if not spec.is_host:  # the same integer graph for this machine: bench's bit-exact reference
                with stage("host twin"):
                    built["host_executable"] = compile_module(mod, load_target("host").tvm_target())
            metadata.update(target={**spec.summary(), "tvm": str(tvm_target)}, **facts)
        if "onnx" in emit:
            with stage("onnx"):
                built["onnx_model"] = export_onnx(plan, Path(scratch) / "model.onnx", weights)
            metadata["onnx"] = {"opset": OPSET, "op_census": qdq_census(built["onnx_model"])}
        metadata["seconds"] = stage.seconds
        return write_artifact(out_dir, plan, metadata, fcompile=fcompile, **built)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.compile", description=__doc__)
    p.add_argument("--model", default=None, help=f"one of: {', '.join(zoo.MODELS)} (default: the plan's, else"
                                                 f" {zoo.DEFAULT_MODEL})")
    p.add_argument("--plan", type=Path, default=None,
                   help="QuantPlan from hyq_tvm.calibrate (default: calibrate Q-HyViT W8A8 first)")
    p.add_argument("--weights", default=None, help="checkpoint; default: the embedded proxy")
    p.add_argument("--target", default="host", help="a target in targets/ (default: host)")
    p.add_argument("--emit", nargs="+", default=["tvm"], choices=EMITS,
                   help="tvm: the integer TVM library (default); onnx: the QDQ ONNX model of the same plan, for"
                        " onnxruntime (model.onnx); both: --emit tvm onnx")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="artifact folder to write (default: artifacts/MODEL-TARGET)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    load_target(args.target)
    if args.plan is not None:
        plan = QuantPlan.load(args.plan)
        if args.model is not None and args.model != plan.model["name"]:
            raise HyqError(f"the plan is for {plan.model['name']}, not {args.model}")
        weights = Path(args.weights) if args.weights else zoo.proxy_checkpoint(plan.model["name"])
        check_weights(plan, sha256_file(weights) if weights.is_file() else None)  # before the progress bar
    else:
        name = args.model or zoo.DEFAULT_MODEL
        zoo.model_spec(name)
        plan, _ = calibrate(name, args.weights, method="qhyvit", wbits=8, abits=8)
    out = args.output or Path("artifacts") / f"{plan.model['name']}-{args.target}"
    compile_plan(plan, args.target, out, args.weights, progress=True, emit=tuple(dict.fromkeys(args.emit)))
    print(f"{plan.model['name']} W{plan.calibration['wbits']}A{plan.calibration['abits']} for {args.target} -> {out}")


if __name__ == "__main__":
    run_cli(main)
