"""Dequantize moved below the layout ops it feeds, so that they move int8 values.

    reshape(dequantize(x_q, s, z), ...)        ->  dequantize(reshape(x_q, ...), s, z)
    split(dequantize(x_q, s, z), ...)[i]       ->  dequantize(split(x_q, ...)[i], s, z)

for the ops of LAYOUT, which only move or repeat elements, and a per-tensor (scalar) scale and zero point: the
result is the same float tensor, bit for bit. A dequantize of a constant (a weight) stays where it is.
"""
from __future__ import annotations

import functools
import operator

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, rewrite_call, wildcard

LAYOUT = ("relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims", "relax.broadcast_to",
          "relax.strided_slice", "relax.flatten", "relax.flip", "relax.repeat", "relax.tile")

_DQ = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_MOVE = functools.reduce(operator.or_, [is_op(name)(_DQ) for name in LAYOUT] +
                         [is_op(name)(_DQ, wildcard()) for name in LAYOUT])
_SPLIT = is_op("relax.split")(_DQ)
PATTERN = _MOVE | is_tuple_get_item(_SPLIT)


def _movable(dq: relax.Call) -> bool:
    """Whether `dq` dequantizes a non-constant tensor per tensor."""
    return (not isinstance(dq.args[0], tvm.ir.expr.Constant)
            and all(np.ndim(a.value.numpy()) == 0 for a in dq.args[1:]))


def _sunk(root: relax.Expr, m: dict, moves: list) -> relax.Expr:
    dq = m[_DQ]
    if not _movable(dq):
        return root
    moves.append(root)
    if isinstance(root, relax.TupleGetItem):
        split = m[_SPLIT]
        moved = relax.TupleGetItem(relax.Call(split.op, [dq.args[0], *split.args[1:]], split.attrs), root.index)
    else:
        moved = relax.Call(root.op, [dq.args[0], *root.args[1:]], root.attrs, root.ty_args)
    return relax.op.dequantize(moved, dq.args[1], dq.args[2], axis=int(dq.attrs.axis))


def sink_dequantize(mod: tvm.IRModule) -> tvm.IRModule:
    """Every Relax function of `mod` with its dequantizes below the layout ops, until none is left above one."""
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            moves = [None]
            while moves:
                moves = []
                func = rewrite_call(PATTERN, lambda root, m, moves=moves: _sunk(root, m, moves), func)
            out[gv] = func
    return out


def sink_pass() -> tvm.transform.Pass:
    """Module pass "hyq.SinkDequantize": sink_dequantize."""
    return tvm.transform.module_pass(lambda mod, _ctx: sink_dequantize(mod), opt_level=0, name="hyq.SinkDequantize")
