"""Host latency of an artifact's integer graph against the alternatives (onnxruntime QDQ and FP32, PyTorch FP32
and fake-quant), measured in one process on the same input."""
from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import HyqError


def median_ms(run: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median wall time of `run()` in milliseconds over `repeat` calls, after `warmup` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def runners(artifact: Path, threads: int, scratch: Path, weights: str | None = None) -> tuple[dict[str, Callable[[np.ndarray], object]], object]:
    """One batch-1 inference function per engine, by name, and the artifact's QuantPlan."""
    import torch
    import tvm
    from tvm import relax

    from .artifact import load_artifact
    from .onnx_qdq import export_onnx, onnx_session
    from .quant.plan import QuantPlan
    from .quant.prepare import quantized_model
    from .targets import host_arch
    from .zoo import load_model

    art = load_artifact(artifact)
    if art.arch != host_arch():
        raise HyqError(f"{artifact} is built for {art.arch}, not this {host_arch()} machine: compile it with"
                       f" --target host to compare on the host, or use python -m hyq_tvm.bench for the device")
    plan = QuantPlan.load(art.path / art.meta["files"]["plan"])
    qdq = art.path / art.meta["files"]["onnx"] if "onnx" in art.meta["files"] else export_onnx(plan, scratch / "qdq.onnx", weights)
    torch.set_num_threads(threads)
    fp32, _ = load_model(plan.model["name"], weights, plan.model["img_size"])
    fp32_onnx = scratch / "fp32.onnx"
    torch.onnx.export(fp32, (torch.zeros(plan.model["input_shape"]),), str(fp32_onnx), dynamo=True,
                      input_names=["input"], verbose=False)
    fakequant = quantized_model(plan, weights).eval()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(art.library)), tvm.cpu())
    sessions = {name: onnx_session(path, threads) for name, path in (("qdq", qdq), ("fp32", fp32_onnx))}

    def torch_run(model):
        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x))
        return run

    return {"tvm_int8": lambda x: vm["main"](tvm.runtime.tensor(x)),
            "onnxruntime_qdq": lambda x: sessions["qdq"].run(None, {"input": x}),
            "onnxruntime_fp32": lambda x: sessions["fp32"].run(None, {"input": x}),
            "pytorch_fp32": torch_run(fp32), "pytorch_fakequant": torch_run(fakequant)}, plan


def compare(artifact: Path, threads: int, repeat: int, weights: str | None = None) -> dict:
    """Median latency of every engine on one proxy-sized input, and its ratio to the TVM graph."""
    with tempfile.TemporaryDirectory() as scratch:
        engines, plan = runners(artifact, threads, Path(scratch), weights)
        x = np.random.default_rng(0).normal(size=plan.model["input_shape"]).astype(np.float32)
        latency = {name: round(median_ms(lambda: run(x), repeat), 3) for name, run in engines.items()}
    base = latency["tvm_int8"]
    return {"model": plan.model["name"], "wbits": plan.calibration["wbits"], "abits": plan.calibration["abits"],
            "method": plan.calibration["method"], "input_shape": plan.model["input_shape"], "threads": threads,
            "repeat": repeat, "cpu": platform.processor() or platform.machine(),
            "engines": [{"engine": name, "latency_ms_median": ms, "ratio_to_tvm": round(ms / base, 3)}
                        for name, ms in latency.items()]}
