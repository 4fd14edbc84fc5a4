"""Host latency of an artifact's TVM library against the alternatives (onnxruntime on the plan's QDQ model with
int8 and with uint8 activations, onnxruntime FP32, PyTorch FP32): batch 1, the same input, each thread count in
a fresh process; and the host artifacts it times, calibrated and compiled once and kept in a work folder."""
from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import HyqError
from .fileio import sha256_file

ENGINES = ("hyq_int8", "ort_qdq", "ort_qdq_u8", "ort_fp32", "torch_fp32")
PLAN = "plan.json"
ARTIFACT = "artifact"


def median_ms(run: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median wall time of `run()` in milliseconds over `repeat` calls, after `warmup` calls, with Python's garbage
    collector paused (as timeit does: its passes over the heap of torch's objects are not the engine's time)."""
    for _ in range(warmup):
        run()
    times = []
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    finally:
        if collecting:
            gc.enable()
    return float(np.median(times) * 1e3)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _key(name: str, img_size: int, wbits: int, abits: int, mode: str = "partial") -> str:
    return f"{name}-{img_size}-w{wbits}a{abits}" + ("" if mode == "partial" else f"-{mode}")


def calibrated_plan(name: str, img_size: int | None, bits: int, weights: str | None, work_dir: Path,
                    mode: str = "partial") -> Path:
    """The file of the Q-HyViT W{bits}A{bits} plan of `name` in `mode` for `img_size` inputs (default: the
    checkpoint's) and `weights`, calibrated once and kept in work_dir/MODEL-SIZE-wBaB[-MODE]/."""
    from .quant.calibrate import calibrate
    from .quant.plan import QuantPlan
    from .zoo import load_model

    info = load_model(name, weights, img_size)[1]
    path = work_dir / _key(name, info.img_size, bits, bits, mode) / PLAN
    if path.is_file() and QuantPlan.load(path).model["weights_sha256"] == info.weights_sha256:
        return path
    print(f"calibrating {name} (Q-HyViT W{bits}A{bits} {mode}, {info.img_size}x{info.img_size}) -> {path}", flush=True)
    calibrate(name, weights, method="qhyvit", wbits=bits, abits=bits, img_size=info.img_size, mode=mode)[0].save(path)
    return path


def kept_plan(plan, weights: str | None, work_dir: Path) -> Path:
    """The file of a given QuantPlan (checked against `weights`), kept in work_dir/MODEL-SIZE-wWaA-plan-HASH/."""
    from . import zoo
    from .quant.plan import check_weights

    checkpoint = Path(weights) if weights else zoo.proxy_checkpoint(plan.model["name"])
    check_weights(plan, sha256_file(checkpoint) if checkpoint.is_file() else None)
    digest = hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    m, c = plan.model, plan.calibration
    path = work_dir / f"{_key(m['name'], m['img_size'], c['wbits'], c['abits'], c.get('mode', 'partial'))}-plan-{digest}" / PLAN
    if not path.is_file():
        plan.save(path)
    return path


def compiled_artifact(plan_file: Path, weights: str | None) -> Path:
    """The host artifact (TVM library and QDQ ONNX model) of the plan in `plan_file`, compiled into the folder
    `artifact` beside it once per plan and compiler source (artifact.compiler_fingerprint)."""
    from .artifact import METADATA, compiler_fingerprint
    from .build import compile_plan
    from .quant.plan import QuantPlan

    out = plan_file.parent / ARTIFACT
    meta = json.loads((out / METADATA).read_text()) if (out / METADATA).is_file() else {}
    files = meta.get("files", {})
    if {"library", "onnx"} <= set(files) and meta.get("versions", {}).get("compiler") == compiler_fingerprint() \
            and json.loads((out / files["plan"]).read_text()) == json.loads(plan_file.read_text()):
        return out
    print(f"compiling {plan_file} for the host -> {out}", flush=True)
    return compile_plan(QuantPlan.load(plan_file), "host", out, weights, progress=True, emit=("tvm", "onnx"))


@dataclass(frozen=True)
class EngineFiles:
    """What the engines load: the TVM library, the plan's QDQ ONNX models (int8 and uint8 activations), the
    FP32 ONNX model, and the model facts and checkpoint PyTorch builds the FP32 model from."""

    library: Path
    qdq: Path
    qdq_u8: Path
    fp32: Path
    model: dict
    weights: str | None


def _export_fp32(model: dict, weights: str | None, path: Path) -> Path:
    """Write the FP32 model's ONNX export to `path`; returns it."""
    import torch

    from .zoo import load_model

    fp32 = load_model(model["name"], weights, model["img_size"])[0]
    torch.onnx.export(fp32, (torch.zeros(model["input_shape"]),), str(path), dynamo=True, input_names=["input"],
                      verbose=False)
    return path


def export_engines(artifact, plan, scratch: Path, weights: str | None) -> EngineFiles:
    """The engines' files for an artifact and its plan, the ONNX exports it lacks written to `scratch`."""
    from .onnx_qdq import export_onnx

    files = artifact.meta["files"]
    print("exporting the ONNX models onnxruntime runs", flush=True)
    qdq = artifact.path / files["onnx"] if "onnx" in files else export_onnx(plan, scratch / "qdq.onnx", weights)
    return EngineFiles(artifact.library, qdq, export_onnx(plan, scratch / "qdq_u8.onnx", weights, "uint8"),
                       _export_fp32(plan.model, weights, scratch / "fp32.onnx"), plan.model, weights)


def _runners(files: EngineFiles, threads: int) -> dict[str, Callable[[np.ndarray], object]]:
    """One batch-1 inference function per engine, by name (ENGINES)."""
    import torch
    import tvm
    from tvm import relax

    from .onnx_qdq import onnx_session
    from .zoo import load_model

    torch.set_num_threads(threads)
    fp32 = load_model(files.model["name"], files.weights, files.model["img_size"])[0]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(files.library)), tvm.cpu())
    sessions = {name: onnx_session(path, threads) for name, path in
                (("ort_qdq", files.qdq), ("ort_qdq_u8", files.qdq_u8), ("ort_fp32", files.fp32))}

    def torch_run(x):
        with torch.inference_mode():
            return fp32(torch.from_numpy(x))

    def ort_run(name):
        return lambda x: sessions[name].run(None, {"input": x})

    return {"hyq_int8": lambda x: vm["main"](tvm.runtime.tensor(x)), **{name: ort_run(name) for name in sessions},
            "torch_fp32": torch_run}


