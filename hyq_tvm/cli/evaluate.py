"""Top-1 accuracy of a model in FP32 and, with --plan, of its fake-quantized twin (python -m hyq_tvm.evaluate)."""
from __future__ import annotations

import argparse
import json

from .. import zoo
from ..accuracy import evaluate
from ..quant.plan import QuantPlan
from .options import add_data, add_model, add_plan, add_weights


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.evaluate", description=__doc__)
    add_model(p, None, f" (default: the plan's, else {zoo.DEFAULT_MODEL})")
    add_plan(p)
    add_weights(p)
    add_data(p)
    p.add_argument("--limit", type=int, default=None, help="evaluate N test images only, drawn at random (seeded) and balanced over the classes")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = QuantPlan.load(args.plan) if args.plan else None
    name = args.model or (plan.model["name"] if plan else zoo.DEFAULT_MODEL)
    zoo.model_spec(name)
    print(json.dumps(evaluate(name, plan, args.weights, args.data, args.limit)))
