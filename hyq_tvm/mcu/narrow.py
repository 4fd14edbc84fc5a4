"""The constants of a static graph in fewer bytes, the kernels computing exactly what they did.

Per kernel parameter, over all the calls of the kernel (the argument a constant in every call):

    never read by the kernel                  dropped (from the PrimFunc and from every call)
    one value, the same in every call         dropped, the kernel holding the value
    one value repeated (each call its own)    one element (shape (1,)); every load indexes 0
    values that fit a narrower integer type   stored in the narrowest, divided by the largest power of two
                                              that divides them all where that makes it narrower still;
                                              every load cast back to the old type (and multiplied back)

then constants of the same dtype, shape and bytes passed as one Value.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx

from .graph import StaticGraph, Value

_INTEGERS = ("int8", "int16", "int32", "int64")


@dataclass(frozen=True)
class _Form:
    """How a constant parameter is passed: in `dtype`, as one element or not, divided by 2^shift; not at all where
    `value` is set (the value of every element in every call)."""

    dtype: str
    single: bool
    shift: int = 0
    value: int | None = None


def _reads(func: tirx.PrimFunc) -> tuple[Counter, Counter]:
    """Per parameter of `func`: its occurrences in the body, and those as the buffer of a load or of a block's read
    region."""
    index = {param: k for k, param in enumerate(func.params)}
    seen: Counter = Counter()
    loaded: Counter = Counter()

    def var(v):
        if v in index:
            seen[index[v]] += 1
        return v

    def load(node):
        if node.source in index:
            loaded[index[node.source]] += 1
        return node

    def block(node):
        for region in node.reads:
            load(region)
        return node

    tvm_ffi.structural_map(func.body, [(tvm.ir.Var, var), (tvm.ir.TensorLoad, load), (s_tir.SBlock, block)])
    return seen, loaded


def _form(param: tvm.ir.Var, arrays: list[np.ndarray]) -> _Form | None:
    """The form of parameter `param` given its constants (one per call); None where it stays as it is."""
    dtype = str(param.dtype)
    if dtype not in _INTEGERS or any(a.size == 0 for a in arrays):
        return None
    firsts = {int(a.flat[0]) for a in arrays}
    uniform = all((a == a.flat[0]).all() for a in arrays)
    if uniform and len(firsts) == 1:
        return _Form(dtype, True, value=firsts.pop())
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.int64)
    zeros = [(int(v) & -int(v)).bit_length() - 1 for v in np.unique(flat) if v]   # trailing zero bits
    shift = min(zeros + [np.iinfo(dtype).bits - 2])
    narrow = _narrowest(flat >> shift)
    if narrow == _narrowest(flat):
        shift = 0
    single = uniform and [int(d) for d in param.shape] != [1]
    return _Form(narrow, single, shift) if narrow != dtype or single else None


def _narrowest(values: np.ndarray) -> str:
    """The narrowest integer type that holds `values`."""
    return next(t for t in _INTEGERS if np.iinfo(t).min <= values.min() and values.max() <= np.iinfo(t).max)


def _buffer(param: tvm.ir.Var, form: _Form) -> tvm.ir.Var:
    """The buffer parameter `param` in `form`."""
    t = param.ty
    index = t.shape[0].ty.dtype if t.shape else "int64"
    return tirx.decl_buffer([tirx.const(1, index)] if form.single else t.shape, form.dtype, param.name,
                            elem_offset=t.elem_offset, scope=t.storage_scope, data_alignment=t.data_alignment,
                            offset_factor=t.offset_factor, layout=None if form.single else t.layout)


def _removed(forms: dict[int, _Form | None]) -> set[int]:
    """The parameters no longer passed."""
    return {k for k, form in forms.items() if form is None or form.value is not None}


def _rewrite(func: tirx.PrimFunc, forms: dict[int, _Form | None]) -> tirx.PrimFunc:
    """`func` with parameter k in forms[k] (None: dropped)."""
    held = {func.params[k]: form.value for k, form in forms.items() if form and form.value is not None}
    new = {func.params[k]: (_buffer(func.params[k], form), form) for k, form in forms.items()
           if form and form.value is None}

    def load(node):
        if node.source in held:
            return tirx.const(held[node.source], node.ty.dtype)
        if node.source not in new:
            return node
        buffer, form = new[node.source]
        zero = tirx.const(0, buffer.shape[0].ty.dtype)
        value = tirx.Cast(node.ty, tirx.BufferLoad(buffer, [zero] if form.single else node.indices))
        return value * tirx.const(1 << form.shift, node.ty.dtype) if form.shift else value

    def region(node):
        if node.source not in new:
            return node
        buffer, form = new[node.source]
        zero = tirx.const(0, buffer.shape[0].ty.dtype)
        return tirx.BufferRegion(buffer, [tvm.ir.Range.from_min_extent(zero, buffer.shape[0])]
                                 if form.single else node.region)

    def block(node):
        reads = [r for r in node.reads if r.source not in held]
        if len(reads) == len(node.reads):
            return node
        return s_tir.SBlock(node.iter_vars, reads, node.writes, node.name_hint, node.body, node.init,
                            node.alloc_buffers, node.match_buffers, node.annotations, node.span)

    body = tvm_ffi.structural_map(func.body, [(tvm.ir.TensorLoad, load), (tvm.ir.TensorRegion, region),
                                              (s_tir.SBlock, block)])
    params = [new[p][0] if p in new else p for k, p in enumerate(func.params) if k not in _removed(forms)]
    return tirx.PrimFunc(params, body, func.ret_type, func.attrs)


def _fresh(name: str, values: dict[str, Value]) -> str:
    """`name`, made unique among `values`."""
    while name in values:
        name += "_"
    return name


def narrow_constants(graph: StaticGraph) -> StaticGraph:
    """`graph` with its kernels' constant parameters dropped, narrowed or made one element where that gives the
    same values, and equal constants passed as one; Values no call uses any more left out."""
    values = dict(graph.values)
    args = [list(step.args) for step in graph.steps]
    made: dict[tuple[str, _Form], str] = {}
    kernels = {}
    for gv, func in graph.kernels.functions_items():
        calls = [i for i, step in enumerate(graph.steps) if step.kernel == gv.name_hint]
        inputs = len(func.params) - graph.steps[calls[0]].outputs if calls else 0
        seen, loaded = _reads(func)
        forms: dict[int, _Form | None] = {}
        for k in range(inputs):
            arrays = [values[args[i][k]].data for i in calls]
            if not seen[k]:
                forms[k] = None
            elif seen[k] == loaded[k] and all(a is not None for a in arrays):
                form = _form(func.params[k], arrays)
                if form:
                    forms[k] = form
        kernels[gv] = _rewrite(func, forms) if forms else func
        for i in calls:
            for k, form in forms.items():
                if form and form.value is None:
                    old = values[args[i][k]]
                    if (old.name, form) not in made:
                        data = old.data.reshape(-1)[:1] if form.single else old.data
                        name = _fresh(f"{old.name}_{form.dtype}{'_one' if form.single else ''}", values)
                        values[name] = replace(old, name=name, shape=data.shape, dtype=form.dtype,
                                               data=np.ascontiguousarray((data >> form.shift).astype(form.dtype)))
                        made[(old.name, form)] = name
                    args[i][k] = made[(old.name, form)]
            args[i] = [a for k, a in enumerate(args[i]) if k not in _removed(forms)]
    first: dict[tuple, str] = {}
    for call in args:
        for j, name in enumerate(call):
            value = values[name]
            if value.data is not None:
                call[j] = first.setdefault((value.dtype, value.shape, value.data.tobytes()), name)
    used = {a for call in args for a in call} | set(graph.views) | set(graph.views.values())
    values = {n: v for n, v in values.items() if v.data is None or n in used}
    steps = [replace(step, args=tuple(call)) for step, call in zip(graph.steps, args)]
    return replace(graph, kernels=tvm.IRModule(kernels), values=values, steps=steps)
