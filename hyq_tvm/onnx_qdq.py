"""QDQ ONNX export of a QuantPlan (python -m hyq_tvm.compile --emit onnx).

The plan's model is exported with torch.export under `quant.marks.marking`, and torch.onnx turns
each `hyq::mark` into the plan's QuantizeLinear / DequantizeLinear (opset 21), with the numbers of
`quant.qdq`, as the Relax annotation does:

    conv2d / linear input:  DequantizeLinear(Clip(QuantizeLinear(x, s_a, z_a)), 1, z_a)
    conv2d / linear weight: DequantizeLinear(w_q, s_w, z_w), w_q an int8 initializer
    matmul operand, norm / softmax input: DequantizeLinear(Clip(QuantizeLinear(x, s, z)), s, z)

Clip keeps b-bit values (carried in int8) in range when b < 8. onnxruntime runs the result: the same
quantization as the integer graph, computed by another engine.

activations="uint8" carries in uint8 the activations that onnxruntime's fast u8 x s8 kernels (x86-64) can
take as their first operand: every per-tensor input0, its zero point and Clip bounds shifted by +128, its
scale unchanged; the same numbers. Weights and matmuls' second operands stay int8 (s8), and so do
channel-wise activations: onnxruntime 1.32 fuses a uint8 DequantizeLinear -> MatMul into a
MatMulIntegerToFloat that then refuses a per-channel zero point at run time.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as passes
import torch
from onnxscript import opset21 as op

from .errors import HyqError
from .quant.prepare import quantized_model
from .fileio import atomic_path
from .quant.marks import export_marked
from .quant.plan import QuantPlan
from .quant.qdq import activation_qdq, channel_axis, qparams, weight_values

OPSET = 21
ACTIVATIONS = {"int8": (np.int8, 0), "uint8": (np.uint8, 128)}  # carrier type, zero-point shift


def _const(values: np.ndarray):
    return op.Constant(value=ir.tensor(np.ascontiguousarray(values)))


def _carried(values, activations: str) -> np.ndarray:
    """Zero points or Clip bounds of activations in their carrier type (uint8: shifted by +128)."""
    dtype, shift = ACTIVATIONS[activations]
    return (np.asarray(values, np.int16) + shift).astype(dtype)


def _translation(model: torch.nn.Module, plan: QuantPlan, activations: str):
    """The ONNX translation of hyq::mark for this plan and model (activations: see the module docstring)."""

    def mark(x, layer: str, role: str):
        entry = plan.layers[layer]
        if role == "weight":
            t = entry.weight
            w = model.get_submodule(layer).inner.weight.detach().numpy()
            scale, zero = qparams(t)
            return op.DequantizeLinear(_const(weight_values(w, entry)), _const(scale), _const(zero),
                                       axis=channel_axis(t))
        qdq = activation_qdq(entry, role)
        carrier = activations if role == "input0" and qdq.zero.ndim == 0 else "int8"
        zero = _carried(qdq.zero, carrier)
        q = op.QuantizeLinear(x, _const(qdq.scale), _const(zero), axis=qdq.axis)
        if qdq.clip is not None:
            q = op.Clip(q, *(_const(_carried(b, carrier)) for b in qdq.clip))
        return op.DequantizeLinear(q, _const(qdq.dq_scale), _const(zero), axis=qdq.axis)

    return mark


def export_onnx(plan: QuantPlan, path: str | Path, weights: str | Path | None = None,
                activations: str = "int8") -> Path:
    """Write the plan's QDQ ONNX model to `path` (atomically), its activations carried in int8 as planned
    or, where onnxruntime can use it, in uint8 (see the module docstring); returns it."""
    if activations not in ACTIVATIONS:
        raise HyqError(f"activations must be one of {', '.join(ACTIVATIONS)}, not {activations!r}")
    model = quantized_model(plan, weights)  # checks that plan, model and weights fit
    program = export_marked(model, torch.zeros(plan.model["input_shape"]))
    translation = {torch.ops.hyq.mark.default: _translation(model, plan, activations)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=OPSET, verbose=False, optimize=False, input_names=["input"],
            output_names=["logits"], custom_translation_table=translation)
    if onnx_program is None:
        raise HyqError("torch.onnx.export returned no model")
    for cleanup in (passes.RemoveUnusedNodesPass(), passes.LiftConstantsToInitializersPass(),
                    passes.RemoveUnusedOpsetsPass(),  # the float weights the int8 ones replace, and the like
                    passes.ClearMetadataAndDocStringPass()):  # the exporter's stack traces: 2/3 of the file
        cleanup(onnx_program.model)
    with atomic_path(Path(path)) as tmp:
        onnx_program.save(str(tmp), external_data=False)
    return Path(path)


def qdq_census(path: str | Path) -> dict[str, Any]:
    """Node counts by op type of an ONNX model."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def onnx_session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session with every graph optimization but MatMulAddFusion, which in
    onnxruntime 1.32 rewrites our 3-D QDQ MatMul + Add into a Gemm whose new QuantizeLinear is invalid; and
    but QDQPropagationTransformer where it makes a QuantizeLinear of mismatched types (graphs that quantize
    every tensor, integer mode)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    disabled = ["MatMulAddFusion"]
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    except Exception as err:  # onnxruntime's own Fail, not importable by name
        if "does not match y_zero_point type" not in str(err):
            raise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=[*disabled, "QDQPropagationTransformer"])
