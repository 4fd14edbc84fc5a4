"""QDQ Relax graphs lowered to integer graphs: bit-exact against the numpy reference."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from hyq_tvm.errors import HyqError
from hyq_tvm.relax import integerize
from hyq_tvm.relax import reference as ref
from hyq_tvm.relax.integerize import integerize_layers
from hyq_tvm.relax.kernels import requantize_primfunc
from hyq_tvm.relax.requant import fixed_point_multiplier, requantize, rounding_term, shifts

RNG = np.random.default_rng(0)


def host_target() -> tvm.target.Target:
    """The host llvm target; AVX-512 is switched off where the kernel does not expose it (VMs)."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    target = {"kind": "llvm", "mcpu": cpu, "num-cores": 2}
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    features = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(target))
    if "avx512f" in features and flags and "avx512f" not in flags:
        target["mattr"] = ["-avx512f"]
    return tvm.target.Target(target)


TARGET = host_target()


def run(mod_or_func, *args) -> np.ndarray:
    ex = tvm.compile(mod_or_func, target=TARGET)
    if isinstance(mod_or_func, tvm.tirx.PrimFunc):
        *inputs, out = [tvm.runtime.tensor(a) for a in args]
        ex(*inputs, out)
        return out.numpy()
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def const(values, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(values, dtype=dtype), dtype)


def dq(x, scale, zero, axis: int = -1) -> relax.Expr:
    return relax.op.dequantize(x, const(scale, "float32"), const(zero, "int8"), axis=axis)


def module(inputs: dict[str, tuple[tuple[int, ...], str]], body) -> tvm.IRModule:
    """main(inputs) -> body(bb, *vars), with every op emitted in one dataflow block."""
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(s, d)) for n, (s, d) in inputs.items()]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def int8(shape) -> np.ndarray:
    return RNG.integers(-128, 128, shape, dtype=np.int8)


def scales(n: int, lo: float = 0.002, hi: float = 0.02) -> np.ndarray:
    return RNG.uniform(lo, hi, n).astype(np.float32)


HEAVY_OPS = ("relax.nn.conv2d", "relax.matmul")


def heavy_ops(mod: tvm.IRModule) -> list[tuple[str, tuple[str, ...], str]]:
    """(op, input dtypes, output dtype) of every conv2d / matmul in the module's Relax functions."""
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name in HEAVY_OPS:
            found.append((e.op.name, tuple(str(a.ty.dtype) for a in e.args), str(e.ty.dtype)))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return found


def integerized(mod: tvm.IRModule) -> tvm.IRModule:
    """integerize(mod), checked to hold only int8 x int8 -> int32 conv2d / matmul."""
    out = integerize(mod)
    ops = heavy_ops(out)
    assert ops, "the rewrite removed the conv2d / matmul"
    assert all(ins == ("int8", "int8") and res == "int32" for _, ins, res in ops), ops
    return out


# -- requantization -------------------------------------------------------------------------------

def exact_requant(acc: int, q: int, shift: int, bias: float = 0.0) -> int:
    """round-half-up((acc + bias) * q * 2^(shift - 31)) with exact rationals."""
    value = (acc + Fraction(bias)) * q * Fraction(2) ** (shift - 31)
    return int(np.floor(value + Fraction(1, 2)))


@pytest.mark.parametrize("m", [0.5, 0.75, 1.0, 1.5, 3.7, 2.0 ** 20, 1 - 2.0 ** -40, 0.7 * 2.0 ** -31,
                               2.0 ** -40, 1e-21, 0.0123])
def test_fixed_point_multiplier(m):
    q, shift = fixed_point_multiplier(m)
    assert 0 <= int(q) < 2 ** 31
    assert -31 <= int(shift) <= 31
    approx = int(q) * 2.0 ** (int(shift) - 31)
    assert abs(approx - m) <= 2.0 ** (int(shift) - 32)  # half a unit of q


@pytest.mark.parametrize("m", [0.0, -1.0, float("inf"), 2.0 ** 31])
def test_fixed_point_multiplier_rejects(m):
    with pytest.raises(HyqError, match="multiplier"):
        fixed_point_multiplier(m)


