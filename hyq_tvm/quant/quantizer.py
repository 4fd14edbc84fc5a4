"""The uniform quantizer: x_q = clip(round(x / s) + z, qmin, qmax), values carried in int8.

Rounding is half to even (torch.round, numpy.round). Every quantized value is signed, so a b-bit
tensor holds integers in [-2^(b-1), 2^(b-1) - 1]. Symmetric quantizers have z = 0; asymmetric
quantizers place [lo, hi] on the whole grid, and their zero point must itself fit that range: where
it does not (a channel whose values are all positive, quantized channel-wise), it is clamped and the
quantizer loses the top of its range. That is the zero-point overflow Q-HyViT avoids by search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import HyqError

MIN_BITS, MAX_BITS = 2, 8
GRANULARITIES = ("tensor", "channel")  # the values of QuantSpec.granularity


def check_bits(bits: int, what: str = "bits") -> int:
    """`bits` if it is a supported bit-width, else a HyqError."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise HyqError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def qrange(bits: int) -> tuple[int, int]:
    """The integer range of a signed b-bit value."""
    check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class QuantSpec:
    """The discrete choices of a quantizer: bit-width, scheme and granularity.

    `axis` is the channel axis of the tensor for channel-wise quantization, None for layer-wise.
    """

    bits: int
    symmetric: bool
    axis: int | None = None

    @property
    def granularity(self) -> str:
        return "tensor" if self.axis is None else "channel"


@dataclass
class QuantParams:
    """A quantizer with its numbers: one scale and zero point per tensor or per channel."""

    spec: QuantSpec
    scale: torch.Tensor       # float32, shape () or (C,)
    zero_point: torch.Tensor  # int64 in the value range, shape like scale
    overflow: int = 0         # channels whose ideal zero point fell outside the range

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.spec.axis is None:
            return ()
        shape = [1] * x.ndim
        shape[self.spec.axis] = -1
        return tuple(shape)

    def broadcast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point shaped to broadcast against `x`."""
        shape = self._shape(x)
        return self.scale.reshape(shape), self.zero_point.reshape(shape).to(x.dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer values (in x's float dtype) of x on this quantizer's grid."""
        qmin, qmax = qrange(self.spec.bits)
        scale, zero = self.broadcast(x)
        return torch.clamp(torch.round(x / scale) + zero, qmin, qmax)

    def centered(self, x: torch.Tensor) -> torch.Tensor:
        """x_q - z: the integers a kernel multiplies, before the scale is applied."""
        _, zero = self.broadcast(x)
        return self.quantize(x) - zero

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantized x: (x_q - z) * s."""
        scale, _ = self.broadcast(x)
        return self.centered(x) * scale


def reduce_range(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of x over everything but `axis` (over everything when None)."""
    if axis is None:
        return x.min(), x.max()
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def params_from_range(spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> QuantParams:
    """Quantizer covering [lo, hi] (per channel where lo and hi are vectors)."""
    qmin, qmax = qrange(spec.bits)
    tiny = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        scale = torch.clamp(scale, min=tiny)
        return QuantParams(spec, scale.float(), torch.zeros_like(scale, dtype=torch.int64))
    width = torch.where(hi > lo, hi - lo, torch.maximum(lo.abs(), hi.abs()))  # a constant tensor: its value on the grid
    scale = torch.clamp(width / (qmax - qmin), min=tiny)
    ideal = torch.round(qmin - lo / scale)
    zero = torch.clamp(ideal, qmin, qmax)
    overflow = int((ideal != zero).sum())
    return QuantParams(spec, scale.float(), zero.to(torch.int64), overflow)


def minmax_params(spec: QuantSpec, x: torch.Tensor, eta: float | torch.Tensor = 1.0) -> QuantParams:
    """Quantizer whose range is `eta` times the observed range of x (eta < 1 clips)."""
    lo, hi = reduce_range(x, spec.axis)
    return params_from_range(spec, lo * eta, hi * eta)
