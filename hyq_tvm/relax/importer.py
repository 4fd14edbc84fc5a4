"""Import a QuantPlan's model into Relax, with every quantized input marked by its plan layer name.

The prepared model (BatchNorm folded) is exported with torch.export inside `quant.marks.marking`,
and the Relax frontend turns each `hyq::mark(x, layer, role)` into
`call_pure_packed("hyq.mark", x, layer, role)`, so the plan's names travel inside the IR to
`annotate`. Weights stay constants. Each mark is bound to a var named `layer@role` (`marked_var`);
annotate and integerize keep that var, so the integer layers can be reported by their plan names
(`marked_layer`).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import tvm
import tvm.relax.frontend.torch  # noqa: F401  (registers the frontend)
from torch import nn
from tvm import relax

from ..quant.prepare import quantized_model
from ..errors import HyqError
from ..quant.marks import ROLES, export_marked, roles
from ..quant.plan import QuantPlan

MARK = "hyq.mark"


def marked_var(layer: str, role: str) -> str:
    """Name of the var bound to the mark of `layer`'s input `role` ('/' for '.', which Relax names lose)."""
    return f"{layer.replace('.', '/')}@{role}"


def marked_layer(var_name: str) -> str | None:
    """The plan layer of a var named by `marked_var`, else None."""
    layer, sep, role = var_name.rpartition("@")
    return layer.replace("/", ".") if sep and role in ROLES else None


def _convert_mark(node: torch.fx.Node, importer) -> relax.Var:
    x = importer.env[node.args[0]]
    layer, role = (str(a) for a in node.args[1:3])
    call = relax.call_pure_packed(MARK, x, tvm.ir.StringImm(layer), tvm.ir.StringImm(role), ty_args=x.ty)
    return importer.block_builder.emit(call, name_hint=marked_var(layer, role))


def _convert_batch_norm(node: torch.fx.Node, importer) -> relax.Var:
    """aten.batch_norm(x, weight, bias, mean, var, training, momentum, eps, cudnn) in eval mode. (TVM 0.27's
    own converter reads it with the arguments shifted: eps = momentum, and batch statistics.)"""
    x, weight, bias, mean, var = (importer.env[a] for a in node.args[:5])
    training, eps = node.args[5], float(node.args[7])
    if training:
        raise HyqError(f"batch_norm {node.name} runs in training mode; export the model in eval mode")
    out = relax.op.nn.batch_norm(x, weight, bias, mean, var, axis=1, epsilon=eps, training=False)
    return importer.block_builder.emit(relax.TupleGetItem(importer.block_builder.emit(out), 0))


def to_relax(model: nn.Module, example: torch.Tensor) -> tvm.IRModule:
    """The marked float model as a Relax module `main(x) -> logits`, weights as constants, constants folded."""
    mod = relax.frontend.torch.from_exported_program(
        export_marked(model, example), keep_params_as_input=False, unwrap_unit_return_tuple=True,
        custom_convert_map={"mark.default": _convert_mark, "batch_norm.default": _convert_batch_norm}, run_ep_decomposition=False)
    return relax.transform.FoldConstant()(mod)


def mark_calls(mod: tvm.IRModule) -> list[relax.Call]:
    """Every hyq.mark call of the module's Relax functions, in binding order."""
    found: list[relax.Call] = []

    def visit(e):
        if is_mark(e):
            found.append(e)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return found


def is_mark(e) -> bool:
    """Whether `e` is a hyq.mark call."""
    return (isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_pure_packed"
            and isinstance(e.args[0], relax.ExternFunc) and e.args[0].global_symbol == MARK)


def mark_name(call: relax.Call) -> tuple[str, str]:
    """(layer, role) of a hyq.mark call."""
    return str(call.args[2].value), str(call.args[3].value)


def input_layers(mod: tvm.IRModule) -> list[str]:
    """Plan layers whose marked input is a parameter of `main` (the model input), in binding order."""
    params = set(mod["main"].params)
    return [mark_name(c)[0] for c in mark_calls(mod) if c.args[1] in params]


def check_marks(mod: tvm.IRModule, plan: QuantPlan) -> None:
    """A HyqError unless every quantized input of every plan layer is marked exactly once, and nothing else."""
    counts = Counter(mark_name(c) for c in mark_calls(mod))
    expected = {(layer, role) for layer, entry in plan.layers.items() for role in roles(entry.op)}
    missing = sorted({layer for layer, role in expected if counts[(layer, role)] == 0})
    if missing:
        raise HyqError(f"the Relax graph has no call site for {len(missing)} plan layer(s): {', '.join(missing)}")
    repeated = sorted({layer for key, n in counts.items() if n > 1 for layer in key[:1]})
    if repeated:
        raise HyqError(f"plan layer(s) called more than once in the graph: {', '.join(repeated)}")
    unknown = sorted({layer for layer, role in counts if (layer, role) not in expected})
    if unknown:
        raise HyqError(f"the Relax graph marks layer(s) the plan does not quantize: {', '.join(unknown)}")


def import_model(plan: QuantPlan, weights: str | Path | None = None) -> tvm.IRModule:
    """The plan's model (BN folded, weights checked against the plan) in Relax, every plan layer marked once."""
    mod = to_relax(quantized_model(plan, weights), torch.zeros(plan.model["input_shape"]))
    check_marks(mod, plan)
    return mod
