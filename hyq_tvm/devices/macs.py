"""Multiply-accumulates per inference of a plan's model: one entry per conv2d, linear and matmul layer of the
plan, named as in the plan, from the shapes one batch-1 forward pass sees."""
from __future__ import annotations

import math

import torch

from ..quant.modules import QuantLayer, QuantMatMul, quant_layers
from ..quant.prepare import prepared_model


def _layer_macs(layer, inputs: tuple, out: torch.Tensor) -> int:
    """MACs of one call: every output element accumulates one product per input it reduces over."""
    if isinstance(layer, QuantMatMul):
        return out.numel() * inputs[0].shape[-1]
    inner = layer.inner
    if layer.op == "linear":
        return out.numel() * inner.in_features
    return out.numel() * (inner.in_channels // inner.groups) * math.prod(inner.kernel_size)


@torch.no_grad()
def layer_macs(plan_model: dict, mode: str = "partial", weights=None) -> list[dict]:
    """[{"layer", "op", "macs"}] of every conv2d, linear and matmul of the model in forward order, for a
    batch-1 input of the plan's size (plan_model: a QuantPlan's "model" section)."""
    model, _ = prepared_model(plan_model["name"], weights, mode, plan_model["img_size"])
    rows: list[dict] = []

    def record(name):
        return lambda layer, inputs, out: rows.append({"layer": name, "op": layer.op,
                                                       "macs": _layer_macs(layer, inputs, out)})

    handles = [layer.register_forward_hook(record(name)) for name, layer in quant_layers(model).items()
               if isinstance(layer, (QuantLayer, QuantMatMul))]
    try:
        model.eval()(torch.zeros(plan_model["input_shape"]))
    finally:
        for h in handles:
            h.remove()
    return rows
