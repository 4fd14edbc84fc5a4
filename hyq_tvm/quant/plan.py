"""QuantPlan: the versioned JSON contract between the quantizer and the compiler.

For every quantized layer (keyed by its module path in the timm model, see modules.py) it holds the
quantizer of each activation input and of the folded weight: bits, scheme, granularity, axis,
scales and zero points. It also names the model, its input, its weights (SHA-256) and how it was
calibrated, so a plan cannot silently be applied to another model or other weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HyqError
from ..fileio import write_json
from .modules import MODES, QuantAct, QuantMatMul, quant_layers
from .quantizer import GRANULARITIES, MAX_BITS, MIN_BITS, QuantParams, QuantSpec, qrange

FORMAT = "hyq-tvm/quantplan"
VERSION = 1
OPS = ("conv2d", "linear", "matmul", "norm", "softmax", "tensor")
WEIGHTED_OPS = ("conv2d", "linear")
MODEL_FIELDS = ("name", "num_classes", "img_size", "input_shape", "weights_sha256")


@dataclass(frozen=True)
class TensorQuant:
    """The quantizer of one tensor: x_q = clip(round(x / scale) + zero_point) on a `bits`-bit grid,
    one scale and zero point per tensor, or per channel along `axis`."""

    bits: int
    symmetric: bool
    granularity: str      # "tensor" or "channel"
    axis: int | None      # the channel axis (recorded for per-tensor ones too)
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise HyqError(f"bits must be {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise HyqError(f"granularity must be 'tensor' or 'channel', got {self.granularity!r}")
        if self.granularity == "channel" and not isinstance(self.axis, int):
            raise HyqError(f"a per-channel quantizer needs an integer axis, got {self.axis!r}")
        if len(self.scale) != len(self.zero_point) or not self.scale:
            raise HyqError("scale and zero_point must be non-empty lists of one length")
        if self.granularity == "tensor" and len(self.scale) != 1:
            raise HyqError(f"a per-tensor quantizer has exactly one scale, found {len(self.scale)}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in self.scale):
            raise HyqError("every scale must be a positive finite number")
        qmin, qmax = qrange(self.bits)
        if not all(isinstance(z, int) and qmin <= z <= qmax for z in self.zero_point):
            raise HyqError(f"zero points must be integers in [{qmin}, {qmax}]")
        if self.symmetric and any(self.zero_point):
            raise HyqError("a symmetric quantizer has zero points of 0")

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    @classmethod
    def from_params(cls, p: QuantParams) -> "TensorQuant":
        return cls(p.spec.bits, p.spec.symmetric, p.spec.granularity, p.spec.axis,
                   tuple(float(s) for s in p.scale.reshape(-1)), tuple(int(z) for z in p.zero_point.reshape(-1)))

    def params(self) -> QuantParams:
        """The quantizer as the fake-quant modules hold it."""
        spec = QuantSpec(self.bits, self.symmetric, self.axis if self.per_channel else None)
        scale = torch.tensor(self.scale, dtype=torch.float32)
        zero = torch.tensor(self.zero_point, dtype=torch.int64)
        if spec.axis is None:
            scale, zero = scale.reshape(()), zero.reshape(())
        return QuantParams(spec, scale, zero)


@dataclass(frozen=True)
class LayerQuant:
    """One quantized layer: its op, the quantizers of its activation inputs and of its folded weight, and
    the index of the bridge block it belongs to (None: none)."""

    op: str
    inputs: tuple[TensorQuant, ...]
    weight: TensorQuant | None = None
    bridge: int | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise HyqError(f"op must be one of {', '.join(OPS)}, got {self.op!r}")
        expected = 2 if self.op == "matmul" else 1
        if len(self.inputs) != expected:
            raise HyqError(f"a {self.op} layer has {expected} quantized input(s), found {len(self.inputs)}")
        if (self.weight is not None) != (self.op in WEIGHTED_OPS):
            raise HyqError(f"a {self.op} layer {'needs' if self.op in WEIGHTED_OPS else 'has no'} weight quantizer")


@dataclass
class QuantPlan:
    """Per-layer quantization parameters of one model, with their provenance."""

    model: dict[str, Any]
    calibration: dict[str, Any]
    layers: dict[str, LayerQuant]
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
        if not path.exists():
            raise HyqError(f"plan {path} does not exist; make one with `python -m hyq_tvm.calibrate`")
        if not path.is_file():
            raise HyqError(f"plan {path} is not a regular file; a plan is the JSON file `python -m hyq_tvm.calibrate`"
                           f" writes")
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HyqError(f"plan {path} is not valid JSON ({err})") from None
        return cls.from_json(obj, str(path))

    @classmethod
    def from_json(cls, obj: Any, where: str = "plan") -> "QuantPlan":
        """A plan from its JSON form; a HyqError names the first field that is wrong."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise HyqError(f"{where} is not a hyq-tvm QuantPlan (format must be {FORMAT!r})")
        if obj.get("version") != VERSION:
            raise HyqError(f"{where} has plan version {obj.get('version')!r}; this hyq-tvm reads version {VERSION}")
        for key, kind in (("model", dict), ("calibration", dict), ("layers", dict), ("bridge_blocks", list)):
            if not isinstance(obj.get(key), kind):
                raise HyqError(f"{where}: {key!r} is missing or not a {kind.__name__}")
        for key in MODEL_FIELDS:
            if key not in obj["model"]:
                raise HyqError(f"{where}: model.{key} is missing")
        if obj["calibration"].get("mode", "partial") not in MODES:
            raise HyqError(f"{where}: calibration.mode must be one of {', '.join(MODES)}")
        if not obj["layers"]:
            raise HyqError(f"{where} quantizes no layer")
        layers = {name: _layer_from_json(layer, f"{where}: layers.{name}") for name, layer in obj["layers"].items()}
        return cls(obj["model"], obj["calibration"], layers, obj["bridge_blocks"])


