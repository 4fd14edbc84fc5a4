"""A static graph written as a self-contained C folder: kernels, weights as const arrays, one static arena and a
graph runner behind `int hyq_model_run(const int8_t *input, int8_t *output)`. No heap, no TVM runtime: the few
types and functions the kernels use come from the generated hyq_shim.h / hyq_model.c."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fileio import write_text
from .cgraph import Grid, StaticGraph, Value
from .kernels import SHIM, KernelSource
from .memory import ALIGN, ArenaPlan, Buffer, plan_arena

_DTYPE_CODES = {"i": 0, "u": 1, "f": 2}
_C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t"}


@dataclass(frozen=True)
class MemoryReport:
    """What the model takes: weights (flash), the arena and its lower bound (RAM); once compiled for a board, its
    flash (code, constants, initial data) and RAM (data, bss) bytes and the stack one inference takes."""

    weights_bytes: int
    arena_bytes: int
    arena_lower_bound_bytes: int
    flash_bytes: int | None = None
    ram_bytes: int | None = None
    stack_bytes: int | None = None


def buffers(graph: StaticGraph, workspace: dict[str, int]) -> list[Buffer]:
    """The arena's buffers: intermediates (a view keeps its base alive) and each step's kernel workspace."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, step in enumerate(graph.steps):
        for k, name in enumerate(step.args):
            base = graph.views.get(name, name)
            if k >= len(step.args) - step.outputs:
                first.setdefault(base, i)
            last[base] = i
    ends = {graph.input, graph.output}
    found = [Buffer(name, graph.values[name].nbytes, first[name], last[name]) for name in first
             if name not in ends and graph.values[name].data is None]
    found += [Buffer(f"workspace{i}", workspace[step.kernel], i, i) for i, step in enumerate(graph.steps)
              if workspace.get(step.kernel)]
    return found


def _array(values: np.ndarray) -> str:
    flat = [str(int(v)) for v in values.reshape(-1)]
    return ",\n".join(", ".join(flat[i:i + 24]) for i in range(0, len(flat), 24))


def _weights_c(graph: StaticGraph) -> str:
    out = ['#include <stdint.h>', '#include "hyq_model_internal.h"', ""]
    for value in graph.values.values():
        if value.data is not None:
            out.append(f"const {_C_TYPES[value.dtype]} hyq_{value.name}[{max(value.data.size, 1)}] "
                       f"__attribute__((aligned({ALIGN}))) = {{\n{_array(value.data)}}};")
    return "\n".join(out) + "\n"


def _dtype(value: Value) -> str:
    dt = np.dtype(value.dtype)
    return f"{{{_DTYPE_CODES[dt.kind]}, {dt.itemsize * 8}, 1}}"


def _data(graph: StaticGraph, plan: ArenaPlan, name: str) -> str:
    base = graph.views.get(name, name)
    if base in (graph.input, graph.output):
        return "0"   # set by hyq_model_run
    if graph.values[base].data is not None:
        return f"(void *)hyq_{base}"
    return f"(void *)(hyq_arena + {plan.offsets[base]})"


def _model_c(graph: StaticGraph, plan: ArenaPlan, workspace: dict[str, int]) -> str:
    used = sorted({name for step in graph.steps for name in step.args})
    ends = {graph.input, graph.output}
    lines = ['#include <stddef.h>', f'#include "{SHIM}"', '#include "hyq_model.h"', '#include "hyq_model_internal.h"',
             "",
             f"static uint8_t hyq_arena[{max(plan.arena_bytes, ALIGN)}] __attribute__((aligned({ALIGN})));",
             "static uint8_t *hyq_workspace_top, *hyq_workspace_end;", "",
             "void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code, "
             "int dtype_bits) {",
             "  uint8_t *p = hyq_workspace_top;",
             f"  uint64_t size = (nbytes + {ALIGN - 1}u) & ~(uint64_t){ALIGN - 1}u;",
             "  (void)device_type; (void)device_id; (void)dtype_code; (void)dtype_bits;",
             "  if (p == NULL || size > (uint64_t)(hyq_workspace_end - p)) return NULL;",
             "  hyq_workspace_top = p + size;",
             "  return p;", "}", "",
             "int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr) {",
             "  (void)device_type; (void)device_id; (void)ptr;", "  return 0;", "}", "",
             "void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t n) {",
             "  (void)kind; (void)parts; (void)n;", "}", ""]
    first: dict[str, str] = {}    # the fields of a const DLTensor -> the first value it was written for
    tensor: dict[str, str] = {}   # a value -> the value whose DLTensor is passed for it
    for name in used:
        value = graph.values[name]
        fields = f"{{{_data(graph, plan, name)}, {{1, 0}}, {len(value.shape)}, {_dtype(value)}, NULL, NULL, 0}}"
        patched = graph.views.get(name, name) in ends
        tensor[name] = name if patched else first.setdefault(fields, name)
        if tensor[name] == name:
            lines.append(f"static {'' if patched else 'const '}DLTensor hyq_t_{name} = {fields};")
    lines.append("")
    for i, step in enumerate(graph.steps):
        args = ", ".join(f"{{7, 0, {{.v_ptr = (void *)&hyq_t_{tensor[name]}}}}}" for name in step.args)
        lines.append(f"static const TVMFFIAny hyq_args{i}[{len(step.args)}] = {{{args}}};")
    lines += ["", "#ifdef HYQ_PROFILE  /* a call before each kernel call and after the last: where a profiler cuts */",
              "__attribute__((noipa)) void hyq_step_marker(int step) { __asm__ volatile(\"\" ::: \"memory\"); "
              "(void)step; }",
              "#define HYQ_MARK(i) hyq_step_marker(i)", "#else", "#define HYQ_MARK(i)", "#endif", "",
              "int hyq_model_run(const int8_t *input, int8_t *output) {"]
    lines += [f"  hyq_t_{name}.data = (void *)input;" for name in used if graph.views.get(name, name) == graph.input]
    lines += [f"  hyq_t_{name}.data = (void *)output;" for name in used if graph.views.get(name, name) == graph.output]
    for i, step in enumerate(graph.steps):
        size = workspace.get(step.kernel, 0)
        if size:
            start = plan.offsets[f"workspace{i}"]
            lines.append(f"  hyq_workspace_top = hyq_arena + {start}; hyq_workspace_end = hyq_arena + {start + size};")
        lines.append(f"  HYQ_MARK({i});")
        lines.append(f"  if (__tvm_ffi_{step.kernel}(NULL, (void *)hyq_args{i}, {len(step.args)}, NULL) != 0) "
                     f"return {i + 1};")
        if size:
            lines.append("  hyq_workspace_top = hyq_workspace_end = NULL;")
    lines += [f"  HYQ_MARK({len(graph.steps)});", "  return 0;", "}", ""]
    return "\n".join(lines)


