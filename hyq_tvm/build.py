"""The build stage: a QuantPlan compiled into an artifact folder (the library for a target, its host twin,
and / or the QDQ ONNX model, with the plan and metadata.json), written atomically; and reading one back."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import tvm
from tqdm import tqdm
from tvm import relax

from .errors import HyqError
from .fileio import sha256_file, write_json
from .onnx_qdq import OPSET, export_onnx, qdq_census
from .quant.plan import QuantPlan
from .relax.census import constant_bytes, op_census
from .relax.pipeline import Lowered, build, lower
from .targets import elf_arch, host_arch, load_target

FORMAT = "hyq-tvm/artifact"
VERSION = 1
LIBRARY = "model.so"
HOST_LIBRARY = "host.so"  # host twin of a cross-compiled model.so
ONNX = "model.onnx"  # QDQ ONNX model of the same plan (--emit onnx)
PLAN = "plan.json"
METADATA = "metadata.json"
EMITS = ("tvm", "onnx")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = path.parent / f"{tmp.name}.old"
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def write_artifact(out_dir: str | os.PathLike, plan: QuantPlan, metadata: dict[str, Any],
                   executable: tvm.runtime.Executable | None = None, fcompile=None, host_executable=None,
                   onnx_model: Path | None = None) -> Path:
    """Write the plan, the library and / or the ONNX model, and metadata (with the SHA-256 of each file)
    to `out_dir`. fcompile: export_library's compiler (a cross compiler for another architecture).
    host_executable: the same integer graph built for this machine (HOST_LIBRARY), the reference a device
    run is checked against bit for bit (the bench stage). onnx_model: a QDQ ONNX file to copy in (ONNX)."""
    with atomic_dir(out_dir) as tmp:
        files = {"plan": PLAN}
        plan.save(tmp / PLAN)
        if executable is not None:
            executable.export_library(str(tmp / LIBRARY), fcompile=fcompile)
            files["library"] = LIBRARY
        if host_executable is not None:
            host_executable.export_library(str(tmp / HOST_LIBRARY))
            files["host_library"] = HOST_LIBRARY
        if onnx_model is not None:
            shutil.copyfile(onnx_model, tmp / ONNX)
            files["onnx"] = ONNX
        hashes = {key: sha256_file(tmp / name) for key, name in files.items()}
        write_json(tmp / METADATA, {"format": FORMAT, "version": VERSION, **metadata,
                                    "sha256": {**hashes, "weights": plan.model["weights_sha256"]}, "files": files})
    return Path(out_dir)


class _Stages:
    """Times named stages and shows them on one progress bar."""

    def __init__(self, total: int, progress: bool):
        self.bar = tqdm(total=total, disable=not progress)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_description(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.bar.update()


def _tensor_facts(expr: relax.Expr) -> dict[str, Any]:
    return {"shape": [int(d) for d in expr.ty.shape], "dtype": str(expr.ty.dtype)}


def _graph_facts(lowered: Lowered, plan: QuantPlan) -> dict[str, Any]:
    """The input (and the quantizer the graph applies to it first), output, op census and constant bytes."""
    mod, layers = lowered.mod, lowered.input_layers
    facts = _tensor_facts(mod["main"].params[0])
    if len(layers) == 1:
        q = plan.layers[layers[0]].inputs[0]
        facts.update(quantized_by=layers[0], bits=q.bits, axis=q.axis, scale=list(q.scale), zero_point=list(q.zero_point))
    return {"input": facts, "output": _tensor_facts(mod["main"].body), "op_census": op_census(mod),
            "weights_bytes": constant_bytes(mod)}


def compile_plan(plan: QuantPlan, target: str, out_dir: str | Path, weights: str | Path | None = None,
                 progress: bool = False, emit: tuple[str, ...] = ("tvm",)) -> Path:
    """Write the artifact folder `out_dir` with what `emit` asks for: "tvm", the integer graph built for
    `target` (and for this machine, the host twin, when `target` is another); "onnx", the QDQ ONNX model
    of the same plan. Returns `out_dir`."""
    unknown = sorted(set(emit) - set(EMITS))
    if unknown or not emit:
        raise HyqError(f"cannot emit {', '.join(unknown) or 'nothing'}: choose from {', '.join(EMITS)}")
    spec = load_target(target)
    fcompile = spec.fcompile()  # the cross compiler, checked before the long stages
    metadata: dict[str, Any] = {"model": plan.model["name"], "emit": list(emit),
                                "calibration": {k: plan.calibration.get(k) for k in ("method", "wbits", "abits", "mode")},
                                "versions": {"tvm": tvm.__version__, "torch": torch.__version__}}
    built: dict[str, Any] = {}
    stage = _Stages(("tvm" in emit) * (2 if spec.is_host else 3) + ("onnx" in emit), progress)
    with contextlib.closing(stage.bar), tempfile.TemporaryDirectory() as scratch:
        if "tvm" in emit:
            with stage("lower"):
                lowered = lower(plan, weights)
            tvm_target = spec.tvm_target()
            with stage("build"):
                built["executable"] = build(lowered.mod, tvm_target)
            if not spec.is_host:  # the same integer graph for this machine: bench's bit-exact reference
                with stage("host twin"):
                    built["host_executable"] = build(lowered.mod, load_target("host").tvm_target())
            metadata.update(target={**spec.summary(), "tvm": str(tvm_target)}, **_graph_facts(lowered, plan))
        if "onnx" in emit:
            with stage("onnx"):
                built["onnx_model"] = export_onnx(plan, Path(scratch) / "model.onnx", weights)
            metadata["onnx"] = {"opset": OPSET, "op_census": qdq_census(built["onnx_model"])}
        metadata["seconds"] = stage.seconds
        return write_artifact(out_dir, plan, metadata, fcompile=fcompile, **built)


@dataclass
class Artifact:
    """A compiled artifact folder: its metadata, the plan's model facts and its libraries."""

    path: Path
    meta: dict
    plan_model: dict
    library: Path
    host_library: Path | None
    arch: str

    @property
    def model(self) -> str:
        return self.meta.get("model") or self.plan_model["name"]


def load_artifact(path: Path) -> Artifact:
    """An artifact folder with a library, checked against its metadata; HyqError when it is not one."""
    meta_file = path / "metadata.json"
    if not meta_file.is_file():
        raise HyqError(f"{path} is not an artifact folder (no metadata.json; make one with python -m hyq_tvm.compile)")
    meta = json.loads(meta_file.read_text())
    files = meta.get("files", {})
    library = path / files.get("library", "model.so")
    plan = path / files.get("plan", "plan.json")
    for f in (library, plan):
        if not f.is_file():
            raise HyqError(f"artifact {path} lacks {f.name}")
    if meta.get("sha256", {}).get("library") not in (None, sha256_file(library)):
        raise HyqError(f"{library} does not match the SHA-256 in {meta_file} (rebuild the artifact)")
    host_lib = path / files["host_library"] if "host_library" in files else None
    arch = elf_arch(library)
    if host_lib is None and arch == host_arch():
        host_lib = library  # a host artifact is its own twin
    if host_lib is None or not host_lib.is_file():
        raise HyqError(f"artifact {path} has no host twin of model.so to check the device against: "
                       f"rebuild it with python -m hyq_tvm.compile (it saves host.so for cross targets)")
    return Artifact(path, meta, json.loads(plan.read_text())["model"], library, host_lib, arch)