def test_requantize_edge_cases_match_tvm_and_exact_rounding():
    # one channel per (multiplier, case): ties (M = 0.5 and odd acc), negatives, int32 extremes,
    # shifts of -31 (M < 2^-31) and > 0 (M >= 1)
    multipliers = np.array([0.5, 0.5 * 2 ** -3, 0.3, 0.7 * 2.0 ** -31, 2.0 ** -40, 1.0, 3.7, 200.0])
    q, shift = fixed_point_multiplier(multipliers)
    acc = np.array([-5, -3, -1, 1, 3, 5, 12, -12, -4, 4, 2 ** 31 - 1, -2 ** 31, 1000, -1000, 2 ** 20, 0],
                   dtype=np.int32)
    acc = np.tile(acc[None, :], (len(multipliers), 1))
    acc[-1] = np.clip(acc[-1], -2 ** 23, 2 ** 23)  # |acc| * 2^shift stays below 2^32
    acc[-2] = np.clip(acc[-2], -2 ** 29, 2 ** 29)
    zero = np.array([0, 3, -7, 0, 0, 10, -128, 127], dtype=np.int32)
    expected = np.array([[np.clip(exact_requant(int(a), int(qi), int(si)) + int(z), -128, 127)
                          for a in row] for row, qi, si, z in zip(acc, q, shift, zero)], dtype=np.int8)
    got = requantize(acc, q[:, None], shift[:, None], zero[:, None], -128, 127)
    np.testing.assert_array_equal(got, expected)
    assert got[0, 1] == -1 and got[0, 4] == 2  # ties go up: -1.5 -> -1, 1.5 -> 2

    prim = requantize_primfunc(acc.shape, 0, len(q), True)
    out = np.zeros(acc.shape, np.int8)
    tvm_out = run(prim, acc, q, *(s.astype(np.int32) for s in shifts(shift)), rounding_term(q, shift), zero, out)
    np.testing.assert_array_equal(tvm_out, expected)


def test_requantize_carries_a_real_bias_in_one_rounding():
    """(acc + b) * M rounded once, b not rounded to the accumulator grid first; TVM agrees bit for bit."""
    channels = 16
    q, shift = fixed_point_multiplier(RNG.uniform(1e-4, 0.2, channels))
    bias = RNG.normal(0, 40, channels)
    acc = RNG.integers(-20000, 20000, (channels, 64)).astype(np.int32)
    expected = np.array([[np.clip(exact_requant(int(a), int(qi), int(si), float(b)), -128, 127) for a in row]
                         for row, qi, si, b in zip(acc, q, shift, bias)], dtype=np.int8)
    got = requantize(acc, q[:, None], shift[:, None], 0, -128, 127, bias=bias[:, None])
    np.testing.assert_array_equal(got, expected)
    rounded_first = requantize(acc + np.rint(bias).astype(np.int32)[:, None], q[:, None], shift[:, None], 0, -128, 127)
    assert np.any(rounded_first != got)  # what an int32 bias on the accumulator grid would change

    prim = requantize_primfunc(acc.shape, 0, channels, False)
    c = rounding_term(q, shift, bias)
    tvm_out = run(prim, acc, q, *(s.astype(np.int32) for s in shifts(shift)), c, np.zeros(channels, np.int32),
                  np.zeros(acc.shape, np.int8))
    np.testing.assert_array_equal(tvm_out, expected)


# -- conv2d ---------------------------------------------------------------------------------------

