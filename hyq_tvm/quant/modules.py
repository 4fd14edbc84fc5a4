"""Quantized modules and the preparation of a timm model for quantization.

`prepare` folds every BatchNorm that directly follows a convolution into it, wraps every Conv2d and
Linear in a QuantLayer and gives every attention module one QuantMatMul per activation-by-activation
matmul it performs (q @ k^T, attn @ v), named `<attention>.matmul<i>` in call order. In full mode
(paper's Table III) the inputs of LayerNorm / GroupNorm modules and of attention softmaxes
(`<attention>.softmax<i>`) are quantized too (QuantAct); partial mode leaves them in float. Integer mode is
full mode plus a quantizer on every tensor between layers (tensors.py). A
layer's name is the module path of the wrapped module in the timm model: the key of the QuantPlan.

Arithmetic of a quantized conv / linear layer, exactly as the integer graph computes it:
    x_int = clip(round(x / s_a) + z_a) - z_a                          (s_a, z_a per tensor or per input channel)
    w_int = clip(round((w * s_a) / s_w))                              (symmetric, per output channel)
    y     = s_w * op(x_int, w_int) + bias
The activation scale is folded into the weight before the weight is quantized, so channel-wise
activation scales cost nothing at inference: the accumulation stays int8 x int8 -> int32.
A quantized matmul computes s_a * s_b * ((a_q - z_a) @ (b_q - z_b)).
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .quantizer import QuantParams

_MATMUL_NAMES = ("matmul", "__matmul__")
MODES = ("partial", "full", "integer")


class QuantLayer(nn.Module):
    """A Conv2d or Linear with an input quantizer and a (folded) weight quantizer."""

    def __init__(self, inner: nn.Conv2d | nn.Linear):
        super().__init__()
        self.inner = inner
        self.op = "conv2d" if isinstance(inner, nn.Conv2d) else "linear"
        self.act: QuantParams | None = None
        self.weight: QuantParams | None = None
        self.enabled = False

    @property
    def act_axis(self) -> int:
        """Channel axis of the input: 1 for NCHW convolutions, -1 for (..., C) linear inputs."""
        return 1 if self.op == "conv2d" else -1

    @property
    def weight_axis(self) -> int:
        return 0

    def folded_weight(self, act: QuantParams) -> torch.Tensor:
        """The float weight with the input scale(s) multiplied into its input channels."""
        w = self.inner.weight.detach()
        scale = act.scale
        if scale.ndim == 0:
            return w * scale
        if self.op == "linear":
            return w * scale.view(1, -1)
        groups = self.inner.groups
        per_out = scale.view(groups, -1).repeat_interleave(w.shape[0] // groups, dim=0)
        return w * per_out[:, :, None, None]

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        bias = self.inner.bias
        if self.op == "linear":
            return F.linear(x, w, bias)
        c = self.inner
        return F.conv2d(x, w, bias, c.stride, c.padding, c.dilation, c.groups)

    def quantized(self, x: torch.Tensor, act: QuantParams, weight: QuantParams) -> torch.Tensor:
        """Output with the given quantizers (weight quantizer over the folded weight)."""
        return self._op(act.centered(x), weight.fake_quantize(self.folded_weight(act)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            return self.quantized(x, self.act, self.weight)
        return self.inner(x)


class QuantMatMul(nn.Module):
    """An activation-by-activation matmul with a quantizer on each operand."""

    op = "matmul"

    def __init__(self):
        super().__init__()
        self.acts: list[QuantParams] | None = None
        self.enabled = False

    def quantized(self, a: torch.Tensor, b: torch.Tensor, qa: QuantParams, qb: QuantParams) -> torch.Tensor:
        return torch.matmul(qa.centered(a), qb.centered(b)) * (qa.scale * qb.scale)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            return self.quantized(a, b, *self.acts)
        return torch.matmul(a, b)


class QuantAct(nn.Module):
    """A float operation (LayerNorm, GroupNorm, softmax) whose input is quantized in full mode; with neither
    `inner` nor `call`, a tensor quantizer of integer mode (tensors.py)."""

    def __init__(self, op: str, act_axis: int | None, inner: nn.Module | None = None, call=None):
        super().__init__()
        self.op = op            # "norm", "softmax" or "tensor"
        self.act_axis = act_axis  # channel axis for channel-wise quantization, None: layer-wise only
        self.inner = inner
        self.call = call        # softmax: (function, extra args, kwargs) as called in the model
        self.act: QuantParams | None = None
        self.enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            x = self.act.fake_quantize(x)
        if self.inner is not None:
            return self.inner(x)
        if self.call is None:
            return x
        func, rest, kwargs = self.call
        return func(x, *rest, **kwargs)


def _routed_kind(func) -> str | None:
    name = getattr(func, "__name__", "")
    return "matmul" if name in _MATMUL_NAMES else "softmax" if name == "softmax" else None


class _Router(TorchFunctionMode):
    """Sends the i-th matmul (and softmax, in full mode) of an attention forward to its i-th module.

    In the counting pass (`module.hyq_routes[kind]` is None) it records the calls instead.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls: dict[str, list] = {kind: [] for kind in module.hyq_routes}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _routed_kind(func)
        if kind in self.calls and (kind != "matmul" or (len(args) == 2 and not kwargs)):
            targets = self.module.hyq_routes[kind]
            index = len(self.calls[kind])
            self.calls[kind].append((func, args[1:], kwargs))
            if targets is not None:
                return targets[index](*args) if kind == "matmul" else targets[index](args[0])
        return func(*args, **kwargs)


