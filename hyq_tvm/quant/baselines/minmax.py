"""MinMax: weights symmetric per output channel, activations asymmetric per tensor, over observed ranges."""
from __future__ import annotations

import torch
from torch import nn

from ..capture import capture_inputs
from ..modules import QuantAct, QuantMatMul, quant_layers
from ..quantizer import QuantSpec, minmax_params


@torch.no_grad()
def calibrate_minmax(model: nn.Module, images: torch.Tensor, wbits: int, abits: int) -> None:
    """Set every quantizer of a prepared model from the ranges seen on `images`; enables them all."""
    inputs = capture_inputs(model, images)
    act_spec = QuantSpec(abits, symmetric=False)
    for name, layer in quant_layers(model).items():
        if isinstance(layer, QuantMatMul):
            layer.acts = [minmax_params(act_spec, x) for x in inputs[name]]
        elif isinstance(layer, QuantAct):
            layer.act = minmax_params(act_spec, inputs[name][0])
        else:
            layer.act = minmax_params(act_spec, inputs[name][0])
            layer.weight = minmax_params(QuantSpec(wbits, True, 0), layer.folded_weight(layer.act))
        layer.enabled = True
