"""hyq-tvm int8 against onnxruntime on an emulated board, in instructions per inference
(python -m hyq_tvm.bench --compare-ort).

After the bench stage (bit-exactness of the board against the host twin; instructions in model.so and libm
through RPC on an --icount board), the artifact's model.so, the FP32 ONNX export of the same model and the plan's
QDQ ONNX model (int8, run by onnxruntime) each run on the same input in the board's rootfs, one thread, counted by
devices.engines: the instructions of the engine and of the system libraries it calls (the headline, alike for all
three), of the engine's own code and libm, and of hyq-tvm's TVM runtime. MACs per layer come from the plan's model
(devices.macs); instructions per MAC are end to end: a TVM kernel or an onnxruntime node is not attributed to a
layer. Writes reports/benchmark_<board>.json and .md, one row per (model, board, img_size).
"""
from __future__ import annotations

import fcntl
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from . import fleet
from .bench import device_info
from .boards import get_board
from .engines import NATIVE, OWN, engine_instructions, ort_version
from .rootfs import rootfs_dir
from ..artifact import load_artifact
from ..errors import HyqError
from ..fileio import atomic_path, sha256_file, write_json

ENGINES = ("hyq_int8", "ort_fp32", "ort_int8")
LABELS = {"hyq_int8": "hyq-tvm int8", "ort_fp32": "ort FP32", "ort_int8": "ort int8 (QDQ)"}
RUNTIME = ("/libtvm_runtime.so",)  # the Relax VM and the TVM runtime, hyq-tvm's share outside model.so


def check_icount_key(tracker: str, key: str, state_file: Path | None = None) -> None:
    """A HyqError unless every live board of our fleet under `key` is emulated and started with --icount."""
    entries = device_info(key, fleet.parse_addr(tracker), state_file).entries
    if not entries or not all(b.get("icount") for b in entries):
        raise HyqError(f"--compare-ort needs emulated boards started with --icount under key {key!r} on tracker "
                       f"{tracker} (python -m hyq_tvm.device start {key} --icount)")


def board_of(bench_row: dict, state_file: Path | None = None) -> str:
    """The board type (rasp4b, ...) of the emulated board a bench row ran on."""
    for b in fleet.load_state(state_file or fleet.state_path()).get("boards", []):
        if b["name"] == bench_row.get("board"):
            return b["board"]
    raise HyqError(f"board {bench_row.get('board')!r} is not in the emulated fleet's state: start it with "
                   f"python -m hyq_tvm.device start BOARD --icount")


def onnx_models(art, plan, scratch: Path) -> tuple[Path, Path]:
    """(the plan's QDQ ONNX model: the artifact's, else exported; the FP32 ONNX export) of the artifact's model."""
    from .. import zoo
    from ..latency import _export_fp32
    from ..onnx_qdq import export_onnx
    from ..quant.plan import check_weights

    check_weights(plan, sha256_file(zoo.proxy_checkpoint(plan.model["name"])))
    files = art.meta["files"]
    qdq = art.path / files["onnx"] if "onnx" in files else export_onnx(plan, scratch / "int8.onnx")
    return qdq, _export_fp32(plan.model, None, scratch / "fp32.onnx")


def first_image(plan_model: dict, data: str | None) -> np.ndarray:
    """The bench stage's instruction-count input: test image 0, preprocessed, batch 1."""
    from .. import data as datasets

    dataset = datasets.open_dataset(data, "test", plan_model["img_size"], plan_model["mean"], plan_model["std"])
    return dataset[0][0][None].numpy().astype("float32")


