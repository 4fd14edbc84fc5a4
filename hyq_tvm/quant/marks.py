"""Marks that name the quantized inputs of a prepared model in an exported graph.

Within `marking(model)`, each QuantLayer, QuantMatMul and QuantAct computes its float op on inputs
passed through `hyq::mark(x, layer, role)`, an identity custom op that torch.export keeps. Roles:
"input0", "input1" (a matmul's second operand) and "weight" (the float weight of a conv2d / linear).
Compilers (the Relax importer, the ONNX export) turn each mark into the plan's quantizer of that input.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import nn

from .modules import QuantAct, QuantLayer, QuantMatMul, quant_layers

ROLES = ("input0", "input1", "weight")


@torch.library.custom_op("hyq::mark", mutates_args=())
def mark(x: torch.Tensor, layer: str, role: str) -> torch.Tensor:
    """Identity that names a quantized input of a plan layer in the exported graph."""
    return x.clone()


@mark.register_fake
def _(x: torch.Tensor, layer: str, role: str) -> torch.Tensor:
    return torch.empty_like(x)


def roles(op: str) -> tuple[str, ...]:
    """The marked inputs of a plan layer with op `op`."""
    return {"conv2d": ("input0", "weight"), "linear": ("input0", "weight"),
            "matmul": ("input0", "input1")}.get(op, ("input0",))


def _marked_forward(name: str, layer: nn.Module):
    """A forward computing the float op of `layer` on marked inputs."""
    if isinstance(layer, QuantLayer):
        return lambda x: layer._op(mark(x, name, "input0"), mark(layer.inner.weight, name, "weight"))
    if isinstance(layer, QuantMatMul):
        return lambda a, b: torch.matmul(mark(a, name, "input0"), mark(b, name, "input1"))
    if isinstance(layer, QuantAct) and layer.inner is not None:
        return lambda x: layer.inner(mark(x, name, "input0"))
    if isinstance(layer, QuantAct) and layer.call is None:
        return lambda x: mark(x, name, "input0")
    if isinstance(layer, QuantAct):
        func, rest, kwargs = layer.call
        return lambda x: func(mark(x, name, "input0"), *rest, **kwargs)
    raise TypeError(f"{name}: not a quantized module")


@contextlib.contextmanager
def marking(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every quantized module of a prepared model computes in float on marked inputs."""
    layers = quant_layers(model)
    for name, layer in layers.items():
        layer.forward = _marked_forward(name, layer)
    try:
        yield model
    finally:
        for layer in layers.values():
            del layer.forward


def export_marked(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The prepared model, every quantized input marked, exported with torch.export (eval mode)."""
    with marking(model.eval()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        return torch.export.export(model, (example,))
