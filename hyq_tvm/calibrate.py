"""Calibrate a model post-training and write its QuantPlan (python -m hyq_tvm.calibrate)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from . import data, zoo
from .errors import HyqError, run_cli
from .quant.baselines.minmax import calibrate_minmax
from .quant.modules import MODES, prepare
from .quant.plan import QuantPlan, layers_to_json
from .quant.qhyvit import GRANULARITIES, SCHEMES, QHyViT, QHyViTConfig
from .quant.quantizer import check_bits

METHODS = ("qhyvit", "minmax")


def prepared_model(name: str, weights: str | Path | None, mode: str = "partial") -> tuple[nn.Module, zoo.ModelInfo]:
    """The model with its weights, BN folded and quantizers attached (all disabled)."""
    model, info = zoo.load_model(name, weights)
    prepare(model, torch.zeros(1, 3, info.img_size, info.img_size), mode)
    return model, info


def calibrate(name: str, weights: str | Path | None = None, dataset: str | Path | None = None,
              method: str = "qhyvit", wbits: int = 8, abits: int = 8, images: int = data.CALIBRATION_IMAGES,
              seed: int = 0, granularities=GRANULARITIES, schemes=SCHEMES, mode: str = "partial",
              progress: bool = True
              ) -> tuple[QuantPlan, nn.Module]:
    """Calibrate `name` with `method`; returns the plan and the quantized (fake-quant) model."""
    check_bits(wbits, "--wbits")
    check_bits(abits, "--abits")
    if method not in METHODS:
        raise HyqError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model, info = prepared_model(name, weights, mode)
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
        layers=layers_to_json(model, bridges),
        bridge_blocks=[list(b.members) for b in bridges])
    return plan, model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.calibrate", description=__doc__)
    p.add_argument("--model", default=zoo.DEFAULT_MODEL, help=f"one of: {', '.join(zoo.MODELS)}")
    p.add_argument("--method", default="qhyvit", choices=METHODS)
    p.add_argument("--wbits", type=int, default=8, help="weight bit-width, 2-8")
    p.add_argument("--abits", type=int, default=8, help="activation bit-width, 2-8")
    p.add_argument("--weights", default=None, help="checkpoint (safetensors or .pth); default: the embedded proxy")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder or ImageFolder tree (default: Fashion-MNIST)")
    p.add_argument("--images", type=int, default=data.CALIBRATION_IMAGES, help="calibration images")
    p.add_argument("--seed", type=int, default=0, help="calibration sampler seed")
    p.add_argument("--granularity", default="search", choices=("search",) + GRANULARITIES,
                   help="Q-HyViT activation granularity: searched, or fixed (ablation)")
    p.add_argument("--scheme", default="search", choices=("search",) + SCHEMES,
                   help="Q-HyViT activation scheme: searched, or fixed (ablation)")
    p.add_argument("--mode", default="partial", choices=MODES,
                   help="partial: softmax, LayerNorm and GroupNorm stay float; full: their inputs are quantized too")
    p.add_argument("-o", "--output", type=Path, required=True, help="QuantPlan JSON to write")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    zoo.model_spec(args.model)
    plan, _ = calibrate(args.model, args.weights, args.data, args.method, args.wbits, args.abits, args.images,
                        args.seed,
                        GRANULARITIES if args.granularity == "search" else (args.granularity,),
                        SCHEMES if args.scheme == "search" else (args.scheme,), args.mode)
    plan.save(args.output)
    print(f"{args.model} {args.method} W{args.wbits}A{args.abits}: {len(plan.layers)} layers calibrated in"
          f" {plan.calibration['seconds']:.1f} s -> {args.output}")


if __name__ == "__main__":
    run_cli(main)