def conv_case(groups: int, quantized: bool, per_channel_act: bool, padding=(1, 1, 1, 1), strides=(1, 1)):
    """A QDQ conv2d module and its reference output for one random int8 input."""
    n, c, h, w, o, k = 1, 8, 7, 7, 8, 3
    x = int8((n, c, h, w))
    w_q = int8((o, c // groups, k, k))
    s_w = scales(o)
    bias = RNG.normal(0, 0.3, o).astype(np.float32)
    if per_channel_act:
        s_a = np.repeat(scales(groups, 0.01, 0.05), c // groups).astype(np.float32)
        z_a = RNG.integers(-20, 20, c).astype(np.int8)
    else:
        s_a, z_a = scales(1, 0.01, 0.05)[0], np.int8(-9)
    s_o, z_o = (scales(o, 0.05, 0.2), RNG.integers(-10, 10, o).astype(np.int8)) if quantized else (None, None)

    def body(bb, xv):
        xd = bb.emit(dq(xv, s_a, z_a, axis=1))
        wd = bb.emit(dq(const(w_q, "int8"), s_w, np.zeros(o, np.int8), axis=0))
        y = bb.emit(relax.op.nn.conv2d(xd, wd, strides=strides, padding=padding, groups=groups))
        if not quantized:  # the float island (and its float bias add) starts here
            return y
        y = bb.emit(relax.op.add(y, const(bias.reshape(1, o, 1, 1), "float32")))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"x": ((n, c, h, w), "int8")}, body)
    acc = ref.qconv2d(x, z_a, w_q, strides, padding, (1, 1), groups)
    s_a_out = s_a.reshape(groups, -1)[:, 0].repeat(o // groups) if per_channel_act else s_a
    acc_scale = np.float64(s_a_out) * s_w.astype(np.float64)
    if quantized:
        expected = ref.requantize_acc(acc, acc_scale, s_o, z_o, 1, bias=bias / acc_scale)
    else:
        expected = ref.dequantize_acc(acc, acc_scale, 1)
    return mod, x, expected


@pytest.mark.parametrize("groups,per_channel_act,padding,strides", [
    (1, False, (1, 1, 1, 1), (2, 2)),   # normal conv, per-tensor asymmetric input
    (8, True, (1, 1, 1, 1), (1, 1)),    # depthwise, channel-wise input scales and zero points
    (2, True, (0, 1, 2, 0), (1, 2)),    # grouped, group-wise scales, uneven padding
])
def test_conv2d_requantized_is_bit_exact(groups, per_channel_act, padding, strides):
    mod, x, expected = conv_case(groups, True, per_channel_act, padding, strides)
    got = run(integerized(mod), x)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, expected)
    float_qdq = run(mod, x).astype(np.int32)  # the float graph it replaces: within one step
    assert np.abs(float_qdq - got).max() <= 1


def test_depthwise_conv2d_float_output_is_bit_exact():
    mod, x, expected = conv_case(8, False, True)
    lowered = integerized(mod)
    np.testing.assert_array_equal(run(lowered, x), expected)


# -- matmul ---------------------------------------------------------------------------------------

def test_linear_requantized_is_bit_exact():
    """matmul(dequantize(x), permute_dims(dequantize(W, axis=0))) + bias -> quantize: torch's linear."""
    t, k, n = 5, 16, 12
    x, w_q = int8((1, t, k)), int8((n, k))
    s_a, z_a = np.float32(0.03), RNG.integers(-30, 30, k).astype(np.int8)  # channel-wise zero points
    s_w, bias = scales(n), RNG.normal(0, 0.2, n).astype(np.float32)
    s_o, z_o = np.float32(0.15), np.int8(4)

    def body(bb, xv):
        xd = bb.emit(dq(xv, s_a, z_a, axis=-1))
        wd = bb.emit(dq(const(w_q, "int8"), s_w, np.zeros(n, np.int8), axis=0))
        y = bb.emit(relax.op.matmul(xd, bb.emit(relax.op.permute_dims(wd))))
        y = bb.emit(relax.op.add(y, const(bias, "float32")))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"))

    mod = module({"x": ((1, t, k), "int8")}, body)
    acc_scale = np.float64(s_a) * s_w.astype(np.float64)
    acc = ref.qmatmul(x, z_a, w_q.T, 0)
    expected = ref.requantize_acc(acc, acc_scale, s_o, z_o, -1, bias=bias / acc_scale)
    np.testing.assert_array_equal(run(integerized(mod), x), expected)


def test_transposed_weight_float_output_is_bit_exact():
    """matmul(dequantize(x), dequantize(W^T, axis=1)) feeding a float island (GELU here)."""
    t, k, n = 4, 8, 6
    x, w_t = int8((t, k)), int8((k, n))
    s_a, z_a, s_w = np.float32(0.02), np.int8(-3), scales(n)

    def matmul(bb, xv):
        w = bb.emit(dq(const(w_t, "int8"), s_w, np.zeros(n, np.int8), axis=1))
        return relax.op.matmul(bb.emit(dq(xv, s_a, z_a)), w)

    acc = ref.qmatmul(x, z_a, w_t, 0)
    expected = ref.dequantize_acc(acc, np.float64(s_a) * s_w.astype(np.float64), -1)
    np.testing.assert_array_equal(run(integerized(module({"x": ((t, k), "int8")}, matmul)), x), expected)
    with_gelu = module({"x": ((t, k), "int8")}, lambda bb, xv: relax.op.nn.gelu(bb.emit(matmul(bb, xv))))
    assert run(integerized(with_gelu), x).shape == (t, n)


@pytest.mark.parametrize("transposed,quantized", [(True, True), (False, False)])
def test_attention_matmuls_are_bit_exact(transposed, quantized):
    """q @ k^T (k transposed after dequantize, requantized) and attn @ v (float out), asymmetric operands."""
    h, t, d = 2, 6, 8
    a, b = int8((1, h, t, d)), int8((1, h, t, d) if transposed else (1, h, d, t))
    (s_a, z_a), (s_b, z_b) = (np.float32(0.04), np.int8(7)), (np.float32(0.05), np.int8(-11))
    s_o, z_o = np.float32(0.9), np.int8(-2)

    def body(bb, av, bv):
        bd = bb.emit(dq(bv, s_b, z_b))
        bd = bb.emit(relax.op.permute_dims(bd, [0, 1, 3, 2])) if transposed else bd
        y = bb.emit(relax.op.matmul(bb.emit(dq(av, s_a, z_a)), bd))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8")) if quantized else y

    mod = module({"a": (a.shape, "int8"), "b": (b.shape, "int8")}, body)
    acc = ref.qmatmul(a, z_a, np.swapaxes(b, -1, -2) if transposed else b, z_b)
    acc_scale = np.float64(s_a) * np.float64(s_b)
    expected = (ref.requantize_acc(acc, acc_scale, s_o, z_o, -1) if quantized
                else ref.dequantize_acc(acc, acc_scale, -1))
    np.testing.assert_array_equal(run(integerized(mod), a, b), expected)


# -- what cannot be integerized -------------------------------------------------------------------

def test_unsupported_quantization_names_the_op():
    x_shape, w_q = (1, 4, 5, 5), int8((4, 4, 1, 1))

    def body(bb, xv):  # channel-wise input scales on a dense conv cannot leave the sum
        xd = bb.emit(dq(xv, scales(4), np.zeros(4, np.int8), axis=1))
        return relax.op.nn.conv2d(xd, bb.emit(dq(const(w_q, "int8"), scales(4), np.zeros(4, np.int8), axis=0)))

    with pytest.raises(HyqError, match=r"relax.nn.conv2d '\w+' in @main: the input scale varies"):
        integerize(module({"x": (x_shape, "int8")}, body))

    def float_conv(bb, xv):
        return relax.op.nn.conv2d(relax.op.astype(xv, "float32"), const(w_q, "float32"))

    with pytest.raises(HyqError, match=r"relax.nn.conv2d '\w+' in @main still computes in float32"):
        integerize(module({"x": (x_shape, "int8")}, float_conv))


def test_two_consumers_with_equal_quantizers_share_one_requantization():
    """A conv2d requantized alike for two consumers (equal plan quantizers): the rewrite keeps one integer
    layer, and both consumers read its result; every layer stays bit-exact."""
    from hyq_tvm.relax.verify import verify

    x, w_q = int8((1, 4, 5, 5)), int8((6, 4, 1, 1))
    w1, w2 = int8((3, 6, 1, 1)), int8((3, 6, 1, 1))
    s_a, z_a, s_w, s_o, z_o = np.float32(0.02), np.int8(3), scales(6), np.float32(0.3), np.int8(-1)

    def body(bb, xv):
        wd = bb.emit(dq(const(w_q, "int8"), s_w, np.zeros(6, np.int8), axis=0))
        y = bb.emit(relax.op.nn.conv2d(bb.emit(dq(xv, s_a, z_a, axis=1)), wd))
        outs = []
        for w in (w1, w2):
            q = bb.emit(relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1))
            wd2 = bb.emit(dq(const(w, "int8"), scales(3), np.zeros(3, np.int8), axis=0))
            outs.append(bb.emit(relax.op.nn.conv2d(bb.emit(dq(q, s_o, z_o, axis=1)), wd2)))
        return relax.op.add(*outs)

    mod = module({"x": ((1, 4, 5, 5), "int8")}, body)
    out, layers = integerize_layers(mod)
    assert [layer.out_scale is not None for layer in layers] == [True, False, False]
    assert layers[1].inputs == layers[2].inputs == (layers[0].result,)
    checks = verify(out, layers, x, TARGET)
    assert len(checks) == 3 and all(c.exact for c in checks)