def benchmark_row(bench_row: dict, board: str, plan, counted: dict[str, dict], runtime: int, layers: list[dict],
                  versions: dict) -> dict:
    """The report row. counted: engine -> {"native", "own"}: engines.engine_instructions of its NATIVE and OWN
    code; runtime: hyq-tvm's instructions per inference in libtvm_runtime."""
    total = {e: counted[e]["native"]["code"]["instructions"] for e in ENGINES}
    macs = sum(layer["macs"] for layer in layers)
    return {"model": plan.model["name"], "board": board, "img_size": plan.model["img_size"], "emulated": True,
            "qemu_cpu": get_board(board).qemu_cpu,
            "calibration": {k: plan.calibration.get(k) for k in ("method", "wbits", "abits", "mode")},
            **{f"{e}_instructions": total[e] for e in ENGINES}, "macs": macs,
            "bitexact": bench_row["bitexact"], "bitexact_images": bench_row["bitexact_images"],
            "images": bench_row["images"],
            "hyq_over_ort_fp32": round(total["hyq_int8"] / total["ort_fp32"], 3),
            "hyq_over_ort_int8": round(total["hyq_int8"] / total["ort_int8"], 3),
            "instructions_per_mac": {e: round(total[e] / macs, 3) for e in ENGINES},
            "exact": {e: counted[e]["native"]["code"]["exact"] for e in ENGINES},
            "spread": {e: counted[e]["native"]["code"]["spread"] for e in ENGINES},
            "own_instructions": {e: counted[e]["own"]["code"]["instructions"] for e in ENGINES},
            "process_instructions": {e: counted[e]["native"]["process"]["instructions"] for e in ENGINES},
            "hyq_int8_runtime_instructions": runtime, "hyq_int8_rpc_instructions": bench_row["instructions"],
            "ort_int8_kernels": counted["ort_int8"]["native"]["kernels"],
            "counts": {e: {k: counted[e][k]["counts"] for k in ("native", "own")} for e in ENGINES},
            "layers": layers, "versions": versions, "hyq_board": bench_row["board"],
            "note": "EMULATED: aarch64 instructions counted under qemu-user (TCG plugin) on an x86-64 host, "
                    "not cycles or time on the real board"}


def write_reports(out_dir: Path, board: str, row: dict) -> tuple[Path, Path]:
    """Add (or replace: same model, board and size) the row in reports/benchmark_<board>.json and rewrite the
    Markdown twin; writers take turns (a lock file beside the report)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f".benchmark_{board}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out_dir / f"benchmark_{board}.json"
        rows = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
        key = (row["model"], row["board"], row["img_size"])
        rows = sorted([r for r in rows if (r["model"], r["board"], r["img_size"]) != key] + [row],
                      key=lambda r: (r["model"], r["img_size"]))
        write_json(path, {"generated_by": "python -m hyq_tvm.bench --compare-ort", "board": board, "emulated": True,
                          "rows": rows})
        md = out_dir / f"benchmark_{board}.md"
        with atomic_path(md) as tmp:
            tmp.write_text(markdown(board, rows))
    return path, md


def _count(row: dict, engine: str) -> str:
    spread = row["spread"][engine]
    return f"{row[f'{engine}_instructions']:,}" + (f" ± {spread:g}" if spread else "")


def markdown(board: str, rows: list[dict]) -> str:
    """The report: one line per row, where the instructions are, then each row's MACs per layer."""
    lines = [f"# Board benchmark (EMULATED): {board}, hyq-tvm int8 vs onnxruntime", "",
             f"**EMULATED**: {board} is qemu-user on an x86-64 host. The numbers are aarch64 instructions executed "
             "per batch-1 inference on the emulated CPU, counted by a QEMU TCG plugin; they are not cycles or times "
             "of the real board.", "",
             "Generated by `python -m hyq_tvm.bench --tracker HOST:PORT --key BOARD --artifact DIR --compare-ort` "
             "(boards started with `python -m hyq_tvm.device start BOARD --icount`). Each engine runs in the board's "
             "rootfs, one thread, called from Python: hyq-tvm int8 the artifact's model.so in the TVM runtime's "
             "Relax VM; onnxruntime (its aarch64 wheel) the FP32 ONNX export of the model and the plan's QDQ ONNX "
             "model (int8). Instructions per inference: those of the engine and the system libraries it calls "
             "(model.so, libtvm_runtime and tvm_ffi, or onnxruntime's libraries; libc, libm, libstdc++), not of the "
             "Python interpreter around the call; (count running the model n + 2 times - count running it twice) / "
             "n, n = 8, in processes forked from one that loaded the model, twice: ± half the gap between the two "
             "(onnxruntime's count moves by up to a few hundred instructions with its heap addresses). Same input "
             "for all (test image 0). MACs: the multiply-accumulates of every conv2d, linear and matmul layer; "
             "instructions per MAC are end to end, not attributed to layers. bitexact: the board's outputs through "
             "RPC equal the host twin's bit for bit (the bench's images).", "",
             "| model | board | size | W/A | " + " | ".join(f"{LABELS[e]} instructions" for e in ENGINES)
             + " | MACs | " + " | ".join(f"{LABELS[e]} instr/MAC" for e in ENGINES)
             + " | hyq / ort FP32 | hyq / ort int8 | bitexact |",
             "|---" * 14 + "|"]
    for r in rows:
        cal = r["calibration"]
        lines.append(f"| {r['model']} | {r['board']} (EMULATED, -cpu {r['qemu_cpu']}) | {r['img_size']} | "
                     f"{cal['method']} W{cal['wbits']}A{cal['abits']} | "
                     + " | ".join(_count(r, e) for e in ENGINES) + f" | {r['macs']:,} | "
                     + " | ".join(f"{r['instructions_per_mac'][e]:.3f}" for e in ENGINES)
                     + f" | {r['hyq_over_ort_fp32']:.3f} | {r['hyq_over_ort_int8']:.3f} | "
                     f"{'yes' if r['bitexact'] else 'NO'} ({r['bitexact_images']}/{r['images']}) |")
    lines += ["", "## Where the instructions are (EMULATED)", "",
              "Per inference, in the engine's own code and libm (hyq-tvm: model.so, in the process above and through "
              "RPC on the board as the bench stage counts it, 4 threads; onnxruntime: its libraries), in hyq-tvm's "
              "TVM runtime (libtvm_runtime.so: the Relax VM, workspace allocation and parallel launches the kernels "
              "call back into), and in the whole process (with the Python interpreter).", "",
              "| model | size | hyq-tvm model.so + libm | (through RPC) | hyq-tvm libtvm_runtime | hyq-tvm process | "
              "ort FP32 onnxruntime + libm | ort FP32 process | ort int8 onnxruntime + libm | ort int8 process |",
              "|---" * 10 + "|"]
    lines += [f"| {r['model']} | {r['img_size']} | {r['own_instructions']['hyq_int8']:,} | "
              f"{r['hyq_int8_rpc_instructions']:,} | {r['hyq_int8_runtime_instructions']:,} | "
              f"{r['process_instructions']['hyq_int8']:,} | {r['own_instructions']['ort_fp32']:,} | "
              f"{r['process_instructions']['ort_fp32']:,} | {r['own_instructions']['ort_int8']:,} | "
              f"{r['process_instructions']['ort_int8']:,} |" for r in rows]
    for r in rows:
        kernels = ", ".join(f"{op} {n}" for op, n in r["ort_int8_kernels"].items())
        lines += ["", f"## {r['model']}, {r['img_size']} px: MACs per layer ({len(r['layers'])} layers)", "",
                  f"onnxruntime {r['versions']['onnxruntime']}, TVM {r['versions']['tvm']}. onnxruntime's optimized "
                  f"int8 graph (the kernels it runs): {kernels}.", "",
                  "| layer | op | MACs | share % |", "|---|---|---|---|"]
        lines += [f"| {layer['layer']} | {layer['op']} | {layer['macs']:,} | {100 * layer['macs'] / r['macs']:.2f} |"
                  for layer in r["layers"]]
    return "\n".join(lines) + "\n"


