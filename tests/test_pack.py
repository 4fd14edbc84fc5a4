"""Packed int8 GEMMs (hyq_tvm.relax.pack): exact against numpy, and the target's dot-product instructions."""
import re

import numpy as np
import pytest
import tvm
from tvm import relax

from relax_modules import with_weight

from hyq_tvm.relax import pack, schedule
from hyq_tvm.relax.integer.gemm import conv2d
from hyq_tvm.relax.pipeline import build
from hyq_tvm.targets import load_target

RNG = np.random.default_rng(0)
HOST = load_target("host").tvm_target()


def _matmul(shape=(4, 16, 36)):
    def case():
        w = RNG.integers(-128, 128, (shape[-1], 40), dtype=np.int8)
        return with_weight(shape, w, lambda x, c: relax.op.matmul(x, c, out_dtype="int32")), w, {}
    return case


def _conv(kernel=(1, 1), **attrs):
    def case():
        w = RNG.integers(-128, 128, (20, 6, *kernel), dtype=np.int8)
        conv = lambda x, c: relax.op.nn.conv2d(x, c, out_dtype="int32", **attrs)   # noqa: E731
        return with_weight((1, 6, 9, 8), w, conv), w, attrs
    return case


_conv1x1 = _conv()
CASES = [_matmul(), _matmul((2, 6, 20)), _matmul((7, 36)), _matmul((2, 6, 300)), _matmul((2, 16, 260)), _conv1x1, _conv((3, 3)), _conv((3, 3), strides=2, padding=1), _conv((2, 1)),
         _conv((3, 3), strides=3, padding=1),   # 9 pixels: fewer than the lanes, the row-major kernel
         _conv((3, 2), strides=(1, 2), padding=(1, 0, 2, 1), dilation=(2, 1))]


def _activations(batch, m, k, n):
    def case():
        bb = relax.BlockBuilder()
        a = relax.Var("a", relax.TensorType((*batch, m, k), "int8"))
        b = relax.Var("b", relax.TensorType((*batch, k, n), "int8"))
        with bb.function("main", [a, b]):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(relax.op.matmul(a, b, out_dtype="int32")))
            bb.emit_func_output(out)
        return bb.get()
    return case


@pytest.mark.skipif(pack.dot_for(HOST) is None, reason="host has no AVX-512 VNNI / NEON")
@pytest.mark.parametrize("case", [_activations((2, 3), 32, 16, 40), _activations((2,), 16, 18, 16),
                                  _activations((), 24, 7, 33)])
def test_activation_matmul_is_exact_and_uses_the_dot_instruction(case):
    mod = case()
    assert [gv for gv in pack.pack_weights(HOST)(mod).get_global_vars() if gv.name_hint.startswith("hyq_matmul")]
    ex = build(mod, HOST)
    a, b = (RNG.integers(-128, 128, [int(d) for d in p.ty.shape], dtype=np.int8) for p in mod["main"].params)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    np.testing.assert_array_equal(got, np.matmul(a.astype(np.int32), b.astype(np.int32)))
    if pack.dot_for(HOST) is pack.VNNI:
        assert "vpdpbusd" in _asm(ex)


def _asm(executable) -> str:
    return executable.mod.imports[0].inspect_source("asm")


def _kernels(mod):
    return [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith(("hyq_gemm", "hyq_conv"))]


@pytest.mark.skipif(pack.dot_for(HOST) is None, reason="host has no AVX-512 VNNI / NEON")
@pytest.mark.parametrize("case", CASES)
def test_packed_gemm_is_exact_and_uses_the_dot_instruction(case):
    mod, w, attrs = case()
    packed = pack.pack_weights(HOST)(mod)
    assert _kernels(packed)
    ex = build(packed, HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = RNG.integers(-128, 128, [int(d) for d in mod["main"].params[0].ty.shape], dtype=np.int8)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    if w.ndim == 2:
        want = x.astype(np.int32) @ w.astype(np.int32)
    else:
        pad = attrs.get("padding", 0)
        pad = (pad,) * 4 if isinstance(pad, int) else pad
        pair = lambda v: (v, v) if isinstance(v, int) else v   # noqa: E731
        want = conv2d(x, w, pair(attrs.get("strides", 1)), pad, pair(attrs.get("dilation", 1)))
    np.testing.assert_array_equal(got, want)
    if pack.dot_for(HOST) is pack.VNNI:
        assert "vpdpbusd" in _asm(ex)


@pytest.mark.parametrize("case", [_matmul(), _conv((3, 3), padding=1), _activations((2,), 16, 16, 16)])
def test_aarch64_cross_build_uses_the_board_dot_products(case):
    mod = case()
    mod = mod[0] if isinstance(mod, tuple) else mod
    vector_smull = re.compile(r"\bsmull2?\s+v\d+")
    asm = _asm(build(mod, load_target("rasp4b").tvm_target()))   # Cortex-A72: Armv8.0, no dot product
    assert vector_smull.search(asm) and ("sadalp" in asm or "saddlp" in asm) and "sdot" not in asm
    asm = _asm(build(mod, load_target("rasp5").tvm_target()))    # Cortex-A76: +dotprod
    assert "sdot" in asm and not vector_smull.search(asm)


def test_pack_layout():
    w = RNG.integers(-128, 128, (6, 20), dtype=np.int8)
    packed, offset = pack.pack(w, pack.VNNI), pack.shift_offset(w, pack.VNNI)
    assert packed.shape == (2, 2, 16, 4)
    assert packed[1, 1, 3, 1] == w[5, 19] and packed[1, 1, 5, 1] == 0 and packed[0, 1, 0, 2] == 0
    np.testing.assert_array_equal(offset, -128 * w.astype(np.int32).sum(axis=0))


@pytest.mark.skipif(pack.dot_for(HOST) is None, reason="host has no AVX-512 VNNI / NEON")
def test_packed_kernel_fuses_with_its_epilogue_and_stays_exact():
    w = RNG.integers(-128, 128, (32, 8, 3, 3), dtype=np.int8)
    scale = RNG.uniform(1e-4, 1e-3, (1, 32, 1, 1)).astype("float32")

    def requantize(x, c):
        acc = relax.op.nn.conv2d(x, c, padding=1, out_dtype="int32")
        y = relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale))
        return relax.op.quantize(y, relax.const(0.05, "float32"), relax.const(3, "int8"), axis=1)
    mod = with_weight((1, 8, 8, 8), w, requantize)
    fused = tvm.transform.Sequential([pack.pack_weights(HOST), relax.transform.LegalizeOps(),
                                      schedule.fusion(), schedule.schedule_pass(HOST)])(mod)
    funcs = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1 and pack.PACKED in funcs[0].script()   # conv, scale and quantize: one kernel
    x = RNG.integers(-128, 128, (1, 8, 8, 8), dtype=np.int8)
    got = relax.VirtualMachine(build(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    plain = tvm.compile(mod, target=HOST)   # TVM's own lowering, unpacked
    want = relax.VirtualMachine(plain, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, want)
