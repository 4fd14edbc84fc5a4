"""Check the compiled integer graphs of the proxy models against their fake-quant twins
(python -m hyq_tvm.integer_report).

For each proxy model with an embedded checkpoint, at each bit-width with a Q-HyViT (or --method) plan
cached in --work-dir/plans, the integer graph is built for the host and run with the PyTorch fake-quant model
and the plan's QDQ ONNX model in onnxruntime over --limit test images (a seeded class-balanced subset; top-1 of
each and their top-1 agreement with the fake-quant model), and every integer layer is checked bit for bit on
--check such images (hyq_tvm.relax.verify). Writes
reports/integer_graph.{json,md} (rows of other models, modes and bit-widths kept); finished rows are kept in
--work-dir/rows.json, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from tqdm import tqdm
from tvm import relax

from .. import data, zoo
from ..errors import check_positive
from ..fileio import atomic_path, sha256_file, write_json
from ..onnx_qdq import export_onnx, onnx_session
from ..quant.calibrate import METHODS, calibrate
from ..quant.modules import MODES
from ..quant.plan import QuantPlan
from ..quant.prepare import quantized_model
from ..relax.integer import IntegerLayer
from ..relax.census import float_ops
from ..relax.pipeline import lower
from ..relax.verify import check_values, debug_vm, first_mismatch, run_debug
from ..targets import load_target
from .options import add_bits, add_report_args, start_report

BITS = (8, 4)


def _suffix(mode: str) -> str:
    return "" if mode == "partial" else f"-{mode}"


def cached_plan(model: str, sha: str, method: str, bits: int, mode: str, work_dir: Path) -> QuantPlan:
    """The WbitsAbits plan of `model` (weights `sha`) in `mode`, calibrated once and kept in work_dir/plans."""
    path = work_dir / "plans" / f"{model}-{sha[:16]}-{method}-W{bits}A{bits}{_suffix(mode)}.json"
    if path.is_file():
        return QuantPlan.load(path)
    plan, _ = calibrate(model, method=method, wbits=bits, abits=bits, mode=mode)
    plan.save(path)
    return plan


def host_graph(plan: QuantPlan) -> tuple[relax.VirtualMachine, list[IntegerLayer], int]:
    """The plan's integer graph with its debug function, built for the host, its integer layers and float_ops."""
    lowered = lower(plan)
    vm = debug_vm(lowered.mod, lowered.layers, load_target("host").tvm_target())
    return vm, lowered.layers, float_ops(lowered.mod)


def integer_logits(vm: relax.VirtualMachine, images: torch.Tensor) -> np.ndarray:
    """`main` of the compiled graph (static batch 1) on each image."""
    return np.concatenate([vm["main"](tvm.runtime.tensor(x[None].numpy())).numpy() for x in images])


