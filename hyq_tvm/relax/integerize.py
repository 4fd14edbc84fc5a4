"""Relax passes that turn QDQ-annotated conv2d / matmul (and full mode's softmax) into integer arithmetic.

The QuantPlan reaches the compiler as `relax.op.quantize` / `relax.op.dequantize` around every
quantized op. `integerize` finds, with tvm.relax.dpl patterns,

    [quantize(] [add(] OP(dequantize(x_q, s_a, z_a), B) [, bias)] [, s_o, z_o)]

where OP is `relax.nn.conv2d` (NCHW/OIHW, any groups) or `relax.matmul`, and B is the weight
`dequantize(w_q const, s_w, 0)` (per tensor or per output channel; for matmul also under
`permute_dims`, the form of a linear layer) or, for matmul, a dequantized activation. It emits

    acc = OP(x_q, w_q, out_dtype=int32)            int8 x int8 -> int32
        + offset                                   int32, one per output channel: the zero-point terms (a
                                                   padded input is padded with its zero point)
    then, when quantized:   requantize(acc, multiplier s_a * s_w / s_o as Q31 + shift, bias / (s_a * s_w), z_o)
                            -> int8, the bias carried exactly in the 64-bit rounding term (requant.py)
    else (a float island):  float(acc) * (s_a * s_w), the bias left as the float add that follows.

A ReLU or clip between OP (and its bias) and the quantize becomes a clamp of the requantized int8 values
(exact: quantization is monotonic, so it commutes with max / min).

A residual add or a concatenation of dequantized int8 tensors that is quantized again,

    quantize(add(dequantize(a_q), dequantize(b_q)))     quantize(concat([dequantize(x_q), ...], axis))

becomes the rescale kernel: each input's zero point removed, multiplied by its own fixed-point ratio
s_in / s_out on a common shift, summed in int64, rounded once (requant.rescale_params); a concatenation
rescales each input to the output grid and concatenates int8 tensors.

A softmax whose input and output are quantized (full mode), quantize(softmax(dequantize(x_q), last axis)),
becomes the integer softmax of kernels.py: exp from a 256-entry Q30 table, Q30 probabilities, requantized.
An elementwise function of a dequantized int8 tensor that is quantized again, quantize(f(dequantize(x_q)))
for f in ELEMENTWISE (ReLU, clip and ReLU6, GELU, SiLU, sigmoid, tanh, leaky ReLU), becomes a lookup in a
256-entry int8 table (one per channel for channel-wise parameters) computed here in float64.
A quantized LayerNorm over the last axis (or GroupNorm with one group) of a dequantized int8 tensor, with
per-channel input scales (full mode), becomes the integer norm of kernels.py: all channels on one integer
grid, int64 mean and variance, an integer square root, and the affine output in fixed point.

Scales and zero points must be constants. Anything that cannot be integerized raises a HyqError.
`integerize_layers` also returns an `IntegerLayer` record per rewritten op, for the layer-by-layer
bit-exact check of verify.py.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from ..errors import HyqError
from .importer import marked_layer
from .kernels import (PROB_BITS, lookup_primfunc, lookup_table, norm_params, norm_primfunc, requantize_primfunc,
                      rescale_primfunc, softmax_primfunc, softmax_table)
from .reference import INT32, along
from .requant import fixed_point_multiplier, rescale_params, rounding_term, shifts

INTEGER_OPS = ("relax.nn.conv2d", "relax.matmul")


@dataclass(frozen=True)
class _Operand:
    """A dequantized operand: the integer tensor and its constant scale and zero point."""

    data: relax.Expr
    scale: np.ndarray       # float64, () or (C,)
    zero_point: np.ndarray  # int64, () or (C,)
    axis: int               # non-negative channel axis of `expr`
    axes: tuple[int, ...] | None = None  # permutation applied to an activation (permute_dims after dequantize)

    @property
    def values(self) -> np.ndarray | None:
        return self.data.value.numpy() if isinstance(self.data, tvm.ir.expr.Constant) else None

    @property
    def expr(self) -> relax.Expr:
        """The integer operand as the op sees it."""
        return self.data if self.axes is None else relax.op.permute_dims(self.data, self.axes)


@dataclass(frozen=True)
class _Core:
    """An integer conv2d / matmul: its int32 result, constant int32 offset and per-channel scale."""

    acc: relax.Expr
    offset: np.ndarray | None  # int64, broadcasts against acc
    scale: np.ndarray          # float64 accumulator scale, () or (C,) along `axis`
    axis: int
    op: str                    # "conv2d" or "matmul"
    inputs: tuple[relax.Expr, ...]       # the integer activation(s)
    weight: np.ndarray | None            # int8 constant operand: OIHW, or (K, N) for matmul
    zero_points: tuple[np.ndarray, ...]  # of A and B, int64 () or per channel
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IntegerLayer:
    """One integer conv2d / matmul / softmax of the graph: what reference.py needs to recompute its result.

    result = requantize_acc(OP(inputs, weight, zero_points), acc_scale, out_scale, out_zero_point, bias=bias)
    when out_scale is set, else dequantize_acc(OP(...), acc_scale); for a softmax OP is softmax_probs with
    attrs["table"]; a norm is reference.integer_norm, a lookup reference.lookup, an add / concat
    requant.rescale of its inputs (these leave acc_scale unused). `inputs` and `result` are Relax vars of
    the integerized function. An op whose output is both requantized and used in float (a residual) has
    one record per result.
    """

    name: str                 # plan layer (from the marked var names), else the result var's name
    op: str                   # "conv2d", "matmul", "softmax", "norm", "lookup", "add" or "concat"
    attrs: dict[str, Any]     # conv2d: strides, padding, dilation, groups; matmul of activations: b_axes;
                              # softmax, lookup: table; norm: params (NormParams), reduce_axes;
                              # add / concat: scales (one per input, along axis), dim (concat)
    inputs: tuple[relax.Var, ...]
    weight: np.ndarray | None
    zero_points: tuple[np.ndarray, ...]
    bias: np.ndarray | None   # float64 bias in accumulator steps (bias / acc_scale), () or (C,) along axis
    acc_scale: np.ndarray     # float64, () or (C,) along axis
    axis: int                 # non-negative channel axis of the result
    out_scale: np.ndarray | None
    out_zero_point: np.ndarray | None
    out_dtype: str
    result: relax.Var
    clamp: tuple[np.ndarray, np.ndarray] | None = None  # int64 (low, high) of a ReLU / clip after requantization


def _patterns():
    """(root of a quantized-output match, root of a float-output match, named sub-patterns)."""
    a = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
    b = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
    b_t = is_op("relax.permute_dims")(b)
    conv = is_op("relax.nn.conv2d")(a, b)
    matmul = is_op("relax.matmul")(a, b | b_t)
    core = conv | matmul
    bias = is_op("relax.add")(core, is_const())
    relu = is_op("relax.nn.relu")(bias | core)
    clip = is_op("relax.clip")(bias | core, wildcard(), wildcard())
    quant = is_op("relax.quantize")(relu | clip | bias | core, is_const(), is_const())
    return quant, core, dict(a=a, b=b, b_t=b_t, conv=conv, matmul=matmul, bias=bias, relu=relu, clip=clip)


def _norm_pattern():
    """(root, named sub-patterns) of quantize(layer_norm | group_norm(dequantize(x_q), gamma, beta))."""
    dq = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
    layer_norm = is_op("relax.nn.layer_norm")(dq, is_const(), is_const())
    group_norm = is_op("relax.nn.group_norm")(dq, is_const(), is_const())
    root = is_op("relax.quantize")(layer_norm | group_norm, is_const(), is_const())
    return root, {"layer_norm": layer_norm, "group_norm": group_norm, "input": dq}


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(v)


def _clip_bounds(call: relax.Call) -> tuple[float, float]:
    """(min, max) of a relax.clip call."""
    return tuple(float(getattr(v.value, "value", v.value)) for v in call.args[1:3])


# Elementwise Relax ops with a quantized input and output, as numpy float64 functions of (values, call).
ELEMENTWISE = {
    "relax.nn.relu": lambda v, call: np.maximum(v, 0.0),
    "relax.nn.leakyrelu": lambda v, call: np.where(v >= 0, v, float(call.attrs.alpha) * v),
    "relax.clip": lambda v, call: np.clip(v, *_clip_bounds(call)),
    "relax.nn.gelu": lambda v, call: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))),
    "relax.nn.gelu_tanh": lambda v, call: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3))),
    "relax.nn.silu": lambda v, call: v / (1.0 + np.exp(-v)),
    "relax.sigmoid": lambda v, call: 1.0 / (1.0 + np.exp(-v)),
    "relax.tanh": lambda v, call: np.tanh(v),
}


def _lookup_pattern():
    """(root, named sub-patterns) of quantize(f(dequantize(x_q))) for an elementwise f of ELEMENTWISE."""
    dq = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
    funcs = [is_op(name)(dq, *((wildcard(), wildcard()) if name == "relax.clip" else ())) for name in ELEMENTWISE]
    func = functools.reduce(operator.or_, funcs)
    return is_op("relax.quantize")(func, is_const(), is_const()), {"func": func, "input": dq}


def _rescale_patterns():
    """Roots of quantize(add(dequantize(a), dequantize(b))) and quantize(concat(...)), named sub-patterns."""
    dq = [is_op("relax.dequantize")(wildcard(), is_const(), is_const()) for _ in range(2)]
    add = is_op("relax.add")(*dq)
    concat = is_op("relax.concat")(wildcard())
    quant = is_op("relax.quantize")(add | concat, is_const(), is_const())
    return quant, {"add": add, "concat": concat, "a": dq[0], "b": dq[1]}


def _softmax_pattern():
    """(root, named sub-patterns) of quantize(softmax(dequantize(x_q)))."""
    dq = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
    softmax = is_op("relax.nn.softmax")(dq)
    return is_op("relax.quantize")(softmax, is_const(), is_const()), {"softmax": softmax, "input": dq}


def _requant_params(acc_scale, s_o, z_o, bias) -> list[np.ndarray]:
    """The requantization arrays q, ls, rs (int32), c (int64) and zp (int32) of kernels.py, one per channel."""
    q, shift = fixed_point_multiplier(np.asarray(acc_scale, np.float64) / s_o)
    c = rounding_term(q, shift, 0.0 if bias is None else bias)
    left, right = shifts(shift)
    width = np.broadcast(q, shift, z_o, c).size
    return [np.broadcast_to(v, (width,)).astype(dtype) for v, dtype in (
        (q, np.int32), (left, np.int32), (right, np.int32), (c, np.int64), (z_o, np.int32))]


def _consts(arrays) -> list[relax.Constant]:
    return [relax.const(a, str(a.dtype)) for a in arrays]


def _shape(expr: relax.Expr, where: str) -> tuple[int, ...]:
    shape = expr.ty.shape
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        raise HyqError(f"{where}: needs a static shape, got {shape}")
    return tuple(int(d) for d in shape)


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _qparams(call: relax.Call, ndim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Scale (float64) and zero point (int64), each () or (C,), and the axis of a (de)quantize call."""
    s = call.args[1].value.numpy().astype(np.float64).reshape(-1)
    z = call.args[2].value.numpy().astype(np.int64).reshape(-1)
    return (s.reshape(()) if s.size == 1 else s), (z.reshape(()) if z.size == 1 else z), int(call.attrs.axis) % ndim


