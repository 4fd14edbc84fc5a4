"""Integer mode: a quantizer on every tensor that flows between layers.

Every call of a computing torch function (COMPUTE: adds, products, activations, pooling, interpolation, ...)
made by a module of the model, outside the quantized modules themselves, and every output of a quantized module
(QuantLayer, QuantMatMul, QuantAct) is a *producer*. A producer gets its own per-tensor quantizer, a
`QuantAct("tensor")`, unless every consumer of its value is the quantized input of a layer that takes it as is
(not through a reshape or permute), which quantizes it already. The model's output counts as a consumer in float.
So in the exported graph every float op sits between dequantized int8 inputs and a quantized output.

A functional producer's quantizer is a child of the innermost module that made the call, named `<kind><i>` (the
i-th call of that kind in one forward of that module: `blocks.0.add0`); a quantized module's is its child
`output`. Layout functions (view, permute, split, ...) move quantized values unchanged.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .modules import QuantAct, QuantLayer, QuantMatMul

# torch functions (by name, without underscores and in-place / reflected marks) whose float output is quantized
COMPUTE = frozenset({
    "add", "sub", "rsub", "mul", "div", "truediv", "cat", "concat", "mean", "sum",
    "silu", "gelu", "relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leakyrelu",
    "softmax", "avgpool2d", "adaptiveavgpool2d", "interpolate", "batchnorm", "layernorm", "groupnorm",
})


def compute_kind(func) -> str | None:
    """The COMPUTE name of a torch function, None for any other (layout, size queries, ...)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        name = name[1:] if name[:1] in "ir" and name[1:] in COMPUTE else name
    name = name.rstrip("_").replace("_", "")
    return name if name in COMPUTE else None


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a value, a list or tuple of values, or a dict of them."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


@dataclass
class _Census:
    """What one counting forward saw: who produced each live tensor, and which producers need a quantizer."""

    sources: dict[int, tuple[tuple[str, str], bool]] = field(default_factory=dict)  # id -> (producer, via layout)
    alive: list[torch.Tensor] = field(default_factory=list)  # keeps ids unique during the pass
    producers: list[tuple[str, str]] = field(default_factory=list)
    needed: set[tuple[str, str]] = field(default_factory=set)

    def produce(self, out, key: tuple[str, str]) -> None:
        self.producers.append(key)
        for t in _tensors(out):
            self.sources[id(t)] = (key, False)
            self.alive.append(t)

    def derive(self, args, out) -> None:
        """Outputs of a layout function carry its first tracked input's producer."""
        source = next((self.sources[id(t)] for t in _tensors(args) if id(t) in self.sources), None)
        if source is None:
            return
        for t in _tensors(out):
            if id(t) not in self.sources:
                self.sources[id(t)] = (source[0], True)
                self.alive.append(t)

    def consume(self, args, as_layer_input: bool = False) -> None:
        for t in _tensors(args):
            source = self.sources.get(id(t))
            if source is not None and not (as_layer_input and not source[1]):
                self.needed.add(source[0])


class TensorRouter(TorchFunctionMode):
    """Quantizes the outputs of the producers of a prepared model (or, while counting, takes its census).

    Active while any module of the model runs (entered by the outermost module's forward pre-hook); the
    inside of quantized modules is left alone.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.stack: list[tuple[str, Counter]] = []
        self.opaque = 0
        self.census: _Census | None = None
        self.routes: dict[tuple[str, str], QuantAct] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.opaque or not self.stack:
            return out
        kind = compute_kind(func)
        if kind is None or not (torch.is_tensor(out) and out.is_floating_point()):
            if self.census is not None:
                self.census.derive((args, kwargs), out)
            return out
        module, counts = self.stack[-1]
        key = (module, f"{kind}{counts[kind]}")
        counts[kind] += 1
        if self.census is not None:
            self.census.consume((args, kwargs))
            self.census.produce(out, key)
            return out
        quant = self.routes.get(key)
        return quant(out) if quant is not None else out

    # -- module hooks ----------------------------------------------------------------------------------------

    def enter(self, name: str) -> None:
        if not self.stack and not self.opaque:
            self.__enter__()
        self.stack.append((name, Counter()))

    def leave(self, out):
        self.stack.pop()
        if not self.stack and not self.opaque:
            self.__exit__(None, None, None)
            if self.census is not None:
                self.census.consume(out)
        return out

    def enter_layer(self, args) -> None:
        if self.census is not None:
            self.census.consume(args, as_layer_input=True)
        self.opaque += 1

    def leave_layer(self, name: str, out):
        try:
            if self.census is not None:
                self.census.produce(out, (name, "output"))
                return out
            quant = self.routes.get((name, "output"))
            return quant(out) if quant is not None else out
        finally:
            self.opaque -= 1

    @torch.no_grad()
    def take_census(self, example: torch.Tensor) -> list[tuple[str, str]]:
        """The producers that need a quantizer, in the order a forward on `example` makes them."""
        self.census = _Census()
        try:
            self.model(example)
            census = self.census
        finally:
            self.census = None
        return [key for key in dict.fromkeys(census.producers) if key in census.needed]


QUANTIZED = (QuantLayer, QuantMatMul, QuantAct)


def add_tensor_quantizers(model: nn.Module, example: torch.Tensor) -> TensorRouter:
    """Give every producer of a prepared model that needs one a (disabled) tensor quantizer; installs the router."""
    router = TensorRouter(model)
    quantized = [name + "." for name, m in model.named_modules() if isinstance(m, QUANTIZED)]
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            module.register_forward_pre_hook(lambda _, args: router.enter_layer(args))
            module.register_forward_hook(lambda _, __, out, n=name: router.leave_layer(n, out), always_call=True)
        elif not any(name.startswith(q) for q in quantized):
            module.register_forward_pre_hook(lambda _, __, n=name: router.enter(n))
            module.register_forward_hook(lambda _, __, out, n=name: router.leave(out), always_call=True)
    modules = dict(model.named_modules())
    for owner, child in router.take_census(example):
        quant = QuantAct("tensor", None)
        modules[owner].add_module(child, quant)
        router.routes[(owner, child)] = quant
    return router