# -- softmax (full mode) --------------------------------------------------------------------------

@pytest.mark.parametrize("bits,out_axis", [(8, None), (4, None), (8, 1)])
def test_quantized_softmax_becomes_the_integer_kernel(bits, out_axis):
    """quantize(softmax(dequantize(x))) -> table exp, Q30 probabilities, requantized: bit-exact with numpy
    and within one step of the float QDQ graph it replaces."""
    from hyq_tvm.relax.kernels import PROB_BITS, softmax_table

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = RNG.integers(lo, hi + 1, (2, 3, 9), dtype=np.int8)
    s_in, z_in = np.float32(0.9 if bits == 4 else 0.07), np.int8(2)
    s_o, z_o = np.float32(1 / (hi - lo)), np.int8(lo)
    if out_axis is not None:  # per channel along another axis (the heads of an attention)
        s_o = (s_o * RNG.uniform(0.5, 1, x.shape[out_axis])).astype(np.float32)
        z_o = RNG.integers(lo, lo + 8, x.shape[out_axis]).astype(np.int8)

    def body(bb, xv):
        y = bb.emit(relax.op.nn.softmax(bb.emit(dq(xv, s_in, z_in)), axis=-1))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=-1 if out_axis is None else out_axis)

    mod = module({"x": (x.shape, "int8")}, body)
    out, layers = integerize_layers(mod)
    assert [layer.op for layer in layers] == ["softmax"]
    assert not any("softmax" in str(op) for op in heavy_ops(out))
    assert "R.nn.softmax" not in out["main"].script()
    got = run(out, x)
    probs = ref.softmax_probs(x, softmax_table(s_in))
    expected = ref.requantize_acc(probs, 2.0 ** -PROB_BITS, s_o, z_o, 2 if out_axis is None else out_axis)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1
    assert np.all(np.abs(probs.astype(np.int64).sum(-1) - 2 ** PROB_BITS) <= x.shape[-1])  # sums to one


