"""Compile a quantized model into an integer TVM library and artifact folder (python -m hyq_tvm.compile)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import zoo
from ..build import EMITS, compile_plan
from ..errors import HyqError
from ..fileio import sha256_file
from ..quant.calibrate import calibrate
from ..quant.plan import QuantPlan, check_weights
from ..targets import load_target
from .options import add_img_size, add_model, add_plan, add_weights


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.compile", description=__doc__)
    add_model(p, None, f" (default: the plan's, else {zoo.DEFAULT_MODEL})")
    add_plan(p, " (default: calibrate Q-HyViT W8A8 first)")
    add_weights(p)
    add_img_size(p)
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
        if args.img_size is not None and args.img_size != plan.model["img_size"]:
            raise HyqError(f"the plan is for {plan.model['img_size']}x{plan.model['img_size']} inputs, not"
                           f" {args.img_size}: calibrate again with --img-size {args.img_size}")
        weights = Path(args.weights) if args.weights else zoo.proxy_checkpoint(plan.model["name"])
        check_weights(plan, sha256_file(weights) if weights.is_file() else None)  # before the progress bar
    else:
        name = args.model or zoo.DEFAULT_MODEL
        zoo.model_spec(name)
        if args.img_size is not None:
            zoo.check_img_size(args.img_size)
        plan, _ = calibrate(name, args.weights, method="qhyvit", wbits=8, abits=8, img_size=args.img_size)
    out = args.output or Path("artifacts") / f"{plan.model['name']}-{args.target}"
    compile_plan(plan, args.target, out, args.weights, progress=True, emit=tuple(dict.fromkeys(args.emit)))
    print(f"{plan.model['name']} W{plan.calibration['wbits']}A{plan.calibration['abits']} for {args.target} -> {out}")
