"""4-bit weights packed two per byte: a conv2d / matmul weight constant whose values all lie in [-8, 7] (a W4 plan's
weights, or lower) replaced by a kernel that unpacks it from half as many bytes, just before the layer runs.

    conv2d(x, W)  ->  conv2d(x, unpack(P))     P[i] = (W[2i] & 15) | W[2i + 1] << 4  (row-major elements of W;
                                                an odd count padded with a zero nibble)
    unpack(P)[j]  =  the signed nibble j of P  (low nibble first): the same int8 values as W
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

LOW, HIGH = -8, 7
_GEMM = is_op("relax.nn.conv2d")(wildcard(), is_const()) | is_op("relax.matmul")(wildcard(), is_const())


def pack_int4(weight: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] two per byte, low nibble first (row-major order)."""
    flat = weight.astype(np.int16).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, 0)
    nibbles = flat & 15
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).view(np.int8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The int8 tensor of `shape` that pack_int4 packed."""
    bytes_ = packed.astype(np.int16) & 255
    nibbles = np.stack([bytes_ & 15, bytes_ >> 4], axis=1).reshape(-1)
    return np.where(nibbles > 7, nibbles - 16, nibbles)[:int(np.prod(shape))].reshape(shape).astype(np.int8)


def _unpack_te(packed: te.Tensor, shape: tuple[int, ...]) -> te.Tensor:
    def element(*index):
        flat = index[0]
        for dim, i in zip(shape[1:], index[1:]):
            flat = flat * dim + i
        byte = packed[flat // 2].astype("uint8").astype("int32")   # 0 .. 255
        nibble = (byte >> (flat % 2) * 4) & 15
        return (nibble - ((nibble >> 3) << 4)).astype("int8")      # 8 .. 15 -> -8 .. -1
    return te.compute(shape, element, name="unpacked")


def _fits(weight: np.ndarray) -> bool:
    return weight.dtype == np.int8 and weight.size > 1 and LOW <= int(weight.min()) and int(weight.max()) <= HIGH


class Unpacker:
    """A weight as the expression that gives it: its constant, or where it fits in 4 bits the call of the kernel
    that unpacks it from its packed constant (one kernel per shape, added to the builder's module)."""

    def __init__(self, bb: relax.BlockBuilder):
        self.bb = bb
        self.kernels: dict[tuple[int, ...], tvm.ir.GlobalVar] = {}

    def __call__(self, weight: np.ndarray) -> relax.Expr:
        if not _fits(weight):
            return relax.const(weight)
        shape = tuple(int(d) for d in weight.shape)
        if shape not in self.kernels:
            packed = te.placeholder(((int(np.prod(shape)) + 1) // 2,), "int8", name="packed")
            func = te.create_prim_func([packed, _unpack_te(packed, shape)])
            self.kernels[shape] = self.bb.add_func(func, f"hyq_unpack_int4_{len(self.kernels)}")
        return relax.call_tir(self.kernels[shape], [relax.const(pack_int4(weight))], relax.TensorType(shape, "int8"))


def pack_weights_int4(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with each conv2d / matmul weight constant that fits in 4 bits unpacked from its packed form."""
    bb = relax.BlockBuilder(mod)
    unpacked = Unpacker(bb)

    def rewrite(call: relax.Call, _matches) -> relax.Expr:
        weight = call.args[1].value.numpy()
        if not _fits(weight):
            return call
        return relax.Call(call.op, [call.args[0], unpacked(weight)], call.attrs, call.ty_args)

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            bb.update_func(gv, rewrite_call(_GEMM, rewrite, func))
    return bb.get()
