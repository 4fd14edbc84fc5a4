"""The microcontroller GEMM kernels: convolutions and matmuls by constant weights, tiled and summed by the shim's
dot kernels, compiled with the host's gcc and checked against numpy; the Relax rewrite that introduces them."""
import ctypes

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.mcu.emit import SHIM_H
from hyq_tvm.mcu.gemm import conv_gemm, gemm_kernels, matmul_gemm, weight_rows
from hyq_tvm.mcu.kernels import gemm_macs, kernel_source
from hyq_tvm.mcu.schedule import mcu_schedule
from hyq_tvm.relax.window import Window

from test_mcu_graph import _Any, _DLTensor, _host_library


def _run_c(tmp_path, func: tvm.tirx.PrimFunc, arrays: list[np.ndarray]) -> str:
    """Schedule `func` for a microcontroller, compile its C with the host's gcc and call it on `arrays` (the last
    one written); its C source."""
    source = kernel_source(tvm.IRModule({"k": mcu_schedule(func, None).mod["main"]})).source
    (tmp_path / "hyq_shim.h").write_text(SHIM_H)
    (tmp_path / "k.c").write_text(source)
    lib = _host_library(tmp_path)
    tensors = [_DLTensor(a.ctypes.data, 1, 0, a.ndim, 0, a.dtype.itemsize * 8, 1, None, None, 0) for a in arrays]
    args = (_Any * len(arrays))(*[_Any(7, 0, ctypes.cast(ctypes.pointer(t), ctypes.c_void_p)) for t in tensors])
    assert lib.__tvm_ffi_k(None, args, len(arrays), None) == 0
    return source


def _conv(x: np.ndarray, w: np.ndarray, window: Window) -> np.ndarray:
    (kh, kw), (sh, sw), (dh, dw), (top, left, bottom, right) = window.kernel, window.strides, window.dilation, window.padding
    padded = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh, ow = window.out_hw
    out = np.zeros((1, w.shape[0], oh, ow), np.int64)
    for dy in range(kh):
        for dx in range(kw):
            patch = padded[0, :, dy * dh:dy * dh + sh * oh:sh, dx * dw:dx * dw + sw * ow:sw]
            out[0] += np.einsum("chw,oc->ohw", patch, w[:, :, dy, dx].astype(np.int64))
    return out.astype(np.int32)


@pytest.mark.parametrize("window, n", [
    (Window((5, 6, 6), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (6, 6)), 6),    # 2 pixels a tile, K = 45 (a tail)
    (Window((8, 7, 7), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), (4, 4)), 5),    # strided, channels padded to even
    (Window((4, 5, 5), (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), (5, 5)), 4),    # odd output width: 1 pixel a tile
    (Window((3, 9, 9), (3, 3), (1, 1), (2, 2), (2, 2, 2, 2), (9, 9)), 3),    # dilated
])
def test_a_tiled_convolution_computes_the_convolution(tmp_path, window, n):
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (1, *window.in_shape), dtype=np.int8)
    w = rng.integers(-128, 128, (n, window.in_shape[0], *window.kernel), dtype=np.int8)
    out = np.zeros((1, n, *window.out_hw), np.int32)
    func = conv_gemm(window, n)
    source = _run_c(tmp_path, func, [x, weight_rows(w.reshape(n, -1).T), out])
    np.testing.assert_array_equal(out, _conv(x, w, window))
    assert ("hyq_dot_1x2(" if window.out_hw[1] % 2 else "hyq_dot_2x2(") in source
    assert gemm_macs(mcu_schedule(func, None).mod["main"]) == n * int(np.prod(window.out_hw)) * w[0].size


@pytest.mark.parametrize("rows, k, n", [((1, 6), 20, 8), ((3,), 9, 5), ((2, 1, 4), 64, 2)])
def test_a_tiled_matmul_computes_the_matmul(tmp_path, rows, k, n):
    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, (*rows, k), dtype=np.int8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    out = np.zeros((*rows, n), np.int32)
    _run_c(tmp_path, matmul_gemm(rows, k, n), [a, weight_rows(w), out])
    np.testing.assert_array_equal(out, (a.astype(np.int64) @ w.astype(np.int64)).astype(np.int32))


def _module(weight: np.ndarray, groups: int = 1) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, relax.const(weight), padding=1, groups=groups,
                                                    out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


def _calls(mod: tvm.IRModule) -> list[str]:
    return [b.value.args[0].name_hint for b in mod["main"].body.blocks[0].bindings
            if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"]


def test_convolutions_by_constant_weights_become_tiled_kernels_with_4_bit_weights_packed():
    rng = np.random.default_rng(2)
    w8 = rng.integers(-128, 128, (6, 4, 3, 3), dtype=np.int8)
    assert _calls(gemm_kernels(_module(w8))) == ["hyq_conv_36x36x6"]
    w4 = rng.integers(-8, 8, (6, 4, 3, 3), dtype=np.int8)
    assert _calls(gemm_kernels(_module(w4))) == ["hyq_unpack_int4_0", "hyq_conv_36x36x6"]
    depthwise = rng.integers(-128, 128, (4, 1, 3, 3), dtype=np.int8)
    assert _calls(gemm_kernels(_module(depthwise, groups=4))) == []   # left to the legalized loops
