"""Evaluation: top-1 of a model in FP32 and of its fake-quantized twin on the test split."""
from __future__ import annotations

from pathlib import Path

from . import data, zoo
from .errors import HyqError, check_positive
from .metrics import top1
from .quant.plan import QuantPlan
from .quant.prepare import quantized_model


def evaluate(name: str, plan: QuantPlan | None = None, weights: str | Path | None = None,
             dataset: str | Path | None = None, limit: int | None = None, batch_size: int = 250) -> dict:
    """FP32 top-1 and, with a plan, fake-quantized top-1 on the test split (`limit` images of it, balanced over
    its classes, when given); "images" is the number of images evaluated."""
    check_positive(limit, "--limit")
    if plan is not None and plan.model["name"] != name:
        raise HyqError(f"the plan is for {plan.model['name']}, not {name}")
    quantized = quantized_model(plan, weights) if plan is not None else None  # a plan that does not fit fails first
    model, info = zoo.load_model(name, weights, plan.model["img_size"] if plan is not None else None)
    test = data.test_loader(dataset, info.img_size, info.mean, info.std, limit, batch_size)
    result = {"model": name, "images": len(test.dataset), "top1_fp32": round(top1(model, test, "fp32"), 2)}
    if quantized is not None:
        result["top1_quant"] = round(top1(quantized, test, "quantized"), 2)
        result.update({k: plan.calibration[k] for k in ("method", "wbits", "abits")})
    return result
