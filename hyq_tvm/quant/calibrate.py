"""Calibration: a model's QuantPlan from calibration images, by Q-HyViT or a baseline."""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from torch import nn

from .. import data, zoo
from ..errors import HyqError, check_positive
from .baselines.minmax import calibrate_minmax
from .plan import QuantPlan, plan_layers
from .modules import quant_layers
from .prepare import prepared_model
from .qhyvit import GRANULARITIES, SCHEMES, QHyViT, QHyViTConfig
from .quantizer import check_bits

METHODS = ("qhyvit", "minmax")


def calibration_bytes(model: nn.Module, img_size: int, method: str) -> int:
    """Bytes that each calibration image adds to the peak memory of `method` on a prepared model (measured on
    one image): the image, the inputs of every quantized layer and the activations of a forward pass (their
    outputs); for Q-HyViT also the loss gradients at those outputs and what autograd keeps for the backward
    pass (every leaf module's output)."""
    layers = set(quant_layers(model).values())
    sizes = {"inputs": 0, "outputs": 0, "leaves": 0}

    def count(module, args, out):
        if module in layers:
            sizes["inputs"] += sum(t.nbytes for t in args if torch.is_tensor(t))
            sizes["outputs"] += out.nbytes
        if torch.is_tensor(out) and next(module.children(), None) is None:
            sizes["leaves"] += out.nbytes

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    finally:
        for h in handles:
            h.remove()
    total = 3 * img_size * img_size * 4 + sizes["inputs"] + sizes["outputs"]
    return total + sizes["outputs"] + sizes["leaves"] if method == "qhyvit" else total


def available_bytes() -> int | None:
    """Memory still available to this process: MemAvailable of /proc/meminfo, or less under a cgroup v2 limit
    (containers); None where /proc/meminfo is missing."""
    try:
        available = int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())[1]) * 1024
    except (OSError, TypeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


def check_memory(model: nn.Module, img_size: int, method: str, images: int) -> None:
    """A HyqError, before any image is loaded, when calibrating on `images` images needs more memory than is
    available (calibration_bytes per image)."""
    per_image = calibration_bytes(model, img_size, method)
    available = available_bytes()
    if available is not None and per_image * images > available:
        raise HyqError(f"{method} calibration on {images} images of {img_size}x{img_size} needs about"
                       f" {per_image * images / 2 ** 30:.1f} GiB ({per_image / 2 ** 20:.1f} MiB per image), more than"
                       f" the {available / 2 ** 30:.1f} GiB of memory available: use fewer images")


def calibrate(name: str, weights: str | Path | None = None, dataset: str | Path | None = None,
              method: str = "qhyvit", wbits: int = 8, abits: int = 8, images: int = data.CALIBRATION_IMAGES,
              seed: int = 0, granularities=GRANULARITIES, schemes=SCHEMES, mode: str = "partial",
              progress: bool = True, img_size: int | None = None) -> tuple[QuantPlan, nn.Module]:
    """Calibrate `name` for `img_size` inputs (default: the checkpoint's) with `method`; returns the plan
    and the quantized (fake-quant) model."""
    check_positive(images, "--images")
    check_bits(wbits, "--wbits")
    check_bits(abits, "--abits")
    if method not in METHODS:
        raise HyqError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model, info = prepared_model(name, weights, mode, img_size)
    check_memory(model, info.img_size, method, images)
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
