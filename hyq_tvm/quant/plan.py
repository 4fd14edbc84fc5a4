"""QuantPlan: the versioned JSON contract between the quantizer and the compiler.

For every quantized layer (keyed by its module path in the timm model, see modules.py) it holds the
quantizer of each activation input and of the folded weight: bits, scheme, granularity, axis,
scales and zero points. It also names the model, its input, its weights (SHA-256) and how it was
calibrated, so a plan cannot silently be applied to another model or other weights.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HyqError
from ..fileio import write_json
from .modules import QuantAct, QuantMatMul, quant_layers
from .quantizer import QuantParams, QuantSpec, qrange

FORMAT = "hyq-tvm/quantplan"
VERSION = 1
OPS = ("conv2d", "linear", "matmul", "norm", "softmax")
WEIGHTED_OPS = ("conv2d", "linear")


@dataclass
class QuantPlan:
    """Per-layer quantization parameters of one model, with their provenance."""

    model: dict[str, Any]
    calibration: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    bridge_blocks: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def save(self, path: str | Path) -> None:
        """Write the plan atomically."""
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "QuantPlan":
        """Read and validate a plan file."""
        path = Path(path)
        if not path.is_file():
            raise HyqError(f"plan {path} does not exist; make one with `python -m hyq_tvm.calibrate`")
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HyqError(f"plan {path} is not valid JSON ({err})") from None
        return cls.from_json(obj, str(path))

    @classmethod
    def from_json(cls, obj: Any, where: str = "plan") -> "QuantPlan":
        """A plan from its JSON form; a HyqError names the first thing wrong with it."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise HyqError(f"{where} is not a hyq-tvm QuantPlan (format must be {FORMAT!r})")
        if obj.get("version") != VERSION:
            raise HyqError(f"{where} has plan version {obj.get('version')!r}; this hyq-tvm reads version {VERSION}")
        for key, kind in (("model", dict), ("calibration", dict), ("layers", dict), ("bridge_blocks", list)):
            if not isinstance(obj.get(key), kind):
                raise HyqError(f"{where}: {key!r} is missing or not a {kind.__name__}")
        for key in ("name", "num_classes", "img_size", "input_shape", "weights_sha256"):
            if key not in obj["model"]:
                raise HyqError(f"{where}: model.{key} is missing")
        if obj["calibration"].get("mode", "partial") not in ("partial", "full"):
            raise HyqError(f"{where}: calibration.mode must be 'partial' or 'full'")
        if not obj["layers"]:
            raise HyqError(f"{where} quantizes no layer")
        for name, layer in obj["layers"].items():
            _check_layer(layer, f"{where}: layer {name!r}")
        return cls(obj["model"], obj["calibration"], obj["layers"], obj["bridge_blocks"])


def _check_tensor(t: Any, where: str) -> None:
    if not isinstance(t, dict):
        raise HyqError(f"{where} is not an object")
    for key in ("bits", "symmetric", "granularity", "axis", "scale", "zero_point"):
        if key not in t:
            raise HyqError(f"{where}: {key!r} is missing")
    bits = t["bits"]
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise HyqError(f"{where}: bits must be 2 to 8, got {bits!r}")
    if t["granularity"] not in ("tensor", "channel"):
        raise HyqError(f"{where}: granularity must be 'tensor' or 'channel', got {t['granularity']!r}")
    scale, zero = t["scale"], t["zero_point"]
    if not isinstance(scale, list) or not isinstance(zero, list) or len(scale) != len(zero) or not scale:
        raise HyqError(f"{where}: scale and zero_point must be non-empty lists of one length")
    if t["granularity"] == "tensor" and len(scale) != 1:
        raise HyqError(f"{where}: a per-tensor quantizer has exactly one scale, found {len(scale)}")
    if not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in scale):
        raise HyqError(f"{where}: every scale must be a positive finite number")
    qmin, qmax = qrange(bits)
    if not all(isinstance(z, int) and qmin <= z <= qmax for z in zero):
        raise HyqError(f"{where}: zero points must be integers in [{qmin}, {qmax}]")
    if t["symmetric"] and any(zero):
        raise HyqError(f"{where}: a symmetric quantizer has zero points of 0")


