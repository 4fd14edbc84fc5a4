"""Calibration: a model's QuantPlan from calibration images, by Q-HyViT or a baseline."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .. import data, zoo
from ..errors import HyqError
from .baselines.minmax import calibrate_minmax
from .plan import QuantPlan, plan_layers
from .prepare import prepared_model
from .qhyvit import GRANULARITIES, SCHEMES, QHyViT, QHyViTConfig
from .quantizer import check_bits

METHODS = ("qhyvit", "minmax")


def calibrate(name: str, weights: str | Path | None = None, dataset: str | Path | None = None,
              method: str = "qhyvit", wbits: int = 8, abits: int = 8, images: int = data.CALIBRATION_IMAGES,
              seed: int = 0, granularities=GRANULARITIES, schemes=SCHEMES, mode: str = "partial",
              progress: bool = True, img_size: int | None = None) -> tuple[QuantPlan, nn.Module]:
    """Calibrate `name` for `img_size` inputs (default: the checkpoint's) with `method`; returns the plan
    and the quantized (fake-quant) model."""
    check_bits(wbits, "--wbits")
    check_bits(abits, "--abits")
    if method not in METHODS:
        raise HyqError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model, info = prepared_model(name, weights, mode, img_size)
    calib = data.calibration_set(data.open_dataset(dataset, "train", info.img_size, info.mean, info.std), images, seed)
    bridges = zoo.find_bridge_blocks(model)
    start = time.perf_counter()
    extra = {}
    if method == "qhyvit":
        config = QHyViTConfig(wbits=wbits, abits=abits, granularities=tuple(granularities), schemes=tuple(schemes))
        report = QHyViT(model, bridges, config).calibrate(calib, progress=progress)
        extra = {"granularities": list(granularities), "schemes": list(schemes), "candidates": config.candidates,
                 "alpha": config.alpha, "beta": config.beta, "rounds": config.rounds,
                 "zero_point_overflow_choices": report.overflow_choices}
    else:
        calibrate_minmax(model, calib, wbits, abits)
    seconds = time.perf_counter() - start
    plan = QuantPlan(
        model={"name": name, "num_classes": info.num_classes, "img_size": info.img_size,
               "input_shape": [1, 3, info.img_size, info.img_size], "mean": list(info.mean), "std": list(info.std),
               "weights": info.weights, "weights_sha256": info.weights_sha256, "dataset": info.dataset},
        calibration={"method": method, "wbits": wbits, "abits": abits, "mode": mode, "images": images,
                     "seed": seed, "dataset": str(dataset) if dataset else "fashion-mnist",
                     "seconds": round(seconds, 2), "torch_threads": torch.get_num_threads(), **extra},
        layers=plan_layers(model, bridges),
        bridge_blocks=[list(b.members) for b in bridges])
    return plan, model