def compare_ort(bench_row: dict, artifact: Path, reports: Path = Path("reports"), state_file: Path | None = None,
                data: str | None = None, n: int = 8,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Count hyq-tvm, onnxruntime FP32 and int8 on the board of a bench row, add MACs, write the board's report;
    the row."""
    from ..quant.plan import QuantPlan
    from .macs import layer_macs

    if bench_row.get("instructions") is None:
        raise HyqError(f"the bench counted no hyq-tvm instructions: {bench_row.get('instructions_note')}")
    board = board_of(bench_row, state_file)
    art = load_artifact(Path(artifact))
    plan = QuantPlan.load(art.path / art.meta["files"]["plan"])
    x = first_image(plan.model, data)
    with tempfile.TemporaryDirectory() as scratch:
        log("exporting the ONNX models onnxruntime runs (the plan's QDQ model and the FP32 model)")
        qdq, fp32 = onnx_models(art, plan, Path(scratch))
        runs = {"hyq_int8": ("tvm", art.library), "ort_fp32": ("ort", fp32), "ort_int8": ("ort", qdq)}
        counted = {}
        for e, (engine, model) in runs.items():
            log(f"counting {LABELS[e]} on the emulated {board} (twice, under qemu with the counting plugin)")
            counted[e] = {k: engine_instructions(engine, model, x, board, code[engine], n)
                          for k, code in (("native", NATIVE), ("own", OWN))}
            log(f"{LABELS[e]}: {counted[e]['native']['code']['instructions']:,} instructions per inference, "
                f"{counted[e]['own']['code']['instructions']:,} in its own code and libm")
    runtime = engine_instructions("tvm", art.library, x, board, RUNTIME, n)["code"]["instructions"]
    layers = layer_macs(plan.model, plan.calibration.get("mode", "partial"))
    versions = {"onnxruntime": ort_version(rootfs_dir()), "tvm": art.meta.get("versions", {}).get("tvm")}
    row = benchmark_row(bench_row, board, plan, counted, runtime, layers, versions)
    row["reports"] = [str(p) for p in write_reports(Path(reports), board, row)]
    return row
