"""What a Relax module computes and holds: its ops by dtype and its constants' bytes."""
from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax


def _dtypes(expr: relax.Expr) -> list[str]:
    """dtypes of a tensor or of the tensors in a tuple."""
    if isinstance(expr, relax.Tuple):
        return [d for field in expr.fields for d in _dtypes(field)]
    ty = expr.ty
    return [str(ty.dtype)] if isinstance(ty, relax.TensorType) else []


def _functions(mod: tvm.IRModule):
    return [func for _, func in mod.functions_items() if isinstance(func, relax.Function)]


def op_census(mod: tvm.IRModule) -> dict[str, int]:
    """Count of each op call in the Relax functions, keyed `op(input dtypes)->output dtype`."""
    counts: Counter[str] = Counter()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            out = "/".join(_dtypes_of_call(e))
            counts[f"{e.op.name}({','.join(d for a in e.args for d in _dtypes(a))})->{out}"] += 1

    for func in _functions(mod):
        relax.analysis.post_order_visit(func.body, visit)
    return dict(sorted(counts.items()))


def _dtypes_of_call(call: relax.Call) -> list[str]:
    ty = call.ty
    if isinstance(ty, relax.TupleType):
        return [str(f.dtype) for f in ty.fields if isinstance(f, relax.TensorType)]
    return [str(ty.dtype)] if isinstance(ty, relax.TensorType) else []


def constant_bytes(mod: tvm.IRModule) -> dict[str, int]:
    """Bytes of the distinct tensor constants of the Relax functions, by dtype, and their total."""
    seen: dict[int, tuple[str, int]] = {}

    def visit(e):
        if isinstance(e, tvm.ir.expr.Constant) and isinstance(e.ty, relax.TensorType):
            value = e.value.numpy()
            seen[hash(e)] = (str(value.dtype), value.nbytes)

    for func in _functions(mod):
        relax.analysis.post_order_visit(func.body, visit)
    by_dtype: Counter[str] = Counter()
    for dtype, size in seen.values():
        by_dtype[dtype] += size
    return {**dict(sorted(by_dtype.items())), "total": sum(by_dtype.values())}


ENDS = ("relax.quantize(float32,float32,int8)->int8", "relax.dequantize(int8,float32,int8)->float32")


def float_ops(mod: tvm.IRModule) -> int:
    """Ops of the module that take or give float32, but for one quantize of the input and one dequantize of the
    output: 0 when it is integer from the input's quantize to the output's dequantize."""
    census = op_census(mod)
    return sum(n for op, n in census.items() if "float32" in op) - sum(min(census.get(op, 0), 1) for op in ENDS)
