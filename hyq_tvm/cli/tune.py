"""Tune a model's integer kernels for a target with MetaSchedule (python -m hyq_tvm.tune).

  python -m hyq_tvm.tune --model mobilevit_xxs --target host --trials 64
  python -m hyq_tvm.tune --target rasp4b --tracker 127.0.0.1:9190 --key rasp4b

Tunes the fused kernels of the plan's integer graph that compute in integers only and that the packed int8
GEMMs do not already cover (float kernels keep the default schedule, so their bits do not depend on the
target), --trials measured candidates each, into schedules/TARGET/MODEL-SIZE-wBaB/: MetaSchedule's JSON
database and tuning.json (what was tuned, and whether the times are this machine's or a board's). compile
applies it. Candidates run on this machine, or with --tracker on a board of --key, linked by the target's cross
compiler. An interrupted run continues where it stopped: the records already in the database count.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import zoo
from ..devices.fleet import parse_addr, tracker_summary
from ..errors import HyqError, check_positive
from ..relax.pipeline import lower
from ..relax.tuning import database_dir, tune
from ..targets import load_target
from .options import add_img_size, add_model, add_plan, add_weights, plan_from_args

DEFAULT_TRIALS = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.tune", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(p, None, f" (default: the plan's, else {zoo.DEFAULT_MODEL})")
    add_plan(p, " (default: calibrate Q-HyViT W{--bits}A{--bits} first)")
    add_weights(p)
    add_img_size(p)
    p.add_argument("--bits", type=int, default=None, help="W = A bit-width of the Q-HyViT plan, 2-8 (default 8;"
                                                          " with --plan: the plan's)")
    p.add_argument("--target", default="host", help="a target in targets/ (default: host)")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                   help=f"measured candidates per kernel, earlier runs included (default {DEFAULT_TRIALS})")
    p.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker: time candidates on a board")
    p.add_argument("--key", default=None, help="device key at the tracker (default: the target's)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="database folder (default: schedules/TARGET/MODEL-SIZE-wBaB)")
    return p.parse_args(argv)


def _board(args: argparse.Namespace, spec) -> tuple[tuple[str, int] | None, str | None]:
    """(tracker address, key) to time candidates on, or (None, None) for this machine."""
    key = args.key or spec.rpc_key
    if args.tracker is None:
        if not spec.is_host:
            raise HyqError(f"target {spec.name} does not run here: time its candidates on a board with --tracker"
                           " HOST:PORT [--key KEY]")
        if args.key is not None:
            raise HyqError("--key needs --tracker")
        return None, None
    tracker = parse_addr(args.tracker)
    if key is None:
        raise HyqError(f"target {spec.name} has no RPC key: give --key")
    if key not in tracker_summary(*tracker).get("queue_info", {}):
        raise HyqError(f"no device with key {key!r} at the RPC tracker {args.tracker}")
    return tracker, key


def main(argv=None) -> None:
    args = parse_args(argv)
    check_positive(args.trials, "--trials")
    spec = load_target(args.target)
    tracker, key = _board(args, spec)
    fcompile = spec.fcompile()   # None: this machine links
    plan = plan_from_args(args, args.bits)
    m, c = plan.model, plan.calibration
    folder = args.output or database_dir(spec.name, m["name"], m["img_size"], c["wbits"], c["abits"])
    about = {"target": spec.name, "model": m["name"], "img_size": m["img_size"], "wbits": c["wbits"],
             "abits": c["abits"]}
    done = tune(lower(plan, args.weights).mod, spec.tvm_target(), folder, args.trials, about, tracker, key, fcompile)
    print(f"{m['name']} W{c['wbits']}A{c['abits']} for {spec.name}: {len(done)} kernels tuned, "
          f"{sum(done.values())} records -> {folder}")
