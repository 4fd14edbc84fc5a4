"""Compile a quantized model into an integer TVM library and artifact folder (python -m hyq_tvm.compile)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import zoo
from ..build import AUTO, EMITS, check_target, compile_plan
from ..mcu.boards import is_mcu_target
from .options import add_img_size, add_mode, add_model, add_plan, add_weights, plan_from_args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.compile", description=__doc__)
    add_model(p, None, f" (default: the plan's, else {zoo.DEFAULT_MODEL})")
    add_plan(p, " (default: calibrate Q-HyViT W8A8 first)")
    add_weights(p)
    add_img_size(p)
    add_mode(p, " (default: the plan's, else partial)")
    p.add_argument("--target", default="host", help="a target in targets/ (default: host); a microcontroller board"
                                                     " (stm32h743, ...) gets a C folder and needs --mode integer")
    p.add_argument("--emulate", type=int, nargs="?", const=20, default=0, metavar="N",
                   help="microcontroller boards: run N proxy test images (default 20) on the board's QEMU machine"
                        " and check every output bit-exact with the host integer graph")
    p.add_argument("--emit", nargs="+", default=["tvm"], choices=EMITS,
                   help="tvm: the integer TVM library (default); onnx: the QDQ ONNX model of the same plan, for"
                        " onnxruntime (model.onnx); both: --emit tvm onnx")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="artifact folder to write (default: artifacts/MODEL-TARGET)")
    tuned = p.add_mutually_exclusive_group()
    tuned.add_argument("--schedules", type=Path, default=None,
                       help="tuning database folder from python -m hyq_tvm.tune (default: "
                            "schedules/TARGET/MODEL-SIZE-wBaB when it exists)")
    tuned.add_argument("--no-schedules", action="store_true", help="build with the default schedules only")
    return p.parse_args(argv)


def _compile_mcu(args: argparse.Namespace) -> None:
    """The C folder for an MCU board, checked on its QEMU machine with --emulate."""
    from .. import data
    from ..mcu.boards import load_board
    from ..mcu.build import compile_mcu, emulate

    load_board(args.target)
    args.mode = args.mode or "integer"
    plan = plan_from_args(args)
    out = args.output or Path("artifacts") / f"{plan.model['name']}-{args.target}"
    model = compile_mcu(plan, args.target, out, args.weights)
    m = model.memory
    print(f"{plan.model['name']} W{plan.calibration['wbits']}A{plan.calibration['abits']} for {args.target} -> {out}"
          f" (flash {m.flash_bytes:,} B of which weights {m.weights_bytes:,} B; RAM {m.ram_bytes:,} B of which arena"
          f" {m.arena_bytes:,} B, lower bound {m.arena_lower_bound_bytes:,} B; stack {m.stack_bytes:,} B)")
    if args.emulate:
        info = plan.model
        images, labels = next(iter(data.test_loader(None, info["img_size"], info["mean"], info["std"],
                                                    limit=args.emulate, batch_size=args.emulate)))
        result = emulate(model, images, labels)
        print(f"EMULATED {result['qemu_machine']} ({args.target}): {result['bitexact']}/{result['images']} outputs "
              f"bit-exact with the host integer graph, top-1 {result['top1']}%, {result['instructions']:,} "
              f"instructions per inference, {result['instructions'] / result['macs']:.2f} per multiply-accumulate")


def main(argv=None) -> None:
    args = parse_args(argv)
    if is_mcu_target(args.target):
        _compile_mcu(args)
        return
    schedules = None if args.no_schedules else args.schedules or AUTO
    check_target(args.target, schedules if "tvm" in args.emit else None)
    plan = plan_from_args(args)
    out = args.output or Path("artifacts") / f"{plan.model['name']}-{args.target}"
    compile_plan(plan, args.target, out, args.weights, progress=True, emit=tuple(dict.fromkeys(args.emit)),
                 schedules=schedules)
    print(f"{plan.model['name']} W{plan.calibration['wbits']}A{plan.calibration['abits']} for {args.target} -> {out}")