def test_softmax_over_another_axis_stays_float():
    x = int8((2, 5, 4))

    def body(bb, xv):
        y = bb.emit(relax.op.nn.softmax(bb.emit(dq(xv, np.float32(0.05), np.int8(0))), axis=1))
        return relax.op.quantize(y, const(np.float32(1 / 255), "float32"), const(np.int8(-128), "int8"))

    out, layers = integerize_layers(module({"x": (x.shape, "int8")}, body))
    assert layers == [] and "R.nn.softmax" in out["main"].script()


# -- ReLU / clip, residual adds and concatenations ------------------------------------------------

def assert_layers_bitexact(mod: tvm.IRModule, x: np.ndarray, ops: list[str]) -> np.ndarray:
    """Integerize `mod`, check its layers' ops and every layer against the reference (verify.py); the output."""
    from hyq_tvm.relax.verify import first_mismatch, verify

    out, layers = integerize_layers(mod)
    assert [layer.op for layer in layers] == ops
    checks = verify(out, layers, x, TARGET)
    assert first_mismatch(checks) is None, checks
    return run(out, x)


@pytest.mark.parametrize("act", ["relu", "clip"])
def test_relu_and_clip_after_a_layer_are_integer_clamps(act):
    """quantize(relu / clip(linear(x))) -> requantize, then max / min on int8: equal to the float QDQ graph
    up to its rounding (one step), and the clamp really bites (many outputs at the bounds)."""
    t, k, n = 6, 16, 10
    x, w_q = int8((1, t, k)), int8((n, k))
    s_a, s_w, s_o, z_o = np.float32(0.03), scales(n), np.float32(0.02), np.int8(-100)

    def body(bb, xv):
        y = bb.emit(relax.op.matmul(bb.emit(dq(xv, s_a, 0)), bb.emit(relax.op.permute_dims(
            bb.emit(dq(const(w_q, "int8"), s_w, np.zeros(n, np.int8), axis=0))))))
        y = bb.emit(relax.op.nn.relu(y) if act == "relu" else relax.op.clip(y, -0.5, 1.5))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"))

    mod = module({"x": ((1, t, k), "int8")}, body)
    got = assert_layers_bitexact(mod, x, ["matmul"])
    low, high = (-100, 127) if act == "relu" else (-125, -25)
    assert got.min() == low and got.max() == high
    assert np.mean((got == low) | (got == high)) > 0.2
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1