def _operand(dq: relax.Call, where: str) -> _Operand:
    """Read a dequantize call: its int8 input and constant scale / zero point."""
    data = dq.args[0]
    if _dtype(data) != "int8":
        raise HyqError(f"{where}: dequantizes {_dtype(data)}; only int8 tensors are integerized")
    return _Operand(data, *_qparams(dq, data.ty.ndim))


def _transposed(op: _Operand, perm_call: relax.Call) -> _Operand:
    """The operand seen through permute_dims (a linear layer's transposed weight)."""
    ndim = op.data.ty.ndim
    axes = list(range(ndim))[::-1] if perm_call.attrs.axes is None else [int(i) for i in perm_call.attrs.axes]
    if op.values is not None:
        return replace(op, data=relax.const(np.transpose(op.values, axes)), axis=axes.index(op.axis))
    return replace(op, axes=tuple(axes), axis=axes.index(op.axis))


def _uniform(values: np.ndarray) -> np.ndarray | None:
    """The single value of a scalar or constant vector, else None."""
    return values.reshape(-1)[:1].reshape(()) if np.all(values == values.reshape(-1)[0]) else None


def _per_channel(values: np.ndarray, op: _Operand, axis: int, channels: int, what: str, where: str) -> np.ndarray:
    """A scale or zero point as () or (channels,), checking it runs along `axis`."""
    uniform = _uniform(values)
    if uniform is not None:
        return uniform
    if op.axis != axis or values.size != channels:
        raise HyqError(f"{where}: {what} is per channel along axis {op.axis} ({values.size} values);"
                       f" only axis {axis} with {channels} channels can be integerized")
    return values


