"""The fused, scheduled build (hyq_tvm.relax.schedule) gives the same bits as the portable one."""
import numpy as np
import tvm
from tvm import relax, te

from hyq_tvm.relax import portable, schedule
from hyq_tvm.relax.pipeline import build
from hyq_tvm.targets import load_target

HOST = load_target("host").tvm_target()
RNG = np.random.default_rng(0)


def _module():
    """int8 3x3 conv -> float scale, SiLU -> quantize -> padded; then a softmax and a LayerNorm: reductions of both kinds."""
    w = RNG.integers(-128, 128, (16, 8, 3, 3), dtype=np.int8)
    scale = RNG.uniform(1e-4, 1e-3, (1, 16, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 12, 12), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1, out_dtype="int32"))
            y = bb.emit(relax.op.nn.silu(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale))))
            q = bb.emit(relax.op.quantize(y, relax.const(0.05, "float32"), relax.const(3, "int8"), axis=1))
            padded = bb.emit(relax.op.nn.pad(q, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=3.0))
            soft = bb.emit(relax.op.nn.softmax(y, axis=-1))
            norm = bb.emit(relax.op.nn.layer_norm(y, relax.const(np.ones(12, "float32")),
                                                  relax.const(np.zeros(12, "float32")), axes=[-1]))
            out = bb.emit_output(relax.Tuple([padded, soft, norm]))
        bb.emit_func_output(out)
    return bb.get()


def _run(executable, x):
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return [t.numpy() for t in vm["main"](tvm.runtime.tensor(x))]


def _unscheduled(mod):
    """TVM's plain default lowering with the portable legalizations and explicit FMAs: the reference build."""
    passes = [relax.transform.LegalizeOps(portable.LEGALIZE), relax.get_pipeline("default"), portable.fuse_multiply_add]
    return tvm.compile(mod, target=HOST, relax_pipeline=tvm.transform.Sequential(passes))


def test_scheduled_build_gives_the_same_bits():
    mod = _module()
    x = RNG.integers(-128, 128, (1, 8, 12, 12), dtype=np.int8)
    for want, got in zip(_run(_unscheduled(mod), x), _run(build(mod, HOST), x)):
        np.testing.assert_array_equal(got, want)


def test_every_primfunc_is_fused_and_scheduled():
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(portable.LEGALIZE), schedule.fusion(),
                                    schedule.schedule_pass(HOST)])(_module())
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) < 8 and all(f.attrs["tirx.is_scheduled"] for f in funcs)
    assert "vectorized" in mod.script() and "parallel" in mod.script()


def test_aarch64_build_compiles():
    target = load_target("rasp4b").tvm_target()
    asm = build(_module(), target).mod.imports[0].inspect_source("asm")
    assert "fmul\tv" in asm or "fmul\tv" in asm.replace(" ", "\t")


def test_rows_narrower_than_the_vector_are_vectorized_together():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64, 4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.gelu(x)))
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(portable.LEGALIZE), schedule.fusion(),
                                    schedule.schedule_pass(HOST)])(bb.get())
    lanes = schedule.int32_lanes(HOST)
    assert lanes > 4 and f"T.vectorized(T.int64({lanes}))" in mod.script()   # 4x4 rows, all lanes used


def test_interpolation_stays_out_of_the_math_function_after_it():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 7, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            up = bb.emit(relax.op.image.resize2d(x, (14, 14), method="linear",
                                                 coordinate_transformation_mode="half_pixel"))
            out = bb.emit_output(bb.emit(relax.op.nn.gelu(up)))
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(portable.LEGALIZE), schedule.fusion(),
                                    schedule.schedule_pass(HOST)])(bb.get())
    script = mod.script()
    assert "resize_intermediate" in script          # the gather written once, not recomputed lane by lane
    assert "T.unroll(T.int64(14))" in script        # each column's indices and weights constants
    lanes = schedule.int32_lanes(HOST)
    assert f"T.vectorized(T.int64({lanes}))" in script   # the GELU on whole vectors


def test_a_value_computed_per_row_is_not_computed_per_element():
    """A square root and an integer division of a per-row value stay blocks of their own (one per row) instead of
    being inlined into the elementwise consumer."""
    x = te.placeholder((4, 64), "float32", name="x")
    v = te.placeholder((4,), "float32", name="v")
    t = te.placeholder((4,), "int64", name="t")
    root = te.compute((4,), lambda i: te.sqrt(v[i] + 1.0), name="sqrt")
    inverse = te.compute((4,), lambda i: tvm.tirx.floordiv(tvm.tirx.const(1 << 40, "int64"), t[i]), name="inverse")
    y = te.compute((4, 64), lambda i, j: x[i, j] / root[i] + inverse[i].astype("float32"), name="y")
    sch = schedule.default_schedule(te.create_prim_func([x, v, t, y]), HOST)
    blocks = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    assert {"sqrt", "inverse"} <= blocks


def test_an_inference_batch_norm_builds_with_its_square_root_per_channel():
    """The square root per channel stays a block of its own, its consumers still inlined around it."""
    x = RNG.standard_normal((1, 16, 7, 7)).astype("float32")
    gamma, beta, mean, var = (RNG.uniform(0.5, 2, 16).astype("float32") for _ in range(4))
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            norm = relax.op.nn.batch_norm(xv, *(relax.const(a) for a in (gamma, beta, mean, var)), axis=1,
                                          training=False)
            out = bb.emit_output(relax.TupleGetItem(norm, 0))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(build(bb.get(), HOST), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    shape = (1, 16, 1, 1)
    want = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5) * gamma.reshape(shape) + beta.reshape(shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
