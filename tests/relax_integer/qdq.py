"""Tiny QDQ Relax modules, their integerized forms and the host they run on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from hyq_tvm.relax.integer import integerize, integerize_layers

RNG = np.random.default_rng(0)
HEAVY_OPS = ("relax.nn.conv2d", "relax.matmul")


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
    """Compile for the host and run `main` (or the PrimFunc, whose last argument is its output)."""
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


def module(inputs: dict[str, tuple[tuple[int, ...], str]], body, kernels: dict | None = None) -> tvm.IRModule:
    """main(inputs) -> body(bb, *vars), with every op emitted in one dataflow block; `kernels` (name ->
    PrimFunc) are added first, as integerize adds them, and passed to body as a dict of GlobalVars."""
    bb = relax.BlockBuilder()
    gvs = {name: bb.add_func(f.with_attr("global_symbol", name), name) for name, f in (kernels or {}).items()}
    params = [relax.Var(n, relax.TensorType(s, d)) for n, (s, d) in inputs.items()]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params, **({"kernels": gvs} if kernels is not None else {})))
        bb.emit_func_output(out)
    return bb.get()


def int8(shape) -> np.ndarray:
    return RNG.integers(-128, 128, shape, dtype=np.int8)


def scales(n: int, lo: float = 0.002, hi: float = 0.02) -> np.ndarray:
    return RNG.uniform(lo, hi, n).astype(np.float32)


def grid(per_channel: bool, channels: int, lo: float = 0.01, hi: float = 0.05, zero: int = 10):
    """(scale, zero point) of a tensor: per channel (scales in [lo, hi), zero points in [-zero, zero)), or per tensor
    (the middle scale, one random zero point)."""
    if per_channel:
        return scales(channels, lo, hi), RNG.integers(-zero, zero, channels).astype(np.int8)
    return np.float32((lo + hi) / 2), np.int8(RNG.integers(-zero, zero))


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


def assert_layers_bitexact(mod: tvm.IRModule, x: np.ndarray, ops: list[str]) -> np.ndarray:
    """Integerize `mod`, check its layers' ops and every layer against the reference (verify.py); the output."""
    from hyq_tvm.relax.verify import first_mismatch, verify

    out, layers = integerize_layers(mod)
    assert [layer.op for layer in layers] == ops
    checks = verify(out, layers, x, TARGET)
    assert first_mismatch(checks) is None, checks
    return run(out, x)
