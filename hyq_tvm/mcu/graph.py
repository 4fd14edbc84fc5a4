"""The data of a static graph: the tensors (Values), the kernel calls (Steps), the grids of its int8 ends."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm


@dataclass(frozen=True)
class Grid:
    """The quantization grid of the graph's int8 input or output: real = scale * (q - zero_point), per tensor or
    per channel along `axis`."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int


@dataclass(frozen=True)
class Value:
    """A tensor of the graph: a constant (with its data), the input, the output or an intermediate."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Step:
    """One kernel call: the kernel's name and its arguments (Value names, inputs then outputs)."""

    kernel: str
    args: tuple[str, ...]
    outputs: int


@dataclass(frozen=True)
class StaticGraph:
    """The kernels (PrimFuncs), the values and the calls in order; `views`: values that are reshapes of
    another value's memory; the grids of the int8 input and output."""

    kernels: tvm.IRModule
    values: dict[str, Value]
    steps: list[Step]
    input: str
    output: str
    views: dict[str, str]
    input_grid: Grid
    output_grid: Grid