def _routed_forward(module: nn.Module, forward, *args, **kwargs):
    router = _Router(module)
    with router:
        out = forward(*args, **kwargs)
    module.hyq_calls = router.calls
    return out


def _leaf_attention(model: nn.Module) -> dict[str, nn.Module]:
    found = {}
    for name, module in model.named_modules():
        if "Attention" in type(module).__name__ and not any(
                "Attention" in type(m).__name__ for m in list(module.modules())[1:]):
            found[name] = module
    return found


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Fold each BatchNorm2d whose input is a Conv2d's output into that conv; returns the pairs."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # keeps outputs alive so ids stay unique
    pairs: list[tuple[str, str]] = []
    modules = dict(model.named_modules())

    def conv_hook(name):
        def hook(_, __, out):
            produced[id(out)] = (name, out)
        return hook

    def bn_hook(name):
        def hook(_, inputs):
            if id(inputs[0]) in produced:
                pairs.append((produced[id(inputs[0])][0], name))
        return hook

    handles = [m.register_forward_hook(conv_hook(n)) for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(bn_hook(n)) for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
    model.eval()(example)
    for h in handles:
        h.remove()
    for conv_name, bn_name in dict.fromkeys(pairs):
        conv, bn = modules[conv_name], modules[bn_name]
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(factor.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter((bias - bn.running_mean) * factor + bn.bias)
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        _set_module(model, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    return list(dict.fromkeys(pairs))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _norm_axis(module: nn.Module) -> int:
    """Channel axis of a norm's input: 1 for NCHW GroupNorm / LayerNorm2d, -1 for LayerNorm."""
    return 1 if isinstance(module, nn.GroupNorm) or type(module).__name__.endswith("2d") else -1


@torch.no_grad()
def prepare(model: nn.Module, example: torch.Tensor, mode: str = "partial") -> nn.Module:
    """Make `model` (in place) quantizable: BN folded, layers wrapped, matmuls routed. All disabled.

    mode "partial" quantizes conv, linear and matmul inputs; "full" (and "integer", whose tensor quantizers
    tensors.py adds) also norm and softmax inputs.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    fold_batchnorm(model, example)
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False  # calibration keeps outputs and their gradients
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            _set_module(model, name, QuantLayer(module))
        elif mode != "partial" and isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            _set_module(model, name, QuantAct("norm", _norm_axis(module), inner=module))
    attention = _leaf_attention(model).values()
    kinds = ("matmul", "softmax") if mode != "partial" else ("matmul",)
    for module in attention:
        module.hyq_routes = dict.fromkeys(kinds)  # None: count the calls of one forward first
        module.forward = functools.partial(_routed_forward, module, module.forward)
    model(example)
    for module in attention:
        routes = {}
        for kind, calls in module.hyq_calls.items():
            routes[kind] = []
            for i, call in enumerate(calls):
                routed = QuantMatMul() if kind == "matmul" else QuantAct("softmax", None, call=call)
                module.add_module(f"{kind}{i}", routed)
                routes[kind].append(routed)
        module.hyq_routes = routes
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantLayer | QuantMatMul | QuantAct]:
    """Every quantizable layer of a prepared model by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLayer, QuantMatMul, QuantAct))}


@torch.no_grad()
def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the quantizable layers in the order a forward pass first calls them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _, __, n=n: order.append(n) if n not in order else None)
               for n, m in quant_layers(model).items()]
    model(example)
    for h in handles:
        h.remove()
    return order


def set_enabled(model: nn.Module, enabled: bool, names: Iterable[str] | None = None) -> None:
    """Switch quantization on or off for the named layers (all when None)."""
    layers = quant_layers(model)
    for name in names if names is not None else layers:
        layers[name].enabled = enabled