def _weight(op: _Operand, axis: int, channels: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, scale () or (channels,)) of a constant, symmetric weight."""
    if op.values is None:
        raise HyqError(f"{where}: the weight is not a constant")
    if np.any(op.zero_point != 0):
        raise HyqError(f"{where}: the weight has non-zero zero points; weights must be symmetric")
    return op.values, _per_channel(op.scale, op, axis, channels, "the weight scale", where)


def _padded_with_zero_points(x: relax.Expr, z_a: np.ndarray, shape, padding) -> relax.Expr:
    """x_q padded with its zero points (z_a per tensor or per channel), so that the centered input
    x_q - z_a is zero-padded as in the float conv2d and the zero-point term is one sum per channel."""
    top, left, bottom, right = padding
    pad_width = [0, 0, 0, 0, top, bottom, left, right]
    if z_a.ndim == 0:
        return relax.op.nn.pad(x, pad_width, pad_value=float(z_a))
    n, c, h, w = shape
    inside = np.zeros((1, 1, h + top + bottom, w + left + right), bool)
    inside[:, :, top:top + h, left:left + w] = True
    z = relax.const(z_a.astype(np.int8).reshape(1, c, 1, 1), "int8")
    return relax.op.where(relax.const(inside), relax.op.nn.pad(x, pad_width), z)


def _conv2d(call: relax.Call, a: _Operand, w: _Operand, where: str) -> _Core:
    """int8 conv2d with int32 accumulation; the activation scale must be constant within each group."""
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    if layouts != ("NCHW", "OIHW", "NCHW"):
        raise HyqError(f"{where}: layouts {'/'.join(layouts)}; only NCHW/OIHW/NCHW is integerized")
    in_shape = _shape(a.data, where)
    w_q, s_w = _weight(w, 0, _shape(w.data, where)[0], where)
    groups, out_ch = int(attrs.groups), w_q.shape[0]
    s_a = _per_channel(a.scale, a, 1, in_shape[1], "the input scale", where)
    if s_a.ndim:
        per_group = s_a.reshape(groups, -1)
        if np.any(per_group != per_group[:, :1]):
            raise HyqError(f"{where}: the input scale varies within a convolution group;"
                           " fold channel-wise input scales into the weight")
        s_a = np.repeat(per_group[:, 0], out_ch // groups)
    z_a = _per_channel(a.zero_point, a, 1, in_shape[1], "the input zero point", where)
    padding = tuple(int(p) for p in attrs.padding)
    x, offset = a.data, None
    if np.any(z_a):
        if any(padding):
            x, padding = _padded_with_zero_points(x, z_a, in_shape, padding), (0, 0, 0, 0)
        z = np.broadcast_to(z_a, (in_shape[1],)).reshape(groups, 1, -1, 1, 1).astype(np.int64)
        w_sum = (w_q.astype(np.int64).reshape(groups, out_ch // groups, -1, *w_q.shape[2:]) * z).sum(axis=(2, 3, 4))
        offset = -w_sum.reshape(1, out_ch, 1, 1)
    acc = relax.op.nn.conv2d(x, relax.const(w_q), strides=attrs.strides, padding=padding,
                             dilation=attrs.dilation, groups=groups, out_dtype="int32")
    conv_attrs = {k: tuple(int(v) for v in getattr(attrs, k)) for k in ("strides", "padding", "dilation")}
    return _Core(acc, offset, s_a * s_w, 1, "conv2d", (a.data,), w_q, (z_a, np.int64(0)),
                 {**conv_attrs, "groups": groups})


def _matmul_weight(a: _Operand, b: _Operand, where: str) -> _Core:
    """int8 x @ W with a constant (K, N) weight, per-tensor or per-N weight scales."""
    if b.values.ndim != 2:
        raise HyqError(f"{where}: a constant matmul operand must be a 2-D weight, got {b.values.ndim}-D")
    k = b.values.shape[0]
    w_q, s_w = _weight(b, 1, b.values.shape[1], where)
    z_a = _per_channel(a.zero_point, a, _last(a), k, "the input zero point", where)
    acc = relax.op.matmul(a.data, relax.const(w_q), out_dtype="int32")
    offset = -(np.broadcast_to(z_a, (k,)) @ w_q.astype(np.int64)) if np.any(z_a) else None
    return _Core(acc, offset, _scalar(a.scale, "the input scale", where) * s_w, -1, "matmul", (a.data,), w_q,
                 (z_a, np.int64(0)))


def _matmul_activations(a: _Operand, b: _Operand, where: str) -> _Core:
    """int8 a @ b of two activations (per-tensor quantized) with the zero-point terms computed at run time."""
    s_a, s_b = _scalar(a.scale, "the scale of A", where), _scalar(b.scale, "the scale of B", where)
    z_a, z_b = _scalar(a.zero_point, "the zero point of A", where), _scalar(b.zero_point, "the zero point of B", where)
    acc = relax.op.matmul(a.data, b.expr, out_dtype="int32")
    if z_a:
        col = relax.op.sum(relax.op.astype(b.expr, "int32"), axis=[-2], keepdims=True)
        acc = relax.op.subtract(acc, relax.op.multiply(col, relax.const(int(z_a), "int32")))
    if z_b:
        row = relax.op.sum(relax.op.astype(a.data, "int32"), axis=[-1], keepdims=True)
        acc = relax.op.subtract(acc, relax.op.multiply(row, relax.const(int(z_b), "int32")))
    k = _shape(a.data, where)[-1]
    offset = np.array(k * int(z_a) * int(z_b), np.int64) if z_a and z_b else None
    return _Core(acc, offset, s_a * s_b, -1, "matmul", (a.data, b.data), None, (z_a, z_b), {"b_axes": b.axes})


def _last(op: _Operand) -> int:
    return op.data.ty.ndim - 1


def _scalar(values: np.ndarray, what: str, where: str) -> np.ndarray:
    """A per-tensor value; a HyqError when it is a varying per-channel one."""
    value = _uniform(values)
    if value is None:
        raise HyqError(f"{where}: {what} must be per tensor here (it is summed over)")
    return value


class _Integerizer:
    """The rewriters and the kernels (PrimFuncs) they add to the module."""

    def __init__(self, mod: tvm.IRModule):
        self.builder = relax.BlockBuilder(mod)
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.quant, self.core, self.named = _patterns()
        self.softmax_root, self.softmax_pattern = _softmax_pattern()
        self.rescale_root, self.rescale_pattern = _rescale_patterns()
        self.norm_root, self.norm_pattern = _norm_pattern()
        self.lookup_root, self.lookup_pattern = _lookup_pattern()
        self.layers: dict[relax.Var, IntegerLayer] = {}

    def where(self, func_name: str, func: relax.Function, call: relax.Call) -> str:
        """'<op> <var> in @<function>' for the binding that computes `call`."""
        var = _bound_var(func, call)
        return f"{call.op.name} '{var.name if var is not None else '?'}' in @{func_name}"

    def record(self, func_name: str, func: relax.Function, root: relax.Call, first_dq: relax.Call, op: str,
               attrs: dict, inputs, weight, zero_points, **out) -> None:
        """Keep the IntegerLayer of a match rewritten in @main (keyed by its result var), named by the plan
        layer whose marked input `first_dq` is."""
        if func_name != "main":
            return
        result = _bound_var(func, root)
        act = _bound_var(func, first_dq)
        name = marked_layer(act.name) if act is not None else None
        inputs = tuple(inputs)
        if result is None or not all(isinstance(v, relax.Var) for v in inputs):
            raise HyqError(f"{self.where(func_name, func, root)}: its inputs or result are not bound to vars")
        self.layers[result] = IntegerLayer(name or result.name, op, attrs, inputs, weight, zero_points,
                                           result=result, **out)

    def core_record(self, func_name: str, func: relax.Function, root: relax.Call, m: dict, core: _Core, **out):
        self.record(func_name, func, root, m[self.named["a"]], core.op, core.attrs, core.inputs, core.weight,
                    core.zero_points, **out)

    def core_of(self, m: dict, where: str) -> _Core:
        """The integer conv2d / matmul of a match."""
        n = self.named
        a = _operand(m[n["a"]], where)
        b = _operand(m[n["b"]], where)
        if n["conv"] in m:
            return _conv2d(m[n["conv"]], a, b, where)
        if n["b_t"] in m:
            b = _transposed(b, m[n["b_t"]])
        return _matmul_weight(a, b, where) if b.values is not None else _matmul_activations(a, b, where)

    def kernel(self, key: tuple, make) -> tvm.ir.GlobalVar:
        """The module's PrimFunc for `key`, made by `make()` and added on first use."""
        if key not in self.kernels:
            name = f"hyq_{key[0]}{sum(k[0] == key[0] for k in self.kernels)}"
            self.kernels[key] = self.builder.add_func(make().with_attr("global_symbol", name), name)
        return self.kernels[key]

    def accumulate(self, core: _Core, where: str) -> relax.Expr:
        """acc + offset in int32."""
        if core.offset is None:
            return core.acc
        if np.any(core.offset < INT32.min) or np.any(core.offset > INT32.max):
            raise HyqError(f"{where}: the int32 zero-point offset overflows")
        return relax.op.add(core.acc, relax.const(core.offset.astype(np.int32)))

    def quantized(self, func_name: str, func: relax.Function):
        """Rewriter for quantize([add(] core [, bias)]): int32 accumulation, then Q31 requantization."""
        def rewrite(root: relax.Call, m: dict) -> relax.Expr:
            n = self.named
            op = m[n["conv"]] if n["conv"] in m else m[n["matmul"]]
            where = self.where(func_name, func, op)
            core = self.core_of(m, where)
            shape = _shape(root, where)
            axis = core.axis % len(shape)
            channels = shape[axis]
            bias = None
            if n["bias"] in m:
                bias = _bias_vector(m[n["bias"]].args[1].value.numpy(), shape, axis, where) / core.scale
            acc = self.accumulate(core, where)
            out = _operand_like(root, where)
            s_o = _per_channel(out.scale, out, axis, channels, "the output scale", where)
            z_o = _per_channel(out.zero_point, out, axis, channels, "the output zero point", where)
            params = _requant_params(core.scale, s_o, z_o, bias)
            out_dtype = str(root.attrs.out_dtype)
            key = ("requantize", shape, axis, params[0].size, bool(np.any(params[1])), out_dtype)
            gv = self.kernel(key, lambda: requantize_primfunc(*key[1:]))
            result = relax.call_tir(gv, [acc, *_consts(params)], relax.TensorType(shape, out_dtype))
            clamp = _clamp(m, n, s_o, z_o, out_dtype)
            if clamp is not None:
                low, high = (relax.const(along(v, axis, len(shape)).astype(out_dtype), out_dtype) for v in clamp)
                result = relax.op.minimum(relax.op.maximum(result, low), high)
            self.core_record(func_name, func, root, m, core, bias=bias, acc_scale=core.scale, axis=axis,
                             out_scale=s_o, out_zero_point=z_o, out_dtype=out_dtype, clamp=clamp)
            return result
        return rewrite

    def rescaled(self, func_name: str, func: relax.Function):
        """Rewriter for a quantized add / concat of dequantized int8 tensors: the rescale kernel of kernels.py.
        Inputs that are not all dequantized int8 tensors, or scales along different axes, stay in float."""
        def rewrite(root: relax.Call, m: dict) -> relax.Expr:
            named = self.rescale_pattern
            add = m.get(named["add"])
            op = add if add is not None else m[named["concat"]]
            where = self.where(func_name, func, op)
            fields = [m[named["a"]], m[named["b"]]] if add is not None else _tuple_fields(func, op.args[0])
            if fields is None or not all(_is_dequantize(f) and _dtype(f.args[0]) == "int8" for f in fields):
                return root
            shape = _shape(root, where)
            out = _operand_like(root, where)
            dim = int(op.attrs.axis) % len(shape) if add is None else None
            ins = [_operand(f, where) for f in fields]
            axes = _channel_axes(out, *ins)
            if len(axes) > 1 or (add is not None and any(_shape(o.data, where) != shape for o in ins)):
                return root
            axis = axes.pop() if axes else out.axis
            out_dtype = str(root.attrs.out_dtype)
            if add is not None:
                pieces = [self.rescale_call(ins, out.scale, out.zero_point, out, axis, where, out_dtype)]
            else:  # each input rescaled on its own, with its slice of per-channel output parameters along dim
                ends = np.cumsum([0] + [_shape(o.data, where)[dim] for o in ins])
                pieces = [self.rescale_call([o], *(v[ends[i]:ends[i + 1]] if dim == axis and v.ndim else v
                                                   for v in (out.scale, out.zero_point)), out, axis, where, out_dtype)
                          for i, o in enumerate(ins)]
            self.record(func_name, func, root, fields[0], "add" if add is not None else "concat",
                        {"scales": [o.scale for o in ins], "dim": dim}, tuple(o.data for o in ins), None,
                        tuple(o.zero_point for o in ins), bias=None, acc_scale=np.float64(1.0), axis=axis,
                        out_scale=out.scale, out_zero_point=out.zero_point, out_dtype=out_dtype)
            return pieces[0] if add is not None else relax.op.concat(pieces, axis=dim)
        return rewrite

    def rescale_call(self, ins: list[_Operand], s_o: np.ndarray, z_o: np.ndarray, out: _Operand, axis: int,
                     where: str, out_dtype: str) -> relax.Expr:
        """The rescale kernel summing `ins` (one shape) onto the output grid (s_o, z_o)."""
        shape = _shape(ins[0].data, where)
        channels = shape[axis]
        s_o, z_o = (_per_channel(v, out, axis, channels, f"the output {what}", where)
                    for v, what in ((s_o, "scale"), (z_o, "zero point")))
        in_scales = [_per_channel(o.scale, o, axis, channels, "the input scale", where) for o in ins]
        z_in = [_per_channel(o.zero_point, o, axis, channels, "the input zero point", where) for o in ins]
        k, c, rs = rescale_params(in_scales, s_o)
        width = np.broadcast(k[0], c, z_o, *z_in).size
        params = [np.stack([np.broadcast_to(z, (width,)) for z in z_in]).astype(np.int32),
                  np.broadcast_to(k, (len(ins), width)).astype(np.int64),
                  *(np.broadcast_to(v, (width,)).astype(t)
                    for v, t in ((c, np.int64), (rs, np.int32), (z_o, np.int32)))]
        key = ("rescale", shape, axis, width, len(ins), out_dtype)
        gv = self.kernel(key, lambda: rescale_primfunc(*key[1:]))
        return relax.call_tir(gv, [*(o.data for o in ins), *_consts(params)], relax.TensorType(shape, out_dtype))

    def softmax(self, func_name: str, func: relax.Function):
        """Rewriter for quantize(softmax(dequantize(x_q), last axis)): the integer softmax of kernels.py.
        A softmax over another axis or of a channel-wise quantized input stays a float island."""
        def rewrite(root: relax.Call, m: dict) -> relax.Expr:
            sm, dq = m[self.softmax_pattern["softmax"]], m[self.softmax_pattern["input"]]
            where = self.where(func_name, func, sm)
            shape = _shape(root, where)
            last = len(shape) - 1
            x = _operand(dq, where)
            s_in = _uniform(x.scale)
            if int(sm.attrs.axis) % len(shape) != last or s_in is None:
                return root
            out = _operand_like(root, where)
            s_o = _per_channel(out.scale, out, out.axis, shape[out.axis], "the output scale", where)
            z_o = _per_channel(out.zero_point, out, out.axis, shape[out.axis], "the output zero point", where)
            acc_scale = np.float64(2.0 ** -PROB_BITS)
            params = _requant_params(acc_scale, s_o, z_o, None)
            out_dtype = str(root.attrs.out_dtype)
            key = ("softmax", shape, out.axis, params[0].size, bool(np.any(params[1])), out_dtype)
            gv = self.kernel(key, lambda: softmax_primfunc(shape, *key[2:]))
            table = softmax_table(float(s_in))
            self.record(func_name, func, root, dq, "softmax", {"table": table}, (x.data,), None,
                        (_uniform(x.zero_point),), bias=None, acc_scale=acc_scale, axis=out.axis, out_scale=s_o,
                        out_zero_point=z_o, out_dtype=out_dtype)
            return relax.call_tir(gv, [x.data, *_consts([table, *params])], relax.TensorType(shape, out_dtype))
        return rewrite

    def norm(self, func_name: str, func: relax.Function):
        """Rewriter for a quantized LayerNorm over the last axis or GroupNorm with one group (NCHW) of a
        dequantized int8 tensor: the integer norm of kernels.py. Other norms stay float islands."""
        def rewrite(root: relax.Call, m: dict) -> relax.Expr:
            named = self.norm_pattern
            call = m[named["layer_norm"]] if named["layer_norm"] in m else m[named["group_norm"]]
            where = self.where(func_name, func, call)
            shape = _shape(root, where)
            ndim = len(shape)
            if call.op.name == "relax.nn.layer_norm":
                axes = tuple(int(a) % ndim for a in call.attrs.axes)
                axis, reduce_axes = ndim - 1, (ndim - 1,)
                plain = axes == reduce_axes and bool(call.attrs.center) and bool(call.attrs.scale)
            else:
                axis, reduce_axes = 1, (1, 2, 3)
                plain = (ndim == 4 and int(call.attrs.num_groups) == 1 and int(call.attrs.channel_axis) % ndim == 1
                         and tuple(int(a) % ndim for a in call.attrs.axes) == (2, 3)
                         and bool(call.attrs.center) and bool(call.attrs.scale))
            x = _operand(m[named["input"]], where)
            out = _operand_like(root, where)
            if not plain or not _channel_axes(x, out) <= {axis}:
                return root
            channels = shape[axis]
            z_in, z_o = (np.broadcast_to(o.zero_point, (channels,)) for o in (x, out))
            gamma, beta = (c.value.numpy().astype(np.float64).reshape(-1) for c in call.args[1:3])
            count = int(np.prod([shape[i] for i in reduce_axes]))
            params = norm_params(x.scale, gamma, beta, out.scale, float(call.attrs.epsilon), channels, count)
            out_dtype = str(root.attrs.out_dtype)
            key = ("norm", shape, axis, reduce_axes, params.shift, out_dtype)
            gv = self.kernel(key, lambda: norm_primfunc(*key[1:]))
            arrays = [z_in.astype(np.int32), params.multiplier, params.gain, params.offset, z_o.astype(np.int32),
                      np.array([params.eps], np.int64)]
            self.record(func_name, func, root, m[named["input"]], "norm",
                        {"params": params, "reduce_axes": reduce_axes}, (x.data,), None, (x.zero_point,),
                        bias=None, acc_scale=np.float64(1.0), axis=axis, out_scale=out.scale,
                        out_zero_point=out.zero_point, out_dtype=out_dtype)
            return relax.call_tir(gv, [x.data, *_consts(arrays)], relax.TensorType(shape, out_dtype))
        return rewrite

    def lookup(self, func_name: str, func: relax.Function):
        """Rewriter for quantize(f(dequantize(x_q))) of an elementwise f: a 256-entry table per channel."""
        def rewrite(root: relax.Call, m: dict) -> relax.Expr:
            call, dq = m[self.lookup_pattern["func"]], m[self.lookup_pattern["input"]]
            where = self.where(func_name, func, call)
            shape = _shape(root, where)
            x, out = _operand(dq, where), _operand_like(root, where)
            axes = _channel_axes(x, out)
            if len(axes) > 1:
                return root
            axis = axes.pop() if axes else out.axis
            args = [_per_channel(v, o, axis, shape[axis], what, where) for v, o, what in (
                (x.scale, x, "the input scale"), (x.zero_point, x, "the input zero point"),
                (out.scale, out, "the output scale"), (out.zero_point, out, "the output zero point"))]
            out_dtype = str(root.attrs.out_dtype)
            channels = max(np.size(a) for a in args)
            table = lookup_table(functools.partial(ELEMENTWISE[call.op.name], call=call), *args, channels, out_dtype)
            key = ("lookup", shape, axis, channels, out_dtype)
            gv = self.kernel(key, lambda: lookup_primfunc(*key[1:]))
            self.record(func_name, func, root, dq, "lookup", {"table": table}, (x.data,), None, (x.zero_point,),
                        bias=None, acc_scale=np.float64(1.0), axis=axis, out_scale=out.scale,
                        out_zero_point=out.zero_point, out_dtype=out_dtype)
            return relax.call_tir(gv, [x.data, relax.const(table, out_dtype)], relax.TensorType(shape, out_dtype))
        return rewrite

    def dequantized(self, func_name: str, func: relax.Function):
        """Rewriter for a core whose output stays float: int32 accumulation, then one float multiply."""
        def rewrite(op: relax.Call, m: dict) -> relax.Expr:
            where = self.where(func_name, func, op)
            core = self.core_of(m, where)
            dtype = _dtype(op)
            ndim = len(_shape(op, where))
            acc = relax.op.astype(self.accumulate(core, where), dtype)
            scale = along(core.scale.astype(dtype), core.axis % ndim, ndim)
            self.core_record(func_name, func, op, m, core, bias=None, acc_scale=core.scale, axis=core.axis % ndim,
                             out_scale=None, out_zero_point=None, out_dtype=dtype)
            return relax.op.multiply(acc, relax.const(scale, dtype))
        return rewrite

    def run(self, mod: tvm.IRModule) -> tvm.IRModule:
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                name = gv.name_hint
                func = _rewrite(self.quant, self.quantized(name, func), func)
                func = _rewrite(self.core, self.dequantized(name, func), func)
                func = _rewrite(self.softmax_root, self.softmax(name, func), func)
                func = _rewrite(self.rescale_root, self.rescaled(name, func), func)
                func = _rewrite(self.norm_root, self.norm(name, func), func)
                func = _rewrite(self.lookup_root, self.lookup(name, func), func)
                self.builder.update_func(gv, relax.analysis.remove_all_unused(func))
        return self.builder.get()


