"""Int8 depthwise convolutions with the channels in the vector lanes.

An NCHW depthwise convolution vectorized along its rows wastes most of each vector on the narrow rows of a
hybrid ViT's late stages (7 or 14 pixels) and cannot vectorize a strided one at all. `depthwise` computes a
tile of `lanes` channels at once instead: the tile's (padded) input is copied channel-last, each output pixel
is the sum over the window of one vector of inputs times one vector of weights (packed (C / lanes, kh, kw,
lanes) by `pack`), and the epilogue that follows (requantization, activation, quantize) is computed per pixel
on the same vector of channels and written back as NCHW (scheduled by `schedule_depthwise`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import s_tir, te

from . import schedule
from .schedule import PARALLEL_MIN, _extent
from .window import Window, dims

DEPTHWISE = "hyq.depthwise"   # annotation of the accumulation block: the lanes


def suits(window: Window, lanes: int) -> bool:
    """Whether the channel-lane kernel computes the depthwise convolution through `window` at all
    (channels: a multiple of the lanes) and better than vectorized rows (rows not a multiple of the lanes, or
    strided)."""
    return window.in_shape[0] % lanes == 0 and (window.out_hw[1] % lanes != 0 or window.strides[1] > 1)


def pack(weight: np.ndarray, lanes: int) -> np.ndarray:
    """A (C, 1, kh, kw) int8 weight as (C / lanes, kh, kw, lanes)."""
    c, _, kh, kw = weight.shape
    return np.ascontiguousarray(weight.reshape(c // lanes, lanes, kh, kw).transpose(0, 2, 3, 1))


def depthwise(window: Window, lanes: int) -> tvm.tirx.PrimFunc:
    """out[0, c, y, x] = sum over the window of a[0, c, ...] * w[c, dy, dx] (int8 -> int32) for a (1, C, H, W)
    image read through `window` and w packed by `pack`."""
    (c, h, w_), (kh, kw), (sh, sw), (dh, dw) = window.in_shape, window.kernel, window.strides, window.dilation
    top, left, bottom, right = window.padding
    oh, ow = window.out_hw
    a = te.placeholder(dims(1, c, h, w_), "int8", "a")
    w = te.placeholder(dims(c // lanes, kh, kw, lanes), "int8", "w")
    image = te.compute(dims(c // lanes, h + top + bottom, w_ + left + right, lanes), lambda t, y, x, l: te.if_then_else(
        tvm.tirx.all(y >= top, y < h + top, x >= left, x < w_ + left), a[0, t * lanes + l, y - top, x - left],
        tvm.tirx.const(0, "int8")), name="a_in")
    ry = te.reduce_axis((tvm.tirx.IntImm("int64", 0), tvm.tirx.IntImm("int64", kh)), "ry")
    rx = te.reduce_axis((tvm.tirx.IntImm("int64", 0), tvm.tirx.IntImm("int64", kw)), "rx")
    acc = te.compute(dims(c // lanes, oh, ow, lanes), lambda t, y, x, l: te.sum(
        image[t, y * sh + ry * dh, x * sw + rx * dw, l].astype("int32") * w[t, ry, rx, l].astype("int32"),
        axis=[ry, rx]), name="acc")
    out = te.compute(dims(1, c, oh, ow), lambda _, ch, y, x: acc[ch // lanes, y, x, ch % lanes], name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, w, out]))
    sch.annotate(sch.get_sblock("acc"), DEPTHWISE, lanes)
    sch.annotate(sch.get_sblock("a_in"), schedule.KEEP, 1)
    return sch.mod["main"].without_attr("global_symbol").with_attr("op_pattern", 4)


def schedule_depthwise(sch: s_tir.Schedule, acc) -> tuple[object, Callable, Callable[[], None]]:
    """One channel tile per iteration of the outer loop: its input copied channel-last, each pixel's vector of
    sums accumulated over the window, the epilogue computed per pixel on the vector of channels; the outer loop,
    how a consumer is placed in it, and what completes the schedule."""
    lanes = int(sch.get(acc).annotations[DEPTHWISE])
    tiles, rows, cols, chans, ry, rx = sch.get_loops(acc)
    work = _extent(sch, tiles) * _extent(sch, rows) * _extent(sch, cols) * lanes * _extent(sch, ry) * _extent(sch, rx)
    sch.reorder(tiles, rows, cols, ry, rx, chans)
    if work >= PARALLEL_MIN:
        sch.parallel(tiles)
    staged = sch.get_producers(acc)[0]
    sch.compute_at(staged, tiles)
    sch.vectorize(sch.get_loops(staged)[-1])
    sch.vectorize(chans)

    def place(consumer) -> None:
        sch.reverse_compute_at(consumer, tiles)
        chan, y, x = sch.get_loops(consumer)[1:]
        sch.reorder(y, x, chan)
        sch.vectorize(chan)

    def finish() -> None:
        init = sch.decompose_reduction(acc, ry)
        sch.vectorize(sch.get_loops(init)[-1])
    return tiles, place, finish


schedule.ANNOTATED[DEPTHWISE] = schedule_depthwise
