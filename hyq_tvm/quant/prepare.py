"""Prepare and convert: a zoo model with quantizers attached, and the same model quantized by a plan
(the PT2E prepare / convert pair of this project)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import zoo
from .modules import prepare
from .tensors import add_tensor_quantizers
from .plan import QuantPlan, apply_plan


def prepared_model(name: str, weights: str | Path | None, mode: str = "partial", img_size: int | None = None
                   ) -> tuple[nn.Module, zoo.ModelInfo]:
    """The model with its weights, for `img_size` inputs (default: the checkpoint's), BN folded and
    quantizers attached (all disabled)."""
    model, info = zoo.load_model(name, weights, img_size)
    example = torch.zeros(1, 3, info.img_size, info.img_size)
    prepare(model, example, mode)
    if mode == "integer":
        add_tensor_quantizers(model, example)
    return model, info


def quantized_model(plan: QuantPlan, weights: str | Path | None = None) -> nn.Module:
    """The plan's model with its weights, every quantizer loaded from the plan and enabled."""
    model, info = prepared_model(plan.model["name"], weights, plan.calibration.get("mode", "partial"),
                                 plan.model["img_size"])
    apply_plan(model, plan, info.weights_sha256)
    return model
