"""Artifact folders: the compiled library and / or QDQ ONNX model, its QuantPlan and metadata.json, written
atomically; and reading one back, checked against its metadata."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import tvm

from .errors import HyqError
from .fileio import sha256_file, write_json
from .quant.plan import QuantPlan
from .targets import elf_arch, host_arch

FORMAT = "hyq-tvm/artifact"
VERSION = 1
LIBRARY = "model.so"
HOST_LIBRARY = "host.so"  # host twin of a cross-compiled model.so
ONNX = "model.onnx"  # QDQ ONNX model of the same plan (--emit onnx)
PLAN = "plan.json"
METADATA = "metadata.json"


def compiler_fingerprint() -> str:
    """A hash of the compiler's source (hyq_tvm/relax, hyq_tvm/mcu and the build stage): artifacts built with the same
    fingerprint and plan are the same program."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for source in sorted([*package.glob("relax/**/*.py"), *package.glob("mcu/*.py"), package / "build.py"]):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


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