@pytest.mark.parametrize("per_channel", [False, True])
def test_residual_add_becomes_the_rescale_kernel(per_channel):
    """quantize(dequantize(a) + dequantize(b)): one rescaled int64 sum, rounded once; the float add is gone.
    b is a flipped a (one graph input, so that verify.py checks the layer from its own inputs)."""
    shape = (1, 6, 5, 5)
    a = int8(shape)
    if per_channel:
        s_a, z_a = scales(6, 0.01, 0.05), RNG.integers(-10, 10, 6).astype(np.int8)
        s_o, z_o = scales(6, 0.03, 0.08), RNG.integers(-5, 5, 6).astype(np.int8)
    else:
        s_a, z_a, s_o, z_o = np.float32(0.03), np.int8(7), np.float32(0.05), np.int8(-3)
    s_b, z_b = np.float32(0.011), np.int8(-20)

    def body(bb, av):
        bv = bb.emit(relax.op.flip(av, axis=3))
        y = bb.emit(relax.op.add(bb.emit(dq(av, s_a, z_a, axis=1)), bb.emit(dq(bv, s_b, z_b, axis=1))))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"a": (shape, "int8")}, body)
    got = assert_layers_bitexact(mod, a, ["add"])
    assert "R.add" not in integerize(mod)["main"].script()
    np.testing.assert_array_equal(got, ref.rescaled_sum([a, a[..., ::-1]], [z_a, z_b], [s_a, s_b], s_o, z_o, 1))
    assert np.abs(run(mod, a).astype(np.int32) - got).max() <= 1


def test_rescale_rounds_the_exact_sum_once():
    """requant.rescale against exact rationals: round-half-up of sum (x_i - z_i) * k_i / 2^R, and within
    one step of the real sum (x_i - z_i) * s_i / s_o for scales many powers of two apart."""
    from hyq_tvm.relax.requant import rescale, rescale_params

    xs = [np.arange(-128, 128, dtype=np.int64), RNG.integers(-128, 128, 256)]
    zs, in_scales, s_o = [3, -9], [np.float64(0.37), np.float64(2.0 ** -9)], np.float64(0.0213)
    k, c, rs = rescale_params(in_scales, s_o)
    got = rescale(xs, zs, in_scales, s_o, 0, -(2 ** 20), 2 ** 20, "int32")
    for i in range(256):
        total = sum((int(x[i]) - z) * int(k_i[0]) for x, z, k_i in zip(xs, zs, k))
        assert got[i] == int(np.floor(Fraction(total, 2 ** int(rs[0])) + Fraction(1, 2)))
    real = sum((x - z) * s for x, z, s in zip(xs, zs, in_scales)) / s_o
    assert np.abs(got - real).max() <= 0.5 + 1e-6
    with pytest.raises(HyqError, match="differ in scale by more than 2"):
        rescale_params([np.float64(1.0), np.float64(2.0 ** -30)], np.float64(2.0 ** -25))