def _fields(obj: Any, kind, where: str) -> dict[str, Any]:
    """The JSON object `obj` as keyword arguments of the dataclass `kind`: every field present, no other."""
    if not isinstance(obj, dict):
        raise HyqError(f"{where} is not an object")
    fields = dataclasses.fields(kind)
    missing = [f.name for f in fields if f.name not in obj and f.default is dataclasses.MISSING]
    if missing:
        raise HyqError(f"{where}: field {missing[0]!r} is missing")
    unknown = sorted(set(obj) - {f.name for f in fields})
    if unknown:
        raise HyqError(f"{where}: unknown field {unknown[0]!r}")
    return dict(obj)


def _tensor_from_json(obj: Any, where: str) -> TensorQuant:
    args = _fields(obj, TensorQuant, where)
    for key in ("scale", "zero_point"):
        if not isinstance(args[key], (list, tuple)):
            raise HyqError(f"{where}.{key} must be a list")
        args[key] = tuple(args[key])
    try:
        return TensorQuant(**args)
    except HyqError as err:
        raise HyqError(f"{where}: {err}") from None


def _layer_from_json(obj: Any, where: str) -> LayerQuant:
    args = _fields(obj, LayerQuant, where)
    if not isinstance(args["inputs"], (list, tuple)):
        raise HyqError(f"{where}.inputs must be a list")
    args["inputs"] = tuple(_tensor_from_json(t, f"{where}.inputs[{i}]") for i, t in enumerate(args["inputs"]))
    if args.get("weight") is not None:
        args["weight"] = _tensor_from_json(args["weight"], f"{where}.weight")
    try:
        return LayerQuant(**args)
    except HyqError as err:
        raise HyqError(f"{where}: {err}") from None


def plan_layers(model: nn.Module, bridges: list) -> dict[str, LayerQuant]:
    """The calibrated quantizers of a prepared model, as plan layers (with the index of their bridge block)."""
    out = {}
    for name, layer in quant_layers(model).items():
        bridge = next((i for i, b in enumerate(bridges) if b.contains(name)), None)
        if isinstance(layer, QuantMatMul):
            inputs, weight = layer.acts, None
        elif isinstance(layer, QuantAct):
            inputs, weight = [layer.act], None
        else:
            inputs, weight = [layer.act], TensorQuant.from_params(layer.weight)
        out[name] = LayerQuant(layer.op, tuple(TensorQuant.from_params(p) for p in inputs), weight, bridge)
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
        if entry.op != layer.op:
            raise HyqError(f"the plan does not fit: layer {name!r} is a {layer.op}, the plan says {entry.op}")
        acts = [t.params() for t in entry.inputs]
        if isinstance(layer, QuantMatMul):
            layer.acts = acts
        elif isinstance(layer, QuantAct):
            layer.act = acts[0]
        else:
            layer.act, layer.weight = acts[0], entry.weight.params()
            channels = layer.inner.weight.shape[0]
            if layer.weight.scale.numel() not in (1, channels):
                raise HyqError(f"the plan does not fit: layer {name!r} has {channels} output channels,"
                               f" the plan {layer.weight.scale.numel()} weight scales")
        layer.enabled = True