def _bound_var(func: relax.Function, value: relax.Expr) -> relax.Var | None:
    """The var `func` binds `value` to, if any."""
    return next((b.var for block in func.body.blocks for b in block.bindings if b.value.same_as(value)), None)


def _rewrite(pattern, rewriter, func: relax.Function) -> relax.Function:
    """rewrite_call that re-raises the rewriter's HyqError (the FFI would turn it into a RuntimeError)."""
    errors: list[HyqError] = []

    def guarded(expr, matchings):
        try:
            return rewriter(expr, matchings)
        except HyqError as err:
            errors.append(err)
            return expr

    out = rewrite_call(pattern, guarded, func)
    if errors:
        raise errors[0]
    return out


def _channel_axes(*operands: _Operand) -> set[int]:
    """The axes along which the operands' scales or zero points vary (empty: all per tensor)."""
    return {o.axis for o in operands if _uniform(o.scale) is None or _uniform(o.zero_point) is None}


def _is_dequantize(expr: relax.Expr) -> bool:
    return isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.dequantize") and all(
        isinstance(a, tvm.ir.expr.Constant) for a in expr.args[1:])


def _tuple_fields(func: relax.Function, expr: relax.Expr) -> list[relax.Expr] | None:
    """The fields of a tuple, looked up through the vars `func` binds (None if not a tuple of known values)."""
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    expr = values.get(expr, expr)
    if not isinstance(expr, relax.Tuple):
        return None
    return [values.get(f, f) for f in expr.fields]


