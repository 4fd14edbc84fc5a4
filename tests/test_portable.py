"""Portable float legalizations (hyq_tvm.relax.portable): fixed reduction orders and reciprocal quantization."""
import numpy as np
import tvm
from tvm import relax, te

from relax_modules import one_op

from hyq_tvm.relax import portable
from hyq_tvm.relax.pipeline import build
from hyq_tvm.targets import load_target

RNG = np.random.default_rng(2)
HOST = load_target("host").tvm_target()


def _run(mod, *args):
    vm = relax.VirtualMachine(build(mod, HOST), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def test_row_sum_takes_interleaved_partials_then_those_in_order():
    x = (RNG.normal(size=(3, 64)) * 1e3).astype(np.float32)
    a = te.placeholder((3, 64), "float32", "a")
    total = portable._row_reduce(a, 1, te.sum, "row_sum")
    got = tvm.runtime.tensor(np.zeros((3, 1), np.float32))
    tvm.compile(te.create_prim_func([a, total]), target=HOST)(tvm.runtime.tensor(x), got)
    want = np.zeros(3, np.float32)
    for row in range(3):
        partials = [np.float32(0)] * portable.PARTIALS
        for k in range(64 // portable.PARTIALS):
            for j in range(portable.PARTIALS):
                partials[j] = np.float32(partials[j] + x[row, k * portable.PARTIALS + j])
        for p in partials:
            want[row] = np.float32(want[row] + p)
    np.testing.assert_array_equal(got.numpy()[:, 0], want)


def test_softmax_is_close_to_numpy_and_sums_to_one():
    x = RNG.normal(size=(2, 5, 48)).astype(np.float32) * 4
    got = _run(one_op(x.shape, lambda v: relax.op.nn.softmax(v, axis=-1), dtype="float32"), x)
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True), rtol=2e-6, atol=1e-7)


def test_quantize_multiplies_by_the_reciprocal_of_the_scale():
    x = RNG.normal(size=(1, 3, 4, 5)).astype(np.float32) * 3
    scale, zero = np.array([0.02, 0.07, 0.013], np.float32), np.array([3, -5, 0], np.int8)
    per_channel = lambda v: relax.op.quantize(v, relax.const(scale), relax.const(zero), axis=1)   # noqa: E731
    mod = one_op(x.shape, per_channel, dtype="float32")
    inverse = (np.float32(1) / scale).reshape(1, 3, 1, 1)
    want = np.clip(np.round(x * inverse) + zero.reshape(1, 3, 1, 1), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(_run(mod, x), want)
    quantize = lambda v: relax.op.quantize(v, relax.const(np.float32(0.05)), relax.const(np.int8(-2)),   # noqa: E731
                                           out_dtype="int8")
    mod = one_op(x.shape, quantize, dtype="float32")
    want = np.clip(np.round(x * (np.float32(1) / np.float32(0.05))) - 2, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(_run(mod, x), want)


def test_products_feeding_adds_are_fused_multiply_adds_on_every_target():
    mod = one_op((8, 64), relax.op.nn.gelu, dtype="float32")
    fused = tvm.transform.Sequential([relax.transform.LegalizeOps(portable.LEGALIZE), relax.get_pipeline("default"),
                                      portable.fuse_multiply_add])(mod)
    assert portable.FMA in fused.script()
    assert "vfmadd" in build(mod, HOST).mod.imports[0].inspect_source("asm")
    arm = build(mod, load_target("rasp4b").tvm_target()).mod.imports[0].inspect_source("asm")
    assert "fmla" in arm or "fmadd" in arm
