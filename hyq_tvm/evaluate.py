"""Top-1 accuracy of a model in FP32 and, with --plan, of its fake-quantized twin (python -m hyq_tvm.evaluate)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch import nn

from . import data, zoo
from .calibrate import prepared_model
from .errors import HyqError, run_cli
from .metrics import top1
from .quant.plan import QuantPlan, apply_plan


def quantized_model(plan: QuantPlan, weights: str | Path | None = None) -> nn.Module:
    """The plan's model with its weights, every quantizer loaded from the plan and enabled."""
    model, info = prepared_model(plan.model["name"], weights, plan.calibration.get("mode", "partial"))
    apply_plan(model, plan, info.weights_sha256)
    return model


def evaluate(name: str, plan: QuantPlan | None = None, weights=None, dataset=None, limit: int | None = None,
             batch_size: int = 250) -> dict:
    """FP32 top-1 and, with a plan, fake-quantized top-1 on the test split."""
    if plan is not None and plan.model["name"] != name:
        raise HyqError(f"the plan is for {plan.model['name']}, not {name}")
    quantized = quantized_model(plan, weights) if plan is not None else None  # a plan that does not fit fails first
    model, info = zoo.load_model(name, weights)
    test = data.test_loader(dataset, info.img_size, info.mean, info.std, limit, batch_size)
    result = {"model": name, "images": len(test.dataset), "top1_fp32": round(top1(model, test, "fp32"), 2)}
    if quantized is not None:
        result["top1_quant"] = round(top1(quantized, test, "quantized"), 2)
        result.update({k: plan.calibration[k] for k in ("method", "wbits", "abits")})
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.evaluate", description=__doc__)
    p.add_argument("--model", default=None, help="zoo model (default: the plan's, else mobilevit_xxs)")
    p.add_argument("--plan", type=Path, default=None, help="QuantPlan from hyq_tvm.calibrate")
    p.add_argument("--weights", default=None, help="checkpoint; default: the embedded proxy")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder or ImageFolder tree (default: Fashion-MNIST)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = QuantPlan.load(args.plan) if args.plan else None
    name = args.model or (plan.model["name"] if plan else zoo.DEFAULT_MODEL)
    zoo.model_spec(name)
    print(json.dumps(evaluate(name, plan, args.weights, args.data, args.limit)))


if __name__ == "__main__":
    run_cli(main)
