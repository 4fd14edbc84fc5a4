"""Recording what flows through the quantizable layers of a prepared model."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .modules import quant_layers


@torch.no_grad()
def capture_inputs(model: nn.Module, images: torch.Tensor, names=None) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs of the named quantizable layers (all when None) in one forward pass over `images`."""
    layers = quant_layers(model)
    names = list(layers) if names is None else list(names)
    captured: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = [layers[n].register_forward_pre_hook(
        lambda _, args, n=n: captured.__setitem__(n, tuple(a.detach().clone() for a in args if torch.is_tensor(a)))) for n in names]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def first_input(module: nn.Module, run: Callable[[], object]) -> tuple[torch.Tensor, ...]:
    """The tensor arguments of `module`'s first call while `run()` executes."""
    captured: list[tuple[torch.Tensor, ...]] = []
    handle = module.register_forward_pre_hook(
        lambda _, args: captured.append(tuple(a.detach().clone() for a in args if torch.is_tensor(a))))
    try:
        run()
    finally:
        handle.remove()
    return captured[0]