@pytest.mark.parametrize("out_per_channel", [False, True])
def test_concat_rescales_each_input_to_the_output_grid(out_per_channel):
    """quantize(concat([dequantize(a), dequantize(b)], axis=1)): each input rescaled, int8 concatenated;
    per-channel output parameters along the concatenated axis are split between the inputs (b: a's first
    three channels, flipped)."""
    a = int8((1, 5, 4, 4))
    s_a, z_a = scales(5, 0.01, 0.04), RNG.integers(-9, 9, 5).astype(np.int8)
    s_b, z_b = np.float32(0.02), np.int8(1)
    s_o, z_o = ((scales(8, 0.02, 0.05), RNG.integers(-4, 4, 8).astype(np.int8)) if out_per_channel
                else (np.float32(0.03), np.int8(2)))

    def body(bb, av):
        bv = bb.emit(relax.op.flip(bb.emit(relax.op.strided_slice(av, axes=[1], begin=[0], end=[3])), axis=2))
        y = bb.emit(relax.op.concat([bb.emit(dq(av, s_a, z_a, axis=1)), bb.emit(dq(bv, s_b, z_b, axis=1))], axis=1))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"a": (a.shape, "int8")}, body)
    got = assert_layers_bitexact(mod, a, ["concat"])
    assert "R.dequantize" not in integerize(mod)["main"].script()
    b = a[:, :3, ::-1]
    np.testing.assert_array_equal(got, ref.rescaled_concat([a, b], [z_a, z_b], [s_a, s_b], s_o, z_o, 1, 1))
    assert np.abs(run(mod, a).astype(np.int32) - got).max() <= 1


# -- LayerNorm / GroupNorm (full mode) -------------------------------------------------------------

@pytest.mark.parametrize("kind,bits", [("layer_norm", 8), ("layer_norm", 4), ("group_norm", 8)])
def test_quantized_norm_becomes_the_integer_kernel(kind, bits):
    """quantize(norm(dequantize(x))) with channel-wise input scales (as Q-HyViT picks them) and channel-wise
    output scales -> the integer norm: bit-exact with numpy, and within one step of the float QDQ graph."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    shape, axis = ((2, 7, 24), 2) if kind == "layer_norm" else ((1, 12, 5, 6), 1)
    channels = shape[axis]
    x = RNG.integers(lo, hi + 1, shape, dtype=np.int8)
    s_in = scales(channels, 0.01, 0.2) * (8 if bits == 4 else 1)
    z_in = RNG.integers(lo // 4, hi // 4, channels).astype(np.int8)
    gamma, beta = RNG.uniform(0.5, 2, channels).astype(np.float32), RNG.normal(0, 0.5, channels).astype(np.float32)
    s_o = scales(channels, 0.02, 0.04) * (16 if bits == 4 else 1)
    z_o = RNG.integers(-3, 3, channels).astype(np.int8)

    def body(bb, xv):
        xd = bb.emit(dq(xv, s_in, z_in, axis=axis))
        g, b = const(gamma, "float32"), const(beta, "float32")
        y = bb.emit(relax.op.nn.layer_norm(xd, g, b, axes=[-1]) if kind == "layer_norm" else
                    relax.op.nn.group_norm(xd, g, b, num_groups=1, channel_axis=1, axes=[2, 3]))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=axis)

    mod = module({"x": (shape, "int8")}, body)
    got = assert_layers_bitexact(mod, x, ["norm"])
    float_qdq = run(mod, x).astype(np.int32)
    assert np.abs(float_qdq - got).max() <= 1
    assert np.mean(float_qdq == got) > 0.98


def test_integer_norm_square_root_is_exact():
    """The kernel's isqrt (floor of the correctly rounded float64 sqrt) equals math.isqrt below 2^52."""
    import math

    values = np.concatenate([np.arange(0, 5000), RNG.integers(0, 2 ** 52, 20000), 2 ** 52 - np.arange(1, 50),
                             np.array([k * k - 1 for k in RNG.integers(1, 2 ** 26, 2000)] +
                                      [k * k for k in RNG.integers(1, 2 ** 26, 2000)])]).astype(np.int64)
    got = np.floor(np.sqrt(values.astype(np.float64))).astype(np.int64)
    assert all(int(g) == math.isqrt(int(v)) for g, v in zip(got, values))


