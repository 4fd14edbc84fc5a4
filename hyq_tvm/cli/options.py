"""The options several commands share, spelled one way everywhere."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import zoo
from ..errors import HyqError
from ..fileio import RowCache, sha256_file

PROXY_MODELS = ("mobilevit_xxs", "mobilevitv2_050", "efficientformer_l1", "efficientformerv2_s0")


def add_model(p: argparse.ArgumentParser, default: str | None = zoo.DEFAULT_MODEL, note: str = "") -> None:
    p.add_argument("--model", default=default, help=f"one of: {', '.join(zoo.MODELS)}{note}")


def add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, help="checkpoint (safetensors or .pth); default: the embedded proxy")


def add_img_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, default=None,
                   help="input resolution, a multiple of 32 (default: the checkpoint's; the proxies: 64)")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder or ImageFolder tree (default: Fashion-MNIST)")


def add_plan(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--plan", type=Path, default=None, help=f"QuantPlan from python -m hyq_tvm.calibrate{note}")


def add_mode(p: argparse.ArgumentParser, note: str = "") -> None:
    from ..quant.modules import MODES

    p.add_argument("--mode", default=None, choices=MODES,
                   help="partial: conv2d / linear / matmul inputs quantized, softmax and norms float; full: softmax"
                        " and norm inputs quantized too; integer: every tensor between layers too, nothing float"
                        f" from the input's quantize to the output's dequantize{note}")


def plan_from_args(args: argparse.Namespace, bits: int | None = None):
    """The QuantPlan of --plan, checked against --model, --img-size, --mode, `bits` and the weights; without --plan,
    the Q-HyViT W{bits}A{bits} plan (default 8) of --model in --mode (default partial) calibrated now."""
    from ..quant.calibrate import calibrate
    from ..quant.plan import QuantPlan, check_weights
    from ..quant.quantizer import check_bits

    if args.plan is None:
        name = args.model or zoo.DEFAULT_MODEL
        zoo.model_spec(name)
        if args.img_size is not None:
            zoo.check_img_size(args.img_size)
        bits = 8 if bits is None else check_bits(bits, "--bits")
        return calibrate(name, args.weights, method="qhyvit", wbits=bits, abits=bits, img_size=args.img_size,
                         mode=getattr(args, "mode", None) or "partial")[0]
    plan = QuantPlan.load(args.plan)
    planned_mode = plan.calibration.get("mode", "partial")
    if getattr(args, "mode", None) not in (None, planned_mode):
        raise HyqError(f"the plan is in {planned_mode} mode, not {args.mode}: calibrate again with --mode {args.mode}")
    if args.model is not None and args.model != plan.model["name"]:
        raise HyqError(f"the plan is for {plan.model['name']}, not {args.model}")
    if args.img_size is not None and args.img_size != plan.model["img_size"]:
        raise HyqError(f"the plan is for {plan.model['img_size']}x{plan.model['img_size']} inputs, not"
                       f" {args.img_size}: calibrate again with --img-size {args.img_size}")
    wbits, abits = plan.calibration["wbits"], plan.calibration["abits"]
    if bits is not None and (wbits, abits) != (bits, bits):
        raise HyqError(f"the plan is W{wbits}A{abits}, not W{bits}A{bits}")
    weights = Path(args.weights) if args.weights else zoo.proxy_checkpoint(plan.model["name"])
    check_weights(plan, sha256_file(weights) if weights.is_file() else None)
    return plan


def add_bits(p: argparse.ArgumentParser, many: bool = False, default=8) -> None:
    """--bits: the bit-width of weights and activations alike (many: a list of them)."""
    if many:
        p.add_argument("--bits", nargs="+", type=int, default=list(default), help="W = A bit-widths"
                       f" (default: {' '.join(map(str, default))})")
    else:
        p.add_argument("--bits", type=int, default=default, help=f"W = A bit-width, 2-8 (default {default})")


def add_reports(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reports", type=Path, default=Path("reports"), help="folder the reports go to (default reports)")


def add_threads(p: argparse.ArgumentParser, default: int, note: str) -> None:
    p.add_argument("--threads", type=int, default=default, help=note)


def add_report_args(p: argparse.ArgumentParser, work_dir: str) -> None:
    """The options every report command shares: --models, --threads, --reports, --work-dir."""
    p.add_argument("--models", nargs="+", default=list(PROXY_MODELS))
    add_threads(p, 0, "torch threads (0: all cores)")
    add_reports(p)
    p.add_argument("--work-dir", type=Path, default=Path(work_dir), help="finished rows, for resuming")


def start_report(args: argparse.Namespace) -> RowCache:
    """Apply --threads, check --models and open the row cache of a report command."""
    if args.threads:
        torch.set_num_threads(args.threads)
    for model in args.models:
        zoo.model_spec(model)
    return RowCache(args.work_dir / "rows.json")
