"""The commands: each parses its arguments, calls one stage and prints.

`hyq-tvm NAME ARGS` (the console script) and `python -m hyq_tvm.NAME ARGS` both land in `run(NAME)`.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from ..errors import run_cli

COMMANDS = {
    "train": "train a proxy checkpoint",
    "calibrate": "calibrate a model post-training into a QuantPlan",
    "evaluate": "top-1 of the FP32 and fake-quantized model",
    "tune": "tune a model's integer kernels for a target (schedules/)",
    "compile": "compile a plan into an artifact for a target",
    "compare": "host latency of an artifact against onnxruntime and PyTorch",
    "device": "start, list and stop emulated boards",
    "bench": "benchmark an artifact on a device through the RPC tracker",
    "report": "regenerate the accuracy report",
    "integer_report": "regenerate the integer-graph report",
    "mcu_report": "regenerate the microcontroller report (emulated Cortex-M boards)",
}


def run(name: str, argv: Sequence[str] | None = None) -> None:
    """Run command `name` on `argv` (default: the process arguments)."""
    run_cli(importlib.import_module(f"{__name__}.{name}").main, argv)


def main(argv: Sequence[str] | None = None) -> None:
    """hyq-tvm NAME ARGS: the sub-command NAME."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {n.replace("_", "-"): n for n in COMMANDS}
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, names))
        print("usage: hyq-tvm COMMAND [ARGS]  (hyq-tvm COMMAND --help for its options)\n\ncommands:")
        print("\n".join(f"  {n:{width}s}  {COMMANDS[m]}" for n, m in names.items()))
        sys.exit(0 if argv else 2)
    if argv[0] not in names and argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(names)}", file=sys.stderr)
        sys.exit(2)
    run(names.get(argv[0], argv[0]), argv[1:])