def _clamp(m: dict, named: dict, s_o: np.ndarray, z_o: np.ndarray, out_dtype: str):
    """int64 (low, high) bounds, () or per channel, of the ReLU / clip of a match on the output grid, or None."""
    info = np.iinfo(out_dtype)
    if named["relu"] in m:
        low, high = np.asarray(z_o, np.float64), np.float64(info.max)
    elif named["clip"] in m:
        low, high = (np.round(np.clip(v / s_o, -2.0 ** 40, 2.0 ** 40)) + z_o for v in _clip_bounds(m[named["clip"]]))
    else:
        return None
    return tuple(np.clip(v, info.min, info.max).astype(np.int64) for v in (low, high))


def _operand_like(quant: relax.Call, where: str) -> _Operand:
    """The scale / zero point of a quantize call, in the form of a dequantized operand."""
    return _Operand(quant, *_qparams(quant, len(_shape(quant, where))))


def _bias_vector(bias: np.ndarray, out_shape, axis: int, where: str) -> np.ndarray:
    """A constant added to the output as () or a vector along the channel axis."""
    shape = (1,) * (len(out_shape) - bias.ndim) + bias.shape
    if len(shape) != len(out_shape) or any(d != 1 for i, d in enumerate(shape) if i != axis):
        raise HyqError(f"{where}: the added constant of shape {bias.shape} is not a per-channel bias")
    return bias.astype(np.float64).reshape(-1) if bias.size > 1 else bias.astype(np.float64).reshape(())