def _check_layer(layer: Any, where: str) -> None:
    if not isinstance(layer, dict) or layer.get("op") not in OPS:
        raise HyqError(f"{where}: op must be one of {', '.join(OPS)}")
    inputs = layer.get("inputs")
    expected = 2 if layer["op"] == "matmul" else 1
    if not isinstance(inputs, list) or len(inputs) != expected:
        raise HyqError(f"{where}: a {layer['op']} layer has {expected} quantized input(s)")
    for i, t in enumerate(inputs):
        _check_tensor(t, f"{where} input {i}")
    if layer["op"] in WEIGHTED_OPS:
        _check_tensor(layer.get("weight"), f"{where} weight")
    elif layer.get("weight") is not None:
        raise HyqError(f"{where}: a {layer['op']} has no weight quantizer")


def params_to_json(p: QuantParams) -> dict[str, Any]:
    return {"bits": p.spec.bits, "symmetric": p.spec.symmetric, "granularity": p.spec.granularity,
            "axis": p.spec.axis, "scale": [float(s) for s in p.scale.reshape(-1)],
            "zero_point": [int(z) for z in p.zero_point.reshape(-1)]}


def params_from_json(t: dict[str, Any]) -> QuantParams:
    spec = QuantSpec(t["bits"], t["symmetric"], t["axis"] if t["granularity"] == "channel" else None)
    scale = torch.tensor(t["scale"], dtype=torch.float32)
    zero = torch.tensor(t["zero_point"], dtype=torch.int64)
    if spec.axis is None:
        scale, zero = scale.reshape(()), zero.reshape(())
    return QuantParams(spec, scale, zero)


def layers_to_json(model: nn.Module, bridges: list) -> dict[str, dict[str, Any]]:
    """The calibrated quantizers of a prepared model, as plan entries (with the index of their bridge block)."""
    out = {}
    for name, layer in quant_layers(model).items():
        if isinstance(layer, QuantMatMul):
            out[name] = {"op": "matmul", "inputs": [params_to_json(p) for p in layer.acts], "weight": None}
        elif isinstance(layer, QuantAct):
            out[name] = {"op": layer.op, "inputs": [params_to_json(layer.act)], "weight": None}
        else:
            out[name] = {"op": layer.op, "inputs": [params_to_json(layer.act)],
                         "weight": params_to_json(layer.weight)}
        out[name]["bridge"] = next((i for i, b in enumerate(bridges) if b.contains(name)), None)
    return out


def check_weights(plan: QuantPlan, weights_sha256: str | None) -> None:
    """A HyqError unless the plan was calibrated for the weights with this SHA-256 (None: not checked)."""
    if weights_sha256 is not None and plan.model["weights_sha256"] != weights_sha256:
        raise HyqError(f"the plan was calibrated for other weights (sha256 {plan.model['weights_sha256'][:12]}...,"
                       f" these are {weights_sha256[:12]}...); calibrate again for these weights")


def apply_plan(model: nn.Module, plan: QuantPlan, weights_sha256: str | None) -> None:
    """Load the plan's quantizers into a prepared model and enable them all."""
    check_weights(plan, weights_sha256)
    layers = quant_layers(model)
    missing = sorted(set(layers) - set(plan.layers))
    extra = sorted(set(plan.layers) - set(layers))
    if missing or extra:
        what = f"has no entry for layer {missing[0]!r}" if missing else f"names unknown layer {extra[0]!r}"
        raise HyqError(f"the plan does not fit {plan.model['name']}: it {what}")
    for name, layer in layers.items():
        entry = plan.layers[name]
        if entry["op"] != layer.op:
            raise HyqError(f"the plan does not fit: layer {name!r} is a {layer.op}, the plan says {entry['op']}")
        acts = [params_from_json(t) for t in entry["inputs"]]
        if isinstance(layer, QuantMatMul):
            layer.acts = acts
        elif isinstance(layer, QuantAct):
            layer.act = acts[0]
        else:
            layer.act, layer.weight = acts[0], params_from_json(entry["weight"])
            channels = layer.inner.weight.shape[0]
            if layer.weight.scale.numel() not in (1, channels):
                raise HyqError(f"the plan does not fit: layer {name!r} has {channels} output channels,"
                               f" the plan {layer.weight.scale.numel()} weight scales")
        layer.enabled = True