def _grid_doc(what: str, grid: Grid) -> str:
    where = "per tensor" if len(grid.scale) == 1 else f"per channel along axis {grid.axis}"
    return (f" * {what}: real = scale * (q - zero_point), {where}\n"
            f" *   scale      = {', '.join(repr(s) for s in grid.scale)}\n"
            f" *   zero_point = {', '.join(str(z) for z in grid.zero_point)}\n")


def _header(graph: StaticGraph, report: MemoryReport, model: str) -> str:
    x, y = graph.values[graph.input], graph.values[graph.output]
    return (
        f"/* {model}: the integer model as C (generated by hyq-tvm).\n *\n"
        f" * int hyq_model_run(const int8_t *input, int8_t *output): one inference; 0 on success, else the\n"
        f" * number of the kernel call that failed. Not reentrant: one static arena of HYQ_ARENA_BYTES.\n"
        f" * input:  int8 {list(x.shape)} (HYQ_INPUT_BYTES)\n{_grid_doc('input', graph.input_grid)}"
        f" * output: int8 {list(y.shape)} (HYQ_OUTPUT_BYTES)\n{_grid_doc('output', graph.output_grid)}"
        f" * weights: {report.weights_bytes} bytes of const data; arena: {report.arena_bytes} bytes "
        f"(lower bound {report.arena_lower_bound_bytes})\n */\n"
        "#ifndef HYQ_MODEL_H\n#define HYQ_MODEL_H\n#include <stdint.h>\n\n"
        f"#define HYQ_INPUT_BYTES {x.nbytes}\n#define HYQ_OUTPUT_BYTES {y.nbytes}\n"
        f"#define HYQ_ARENA_BYTES {report.arena_bytes}\n#define HYQ_WEIGHTS_BYTES {report.weights_bytes}\n\n"
        "int hyq_model_run(const int8_t *input, int8_t *output);\n\n#endif\n")


def _internal_h(graph: StaticGraph) -> str:
    out = ["#ifndef HYQ_MODEL_INTERNAL_H", "#define HYQ_MODEL_INTERNAL_H", "#include <stdint.h>", ""]
    for value in graph.values.values():
        if value.data is not None:
            out.append(f"extern const {_C_TYPES[value.dtype]} hyq_{value.name}[{max(value.data.size, 1)}];")
    out += [f"int32_t __tvm_ffi_{name}(void *self, void *args, int32_t num_args, void *result);"
            for name in sorted({step.kernel for step in graph.steps})]
    return "\n".join([*out, "", "#endif", ""])


SHIM_H = """/* The types and functions of TVM's C calling convention that the generated kernels use (hyq-tvm). */
#ifndef HYQ_SHIM_H
#define HYQ_SHIM_H
#include <stdint.h>
#include <stddef.h>
#define TVM_DLL
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
  void *data; DLDevice device; int32_t ndim; DLDataType dtype; int64_t *shape; int64_t *strides; uint64_t byte_offset;
} DLTensor;
typedef struct {
  int32_t type_index; uint32_t zero_padding;
  union { int64_t v_int64; uint64_t v_uint64; void *v_ptr; };
} TVMFFIAny;
void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code, int dtype_bits);
int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr);
void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t n);

/* floor(sqrt(x)) of x >= 0, in integers (the kernels' integer norms) */
static inline int64_t hyq_isqrt(int64_t x) {
  uint64_t v = (uint64_t)x, root = 0, bit = (uint64_t)1 << 62;
  while (bit > v) bit >>= 2;
  while (bit) {
    if (v >= root + bit) { v -= root + bit; root = (root >> 1) + bit; } else { root >>= 1; }
    bit >>= 2;
  }
  return (int64_t)root;
}
#endif
"""


def write_c_folder(folder: str | Path, graph: StaticGraph, kernels: KernelSource, model: str) -> MemoryReport:
    """Write the C files of `graph` into `folder`; its memory numbers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = plan_arena(buffers(graph, kernels.workspace))
    weights = sum(v.nbytes for v in graph.values.values() if v.data is not None)
    report = MemoryReport(weights, plan.arena_bytes, plan.lower_bound_bytes)
    files = {"hyq_model.h": _header(graph, report, model), SHIM: SHIM_H, "hyq_model_internal.h": _internal_h(graph),
             "hyq_model.c": _model_c(graph, plan, kernels.workspace), "hyq_kernels.c": kernels.source,
             "hyq_weights.c": _weights_c(graph)}
    for name, text in files.items():
        write_text(folder / name, text)
    return report
