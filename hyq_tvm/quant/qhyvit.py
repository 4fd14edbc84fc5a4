"""Q-HyViT: per-layer joint search of scale, activation granularity and scheme (arXiv 2303.12557).

For every quantized layer, in forward order, the search picks the activation granularity
(layer-wise or channel-wise), the activation scheme (symmetric or asymmetric) and the scales of
activation and weight that minimise the Hessian-guided reconstruction error

    E[ sum (O_q - O)^2 * (dL/dO)^2 ]

where O is the layer output, or for a layer inside a bridge block the output of the whole bridge
block, and dL/dO is collected with backward hooks on the full-precision model. L is the
cross-entropy against the full-precision model's own top-1 prediction: it needs no labels, and
unlike the KL divergence to the full-precision output its gradient does not vanish there.

Scales are searched over `candidates` multiples eta in [alpha, beta] of the observed range (the
paper's code: alpha 0.01, beta 1.2, 100 candidates, 3 alternating rounds of weight and activation
search from a min-max start). Weight scales are chosen per output channel, each channel by its own
error at the layer output, which is separable per channel. Attention matmuls quantize both operands
layer-wise and search scale and scheme per operand. The tensor quantizers of integer mode (layer-wise) search
scale and scheme at their own output, inside bridge blocks too. Once a bridge block is calibrated it stays
quantized while every later layer is calibrated; other layers see full-precision inputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..zoo import BridgeBlock
from .capture import capture_inputs, first_input
from .modules import QuantAct, QuantLayer, QuantMatMul, forward_order, quant_layers
from .quantizer import GRANULARITIES, QuantParams, QuantSpec, minmax_params, params_from_range, reduce_range

SCHEMES = ("symmetric", "asymmetric")


@dataclass
class QHyViTConfig:
    """Search settings; granularity and scheme may be fixed for the ablation."""

    wbits: int = 8
    abits: int = 8
    candidates: int = 100
    alpha: float = 0.01
    beta: float = 1.2
    rounds: int = 3
    granularities: tuple[str, ...] = GRANULARITIES
    schemes: tuple[str, ...] = SCHEMES

    @property
    def etas(self) -> torch.Tensor:
        return torch.linspace(self.alpha, self.beta, self.candidates)


@dataclass
class LayerChoice:
    """What the search chose for one layer, and the error it reached."""

    granularity: str
    schemes: tuple[str, ...]
    error: float
    bridge: int | None


@dataclass
class SearchReport:
    choices: dict[str, LayerChoice] = field(default_factory=dict)
    seconds: float = 0.0
    overflow_choices: int = 0  # searched configurations whose best quantizer overflowed its zero point


class _Objective:
    """Hessian-guided squared error against full-precision outputs at one observation point.

    The diagonal Hessian is approximated by the squared loss gradient (empirical Fisher), averaged
    over the calibration images and positions for each channel: a per-sample, per-position
    estimate from 32 images is dominated by the few least confident images.
    """

    def __init__(self, target: torch.Tensor, grad: torch.Tensor, channel_axis: int):
        self.target = target
        self.channel_axis = channel_axis % target.ndim
        dims = [d for d in range(target.ndim) if d != self.channel_axis]
        fisher = grad.pow(2).mean(dim=dims, keepdim=True)
        self.weight = fisher / fisher.mean().clamp(min=1e-30)

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        return ((out - self.target).pow(2) * self.weight).mean()

    def per_channel(self, out: torch.Tensor) -> torch.Tensor:
        err = (out - self.target).pow(2) * self.weight
        axis = self.channel_axis
        return err.transpose(0, axis).reshape(err.shape[axis], -1).mean(dim=1)


def _channel_axis(t: torch.Tensor) -> int:
    """Channel axis of an observed output: 1 for NCHW maps (or heads), last for token sequences."""
    return 1 if t.ndim == 4 else -1


def _hessian_targets(model: nn.Module, images: torch.Tensor, names: list[str]):
    """Full-precision outputs and loss gradients at the named modules."""
    modules = dict(model.named_modules())
    outputs, grads = {}, {}

    def hook(name):
        def fn(_, __, out):
            outputs[name] = out.detach().clone()  # later in-place activations would overwrite it
            out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.enable_grad():
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, logits.argmax(dim=1).detach(), reduction="sum")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return outputs, grads


def _weight_params(spec: QuantSpec, folded: torch.Tensor, eta: torch.Tensor) -> QuantParams:
    lo, hi = reduce_range(folded, 0)
    bound = torch.maximum(lo.abs(), hi.abs()) * eta
    return params_from_range(spec, -bound, bound)


class QHyViT:
    """The calibrator for one prepared model."""

    def __init__(self, model: nn.Module, bridges: list[BridgeBlock], config: QHyViTConfig):
        self.model = model
        self.bridges = bridges
        self.config = config
        self.layers = quant_layers(model)
        self.modules = dict(model.named_modules())
        self.report = SearchReport()

    def bridge_of(self, name: str) -> int | None:
        """The bridge block whose output measures `name`'s error; None: its own output (always for the tensor
        quantizers of integer mode)."""
        if self.layers[name].op == "tensor":
            return None
        for index, bridge in enumerate(self.bridges):
            if bridge.contains(name):
                return index
        return None

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, progress: bool = True) -> SearchReport:
        """Search every layer's quantizers on `images`; leaves all of them enabled."""
        start = time.perf_counter()
        order = forward_order(self.model, images[:1])
        for layer in self.layers.values():
            layer.enabled = False
        points = order + [b.output for b in self.bridges]
        self.fp_out, self.grads = _hessian_targets(self.model, images, points)
        inputs = capture_inputs(self.model, images)
        done_bridges: set[int] = set()
        for name in tqdm(order, desc="Q-HyViT", unit="layer", disable=not progress, leave=False):
            bridge = self.bridge_of(name)
            if bridge is None:
                self._search_layer(name, inputs[name], None)
                continue
            block = self.bridges[bridge]
            block_in = first_input(self.modules[block.members[0]], lambda: self.model(images))
            layer_in = first_input(self.layers[name], lambda: self._run_block(block, block_in))
            self._search_layer(name, layer_in, (block, block_in))
            self.layers[name].enabled = True  # bridge layers stay quantized
            last_in_block = all(n in self.report.choices for n in order if self.bridge_of(n) == bridge)
            if last_in_block and bridge not in done_bridges:
                done_bridges.add(bridge)
                inputs = capture_inputs(self.model, images)
        for layer in self.layers.values():
            layer.enabled = True
        self.report.seconds = time.perf_counter() - start
        return self.report

    def _run_block(self, block: BridgeBlock, block_in: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = block_in
        for member in block.members:
            out = (self.modules[member](*out),)
        return out[0]

    def _search_layer(self, name: str, layer_in, block_ctx) -> None:
        layer = self.layers[name]
        if block_ctx is None:
            objective = _Objective(self.fp_out[name], self.grads[name], _channel_axis(self.fp_out[name]))
            evaluate = lambda: objective(layer(*layer_in))  # noqa: E731
        else:
            block, block_in = block_ctx
            out = self.fp_out[block.output]
            objective = _Objective(out, self.grads[block.output], _channel_axis(out))
            evaluate = lambda: objective(self._run_block(block, block_in))  # noqa: E731
        layer.enabled = True
        if isinstance(layer, QuantMatMul):
            choice = self._search_matmul(layer, layer_in, evaluate)
        elif isinstance(layer, QuantAct):
            choice = self._search_input(layer, layer_in[0], evaluate)
        else:
            weight_objective = _Objective(self.fp_out[name], self.grads[name], layer.act_axis)
            choice = self._search_weighted(layer, layer_in[0], evaluate, weight_objective)
        choice.bridge = None if block_ctx is None else self.bridges.index(block_ctx[0])
        layer.enabled = False
        self.report.choices[name] = choice

    def _act_params(self, x: torch.Tensor, spec: QuantSpec):
        """Activation quantizer for grid index i: eta_i times the observed range."""
        lo, hi = reduce_range(x, spec.axis)
        etas = self.config.etas
        return lambda i: params_from_range(spec, lo * etas[i], hi * etas[i])

    def _search_act(self, make, apply, evaluate) -> tuple[QuantParams, float]:
        """Best activation quantizer on the grid, and its error."""
        def error_at(i):
            apply(make(int(i)))
            return torch.tensor([float(evaluate().detach())])
        index, err = _grid_search(self.config.candidates, error_at, 1)
        best = make(int(index))
        apply(best)
        return best, float(err[0])

    def _search_weighted(self, layer: QuantLayer, x, evaluate, weight_objective) -> LayerChoice:
        cfg = self.config
        wspec = QuantSpec(cfg.wbits, True, 0)
        best = None
        for granularity in cfg.granularities:
            for scheme in cfg.schemes:
                aspec = QuantSpec(cfg.abits, scheme == "symmetric", None if granularity == "tensor" else layer.act_axis)
                layer.act = minmax_params(aspec, x)
                make_act = self._act_params(x, aspec)
                for _ in range(cfg.rounds):
                    eta_w = self._search_weight_etas(layer, x, wspec, weight_objective)

                    def apply(act, eta_w=eta_w):
                        layer.act = act
                        layer.weight = _weight_params(wspec, layer.folded_weight(act), eta_w)
                    _, err = self._search_act(make_act, apply, evaluate)
                if layer.act.overflow:
                    self.report.overflow_choices += 1
                if best is None or err < best[0]:
                    best = (err, layer.act, layer.weight, granularity, scheme)
        err, layer.act, layer.weight, granularity, scheme = best
        return LayerChoice(granularity, (scheme,), err, None)

    def _search_input(self, layer: QuantAct, x, evaluate) -> LayerChoice:
        """Granularity, scheme and scale of the input of a float operation (full mode)."""
        granularities = self.config.granularities if layer.act_axis is not None else ("tensor",)
        best = None
        for granularity in granularities:
            for scheme in self.config.schemes:
                spec = QuantSpec(self.config.abits, scheme == "symmetric",
                                 None if granularity == "tensor" else layer.act_axis)
                act, err = self._search_act(self._act_params(x, spec), lambda a: setattr(layer, "act", a), evaluate)
                if best is None or err < best[0]:
                    best = (err, act, granularity, scheme)
        err, layer.act, granularity, scheme = best
        return LayerChoice(granularity, (scheme,), err, None)

    def _search_weight_etas(self, layer: QuantLayer, x, wspec, objective) -> torch.Tensor:
        """Per output channel, the eta whose weight quantizer gives that channel the least error."""
        folded = layer.folded_weight(layer.act)
        etas = self.config.etas

        def error_at(index):
            weight = _weight_params(wspec, folded, etas[index])
            return objective.per_channel(layer.quantized(x, layer.act, weight))
        index, _ = _grid_search(self.config.candidates, error_at, folded.shape[0])
        return etas[index]

    def _search_matmul(self, layer: QuantMatMul, operands, evaluate) -> LayerChoice:
        cfg = self.config
        specs = {s: QuantSpec(cfg.abits, s == "symmetric") for s in cfg.schemes}
        layer.acts = [minmax_params(specs[cfg.schemes[-1]], x) for x in operands]
        chosen = [cfg.schemes[-1]] * len(operands)
        err = float(evaluate())
        for _ in range(cfg.rounds):
            for i, x in enumerate(operands):
                results = []
                for scheme, spec in specs.items():
                    act, scheme_err = self._search_act(self._act_params(x, spec),
                                                       lambda a, i=i: layer.acts.__setitem__(i, a), evaluate)
                    results.append((scheme_err, scheme, act))
                err, chosen[i], layer.acts[i] = min(results, key=lambda r: r[0])
        return LayerChoice("tensor", tuple(chosen), err, None)


def _grid_search(size: int, error_at, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-to-fine argmin over grid indices 0..size-1, independently for each of `channels`.

    Every sqrt(size)-th index first, then every index within sqrt(size)/2 of each channel's coarse
    best: about 2 sqrt(size) evaluations reach any point of the full grid near the optimum.
    """
    stride = max(1, round(size ** 0.5))
    coarse = [torch.full((channels,), i) for i in range(stride // 2, size, stride)]
    best, _ = _argmin(coarse, error_at)
    fine = [torch.clamp(best + k, 0, size - 1) for k in range(-(stride // 2), stride // 2 + 1)]
    return _argmin(fine, error_at)


def _argmin(candidates: list[torch.Tensor], error_at) -> tuple[torch.Tensor, torch.Tensor]:
    errors = torch.stack([error_at(c) for c in candidates])
    pick = errors.argmin(dim=0, keepdim=True)
    index = torch.stack(candidates).gather(0, pick)[0]
    error = errors.gather(0, pick)[0]
    return index, error