def test_norm_over_other_axes_stays_float():
    x = int8((2, 6, 8))

    def body(bb, xv):
        xd = bb.emit(dq(xv, np.float32(0.05), np.int8(0)))
        y = bb.emit(relax.op.nn.layer_norm(xd, const(np.ones((6, 8)), "float32"), const(np.zeros((6, 8)), "float32"),
                                           axes=[-2, -1]))
        return relax.op.quantize(y, const(np.float32(0.03), "float32"), const(np.int8(0), "int8"))

    out, layers = integerize_layers(module({"x": (x.shape, "int8")}, body))
    assert layers == [] and "R.nn.layer_norm" in out["main"].script()


# -- elementwise functions of int8 tensors: table lookups -----------------------------------------

@pytest.mark.parametrize("op,per_channel", [("gelu", False), ("silu", True), ("sigmoid", False), ("relu6", True),
                                            ("clip", False), ("leakyrelu", False)])
def test_elementwise_function_of_int8_becomes_a_table_lookup(op, per_channel):
    """quantize(f(dequantize(x))) -> one 256-entry table (per channel with channel-wise parameters): bit-exact
    with numpy, within one step of the float QDQ graph, and no float op left."""
    shape = (2, 6, 4, 4)
    x = int8(shape)
    s_in, z_in = (scales(6, 0.02, 0.06), RNG.integers(-5, 5, 6).astype(np.int8)) if per_channel else \
        (np.float32(0.04), np.int8(3))
    s_o, z_o = (scales(6, 0.01, 0.03), RNG.integers(-5, 5, 6).astype(np.int8)) if per_channel else \
        (np.float32(0.02), np.int8(-60))
    funcs = {"gelu": relax.op.nn.gelu, "silu": relax.op.nn.silu, "sigmoid": relax.op.sigmoid,
             "relu6": relax.op.nn.relu6, "clip": lambda v: relax.op.clip(v, -1.0, 2.5),
             "leakyrelu": lambda v: relax.op.nn.leakyrelu(v, 0.1)}

    def body(bb, xv):
        y = bb.emit(funcs[op](bb.emit(dq(xv, s_in, z_in, axis=1))))
        return relax.op.quantize(y, const(s_o, "float32"), const(z_o, "int8"), axis=1)

    mod = module({"x": (shape, "int8")}, body)
    got = assert_layers_bitexact(mod, x, ["lookup"])
    assert "R.dequantize" not in integerize(mod)["main"].script()
    assert np.abs(run(mod, x).astype(np.int32) - got).max() <= 1


def test_integer_kernels_fuse_with_relax_ops():
    """The kernels use int64 dims like TVM's own legalized ops, so FuseOps / FuseTIR (which MetaSchedule's
    task extraction runs) can fuse them with the conv2d and the zero-point add around them."""
    mod, x, expected = conv_case(2, True, True)
    fused = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                      relax.transform.FuseOps(), relax.transform.FuseTIR()])(integerized(mod))
    main = fused["main"].script()
    assert main.count("R.call_tir(") == 2 and "fused_conv2d_add_hyq_requantize" in main  # pad; conv + requantize
    np.testing.assert_array_equal(run(fused, x), expected)
