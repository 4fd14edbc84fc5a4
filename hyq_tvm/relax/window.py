"""Where a batch-1 NCHW convolution reads its input, for the kernels that compute convolutions themselves, and the
index helpers those kernels share."""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import te


@dataclass(frozen=True)
class Window:
    """Where a batch-1 NCHW convolution reads its input: the GEMM's row i is output pixel (i // out_w, i % out_w),
    column j is (channel, dy, dx) = (j // (kh * kw), j // kw % kh, j % kw) of a (kh, kw) window, zero outside."""

    in_shape: tuple[int, int, int]    # C, H, W
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]   # top, left, bottom, right
    out_hw: tuple[int, int]

    def read(self, a: te.Tensor, i, j) -> tvm.tirx.PrimExpr:
        """Element (i, j) of the GEMM operand, a being the (1, C, H, W) image already padded by `padded`."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilation
        y = i // self.out_hw[1] * sh + j // kw % kh * dh
        x = i % self.out_hw[1] * sw + j % kw * dw
        return a[0, j // (kh * kw), y, x]

    def padded(self, a: te.Tensor) -> te.Tensor:
        """The image with the window's zero padding (a itself when there is none)."""
        top, left, bottom, right = self.padding
        if not any(self.padding):
            return a
        c, h, w = self.in_shape
        return te.compute((1, c, h + top + bottom, w + left + right), lambda _, ch, y, x: te.if_then_else(
            tvm.tirx.all(y >= top, y < h + top, x >= left, x < w + left), a[0, ch, y - top, x - left],
            tvm.tirx.const(0, "int8")), name="pad")


def dims(*shape: int) -> list[tvm.tirx.IntImm]:
    """int64 dimensions, as in TVM's legalized operators, so that FuseOps / FuseTIR fuse the kernels with them."""
    return [tvm.tirx.IntImm("int64", d) for d in shape]


def split_index(i, shape: tuple[int, ...]) -> list:
    """The index into `shape` of flat (row-major) index i."""
    index = []
    for d in reversed(shape[1:]):
        index.append(i % d)
        i = i // d
    return [i, *reversed(index)]


def flat_index(index, shape: tuple[int, ...]):
    """The flat (row-major) index of `index` into `shape`."""
    flat = index[0]
    for i, d in zip(index[1:], shape[1:]):
        flat = flat * d + i
    return flat
