"""Calibrate a model post-training and write its QuantPlan (python -m hyq_tvm.calibrate)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import data, zoo
from ..quant.calibrate import METHODS, calibrate
from ..quant.qhyvit import GRANULARITIES, SCHEMES
from ..quant.quantizer import check_bits
from .options import add_bits, add_data, add_img_size, add_mode, add_model, add_weights


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.calibrate", description=__doc__)
    add_model(p)
    p.add_argument("--method", default="qhyvit", choices=METHODS)
    add_bits(p)
    p.add_argument("--wbits", type=int, default=None, help="weight bit-width, 2-8 (default: --bits)")
    p.add_argument("--abits", type=int, default=None, help="activation bit-width, 2-8 (default: --bits)")
    add_weights(p)
    add_img_size(p)
    add_data(p)
    p.add_argument("--images", type=int, default=data.CALIBRATION_IMAGES,
                   help=f"calibration images, drawn at random (--seed) from the training split; refused when they"
                        f" would not fit in memory (default {data.CALIBRATION_IMAGES})")
    p.add_argument("--seed", type=int, default=0, help="calibration sampler seed")
    p.add_argument("--granularity", default="search", choices=("search",) + GRANULARITIES,
                   help="Q-HyViT activation granularity: searched, or fixed (ablation)")
    p.add_argument("--scheme", default="search", choices=("search",) + SCHEMES,
                   help="Q-HyViT activation scheme: searched, or fixed (ablation)")
    add_mode(p, " (default: partial)")
    p.add_argument("-o", "--output", type=Path, required=True, help="QuantPlan JSON to write")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    zoo.model_spec(args.model)
    check_bits(args.bits, "--bits")
    if args.img_size is not None:
        zoo.check_img_size(args.img_size)
    wbits = args.bits if args.wbits is None else args.wbits
    abits = args.bits if args.abits is None else args.abits
    plan, _ = calibrate(args.model, args.weights, args.data, args.method, wbits, abits, args.images, args.seed,
                        GRANULARITIES if args.granularity == "search" else (args.granularity,),
                        SCHEMES if args.scheme == "search" else (args.scheme,), args.mode or "partial", img_size=args.img_size)
    plan.save(args.output)
    print(f"{args.model} {args.method} W{wbits}A{abits}: {len(plan.layers)} layers calibrated on"
          f" {plan.calibration['images']} images in {plan.calibration['seconds']:.1f} s -> {args.output}")