def _float_heavy_op(e) -> bool:
    """Whether `e` is a conv2d / matmul with a floating-point input."""
    return (isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name in INTEGER_OPS
            and any("float" in _dtype(arg) for arg in e.args[:2]))


def check_integer(mod: tvm.IRModule) -> None:
    """Raise a HyqError naming the first conv2d / matmul that still computes in floating point."""
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                found: list[relax.Call] = []
                relax.analysis.post_order_visit(
                    binding.value, lambda e: found.append(e) if _float_heavy_op(e) else None)
                if found:
                    dtypes = "/".join(sorted({_dtype(arg) for arg in found[0].args[:2]}))
                    raise HyqError(f"{found[0].op.name} '{binding.var.name}' in @{gv.name_hint} still computes in"
                                   f" {dtypes}: its inputs are not dequantized int8 tensors with constant scales")


def integerize_layers(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[IntegerLayer]]:
    """integerize(mod) and the IntegerLayer of every rewritten op of `main`, in binding order.

    Trivial bindings and equal computations (two consumers quantizing one tensor alike) are merged first,
    as the rewrite would merge them afterwards (losing result vars).
    """
    mod = relax.transform.EliminateCommonSubexpr()(relax.transform.CanonicalizeBindings()(mod))
    integerizer = _Integerizer(mod)
    out = integerizer.run(mod)
    check_integer(out)
    if not integerizer.layers:
        return out, []
    bound = [b.var for block in out["main"].body.blocks for b in block.bindings]
    order = {var: i for i, var in enumerate(bound)}
    missing = [layer.name for layer in integerizer.layers.values() if layer.result not in order]
    if missing:
        raise HyqError(f"integer layer(s) lost their result var in @main: {', '.join(missing)}")
    return out, sorted(integerizer.layers.values(), key=lambda layer: order[layer.result])


def integerize(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite every QDQ conv2d / matmul of every Relax function into integer arithmetic (see the module doc)."""
    return integerize_layers(mod)[0]