def time_engines(files: EngineFiles, threads: int, repeat: int) -> dict:
    """`{ENGINE}_ms`: the median latency of every engine on one input with `threads` threads, and
    `peak_rss_mb`: this process's peak resident memory. Call it in a fresh process: TVM sizes its thread
    pool once, from TVM_NUM_THREADS."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    engines = _runners(files, threads)
    x = np.random.default_rng(0).normal(size=files.model["input_shape"]).astype(np.float32)
    out = {}
    for name, run in engines.items():
        out[f"{name}_ms"] = round(median_ms(lambda: run(x), repeat), 3)
        print(f"{files.model['name']} {files.model['img_size']}px, {threads} thread(s): {name:10s}"
              f" {out[f'{name}_ms']:9.3f} ms", flush=True)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _time_in_fresh_process(files: EngineFiles, threads: int, repeat: int) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(time_engines, files, threads, repeat).result()


def _row(artifact, plan, threads: int, repeat: int, timed: dict) -> dict:
    """A report row: the timings, the ratio of hyq-tvm to the fastest other engine, the facts of the run."""
    others = {name: timed[f"{name}_ms"] for name in ENGINES if name != "hyq_int8"}
    fastest = min(others, key=others.get)
    return {"model": plan.model["name"], "img_size": plan.model["img_size"], "threads": threads,
            "method": plan.calibration["method"], "mode": plan.calibration.get("mode", "partial"),
            "wbits": plan.calibration["wbits"],
            "abits": plan.calibration["abits"], "repeat": repeat, **timed,
            "ratio_to_fastest": round(timed["hyq_int8_ms"] / others[fastest], 3), "fastest": fastest,
            "artifact_bytes": artifact.library.stat().st_size, "schedules": artifact.meta.get("schedules"),
            "cpu": cpu_name()}


def benchmark(artifact_dir: Path, threads: Sequence[int], repeat: int, weights: str | None = None) -> list[dict]:
    """One row per thread count: the median batch-1 latency of the host artifact's TVM library and of the
    alternatives (ENGINES), each thread count timed in a fresh process."""
    from .artifact import load_artifact
    from .quant.plan import QuantPlan
    from .targets import host_arch

    art = load_artifact(artifact_dir)
    if art.arch != host_arch():
        raise HyqError(f"{artifact_dir} is built for {art.arch}, not this {host_arch()} machine: compile it with"
                       f" --target host to compare on the host, or use python -m hyq_tvm.bench for the device")
    plan = QuantPlan.load(art.path / art.meta["files"]["plan"])
    with tempfile.TemporaryDirectory() as scratch:
        files = export_engines(art, plan, Path(scratch), weights)
        return [_row(art, plan, t, repeat, _time_in_fresh_process(files, t, repeat)) for t in threads]
