"""Channel-lane depthwise convolutions (hyq_tvm.relax.depthwise): exact, fused with their epilogue, chosen where
rows would not fill the vector."""
import re

import numpy as np
import pytest
import tvm
from tvm import relax

from relax_modules import with_weight

from hyq_tvm.relax import depthwise, pack, schedule
from hyq_tvm.relax.integer.gemm import conv2d
from hyq_tvm.relax.pipeline import build
from hyq_tvm.relax.window import Window
from hyq_tvm.targets import load_target

RNG = np.random.default_rng(1)
HOST = load_target("host").tvm_target()
LANES = schedule.int32_lanes(HOST)


def _kernels(mod) -> list[str]:
    return [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith("hyq_depthwise")]


CASES = [   # (C, H, W), kernel, conv2d attributes
    ((2 * LANES, 7, 7), (3, 3), dict(padding=1)),
    ((LANES, 9, 11), (3, 3), dict(strides=2, padding=1)),
    ((LANES, 8, 6), (5, 3), dict(padding=(2, 1, 1, 0), dilation=(1, 2))),
    ((LANES, 5, 5), (3, 3), dict()),
]


@pytest.mark.parametrize("shape, kernel, attrs", CASES)
def test_depthwise_kernel_is_exact(shape, kernel, attrs):
    c = shape[0]
    w = RNG.integers(-128, 128, (c, 1, *kernel), dtype=np.int8)
    mod = with_weight((1, *shape), w, lambda x, k: relax.op.nn.conv2d(x, k, groups=c, out_dtype="int32", **attrs))
    assert _kernels(pack.pack_weights(HOST)(mod))
    x = RNG.integers(-128, 128, (1, *shape), dtype=np.int8)
    got = relax.VirtualMachine(build(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    pad = attrs.get("padding", 0)
    pad = (pad,) * 4 if isinstance(pad, int) else pad
    pair = lambda v: (v, v) if isinstance(v, int) else v   # noqa: E731
    want = conv2d(x, w, pair(attrs.get("strides", 1)), pad, pair(attrs.get("dilation", 1)), groups=c)
    np.testing.assert_array_equal(got, want)


def test_kernel_taken_where_rows_do_not_fill_the_vector():
    def window(c, ow, stride=1):
        return Window((c, ow * stride, ow * stride), (3, 3), (stride, stride), (1, 1), (1, 1, 1, 1), (ow, ow))
    assert depthwise.suits(window(LANES, 7), LANES)
    assert depthwise.suits(window(LANES, 4 * LANES, stride=2), LANES)
    assert not depthwise.suits(window(LANES, 4 * LANES), LANES)      # whole vectors along the rows
    assert not depthwise.suits(window(LANES + 1, 7), LANES)         # channels not a multiple of the lanes


def test_pack_layout():
    w = RNG.integers(-128, 128, (2 * LANES, 1, 3, 2), dtype=np.int8)
    packed = depthwise.pack(w, LANES)
    assert packed.shape == (2, 3, 2, LANES)
    assert packed[1, 2, 1, 3] == w[LANES + 3, 0, 2, 1]


def test_fused_with_its_epilogue_and_exact():
    c = 2 * LANES
    w = RNG.integers(-128, 128, (c, 1, 3, 3), dtype=np.int8)
    scale = RNG.uniform(1e-4, 1e-3, (1, c, 1, 1)).astype("float32")

    def requantize(x, k):
        acc = relax.op.nn.conv2d(x, k, padding=1, groups=c, out_dtype="int32")
        y = relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale))
        return relax.op.quantize(y, relax.const(0.05, "float32"), relax.const(3, "int8"), axis=1)
    mod = with_weight((1, c, 7, 7), w, requantize)
    fused = tvm.transform.Sequential([pack.pack_weights(HOST), relax.transform.LegalizeOps(),
                                      schedule.fusion(), schedule.schedule_pass(HOST)])(mod)
    funcs = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1 and depthwise.DEPTHWISE in funcs[0].script()   # conv, scale, quantize: one kernel
    x = RNG.integers(-128, 128, (1, c, 7, 7), dtype=np.int8)
    got = relax.VirtualMachine(build(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    plain = tvm.compile(mod, target=HOST)   # TVM's own lowering
    want = relax.VirtualMachine(plain, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("board", ["rasp4b", "rasp5"])
def test_aarch64_build_takes_the_kernel(board):
    target = load_target(board).tvm_target()
    c = 4 * schedule.int32_lanes(target)
    w = RNG.integers(-128, 128, (c, 1, 3, 3), dtype=np.int8)
    mod = with_weight((1, c, 7, 7), w, lambda x, k: relax.op.nn.conv2d(x, k, padding=1, groups=c, out_dtype="int32"))
    assert _kernels(pack.pack_weights(target)(mod))
    asm = build(mod, target).mod.imports[0].inspect_source("asm")
    assert re.search(r"\bsmlal\s+v\d+\.4s", asm)   # one vector of channels: widening multiply-adds