@torch.no_grad()
def predictions(vm: relax.VirtualMachine, model: torch.nn.Module, session, test, desc: str) -> dict[str, np.ndarray]:
    """Top-1 classes of the integer graph, the fake-quant model and the QDQ ONNX model, and the labels."""
    out: dict[str, list] = {"integer": [], "fakequant": [], "onnxruntime": [], "label": []}
    for images, labels in tqdm(test, desc=desc, unit="batch", leave=False):
        out["integer"].append(integer_logits(vm, images).argmax(1))
        out["fakequant"].append(model(images).argmax(1).numpy())
        out["onnxruntime"].append(np.concatenate([session.run(None, {"input": x[None].numpy()})[0].argmax(1)
                                                  for x in images]))
        out["label"].append(labels.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def bitexact_check(vm: relax.VirtualMachine, layers: list[IntegerLayer], images: torch.Tensor) -> dict:
    """Every integer layer checked on each image, and the debug output compared with `main`'s."""
    first, same_output = None, True
    for x in images:
        x = x[None].numpy()
        output, values = run_debug(vm, layers, x)
        first = first or first_mismatch(check_values(layers, values))
        same_output &= bool(np.array_equal(output, vm["main"](tvm.runtime.tensor(x)).numpy()))
    return {"bitexact": first is None and same_output, "layers_checked": len(layers),
            "first_mismatch": first.name if first else None, "debug_output_matches_main": same_output}


def _percent(hits: np.ndarray) -> float:
    return round(100.0 * float(np.mean(hits)), 2)


def report_row(model: str, sha: str, method: str, bits: int, mode: str, limit: int, check: int,
               work_dir: Path) -> dict:
    """Agreement, the top-1s and the bit-exact check of one model at WbitsAbits in `mode`."""
    plan = cached_plan(model, sha, method, bits, mode, work_dir)
    start = time.perf_counter()
    vm, layers, floats = host_graph(plan)
    with tempfile.TemporaryDirectory() as scratch:
        session = onnx_session(export_onnx(plan, Path(scratch) / "model.onnx"))
    built = time.perf_counter()
    info = plan.model
    test = data.test_loader(None, info["img_size"], info["mean"], info["std"], limit, batch_size=50)
    pred = predictions(vm, quantized_model(plan).eval(), session, test, f"{model} W{bits}A{bits}")
    check_images = next(iter(data.test_loader(None, info["img_size"], info["mean"], info["std"], check, check)))[0]
    exact = bitexact_check(vm, layers, check_images)
    return {"model": model, "method": method, "mode": mode, "wbits": bits, "abits": bits, **exact,
            **{f"integer_{op}": sum(layer.op == op for layer in layers) for op in ("softmax", "norm")},
            "float_ops": floats,
            "agreement": _percent(pred["integer"] == pred["fakequant"]),
            "top1_integer": _percent(pred["integer"] == pred["label"]),
            "top1_fakequant": _percent(pred["fakequant"] == pred["label"]),
            "agreement_onnxruntime": _percent(pred["onnxruntime"] == pred["fakequant"]),
            "top1_onnxruntime": _percent(pred["onnxruntime"] == pred["label"]),
            "images": len(pred["label"]), "check_images": len(check_images),
            "seconds": {"build": round(built - start, 1), "run": round(time.perf_counter() - built, 1)}}


def _key(row: dict) -> tuple:
    return row["model"], row["method"], MODES.index(row["mode"]), -row["wbits"], -row["abits"]


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """The rows of `old` that `new` does not replace (same model, method, mode and bit-widths), and `new`, sorted."""
    keys = {_key(r) for r in new}
    return sorted([r for r in old if _key(r) not in keys] + new, key=_key)


def markdown(rows: list[dict], skipped: list[str]) -> str:
    lines = ["# Integer graph vs fake-quant model (Fashion-MNIST proxies, host build)", "",
             "Generated by `python -m hyq_tvm.integer_report`. `bit-exact`: every integer layer (conv2d, matmul,"
             " softmax, norm) of the compiled graph equals the independent numpy reference (hyq_tvm/relax/integer/reference.py) bit for bit"
             " on the checked images; agreement: same top-1 class as the PyTorch fake-quant model;"
             " onnxruntime: the plan's QDQ ONNX model (`compile --emit onnx`) in onnxruntime.",
             " Mode partial: softmax / LayerNorm / GELU stay float islands; full: softmax and LayerNorm inputs are"
             " quantized too, and every softmax, and every LayerNorm / GroupNorm whose output is quantized, runs as"
             " an integer kernel (hyq_tvm/relax/integer/; counts in the integer softmax / norm column); integer: every"
             " tensor between layers is quantized too. float ops: the ops of the lowered graph that take or give"
             " float32, but for the input's quantize and the output's dequantize.",
             "", "| model | method | mode | W/A | bit-exact (layer results, images) | agreement % | top-1 integer"
             " | top-1 fake-quant | onnxruntime agreement % | top-1 onnxruntime | images | integer softmax / norm"
             " | float ops |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exact = "yes" if r["bitexact"] else f"no (first: {r['first_mismatch']})"
        lines.append(f"| {r['model']} | {r['method']} | {r['mode']} | W{r['wbits']}A{r['abits']} | {exact} ({r['layers_checked']},"
                     f" {r['check_images']}) | {r['agreement']:.2f} | {r['top1_integer']:.2f} |"
                     f" {r['top1_fakequant']:.2f} | {r['agreement_onnxruntime']:.2f} | {r['top1_onnxruntime']:.2f} |"
                     f" {r['images']} | {r['integer_softmax']} / {r['integer_norm']} | {r.get('float_ops', '-')} |")
    if skipped:
        lines += ["", f"Skipped (no proxy checkpoint in hyq_tvm/checkpoints/): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.integer_report", description=__doc__.splitlines()[0])
    add_report_args(p, "runs/integer")
    add_bits(p, many=True, default=BITS)
    p.add_argument("--method", default="qhyvit", choices=METHODS, help="calibration of the plans")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="quantization modes (default: all)")
    p.add_argument("--limit", type=int, default=2000, help="test images for top-1 and agreement (a seeded class-balanced subset)")
    p.add_argument("--check", type=int, default=4, help="test images for the layer-by-layer bit-exact check")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_positive(args.limit, "--limit")
    check_positive(args.check, "--check")
    cache = start_report(args)
    skipped = [m for m in args.models if not zoo.proxy_checkpoint(m).is_file()]
    rows = []
    for model in tqdm([m for m in args.models if m not in skipped], desc="models", unit="model"):
        sha = sha256_file(zoo.proxy_checkpoint(model))
        for mode in args.modes:
            for bits in args.bits:
                key = f"{model}/{sha[:16]}/{args.method}/W{bits}A{bits}/balanced{args.limit}/{args.check}{_suffix(mode)}"
                rows.append(cache.get(key, lambda: report_row(model, sha, args.method, bits, mode, args.limit,
                                                              args.check, args.work_dir)))
    path = args.reports / "integer_graph.json"
    rows = merged(json.loads(path.read_text()) if path.is_file() else [], rows)
    write_json(path, rows)
    with atomic_path(args.reports / "integer_graph.md") as tmp:
        tmp.write_text(markdown(rows, skipped))
    print(markdown(rows, skipped))

