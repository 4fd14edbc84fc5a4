"""Artifact folders: the compiled library, its QuantPlan and metadata.json, written atomically."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import tvm

from .fileio import sha256_file, write_json
from .quant.plan import QuantPlan

FORMAT = "hyq-tvm/artifact"
VERSION = 1
LIBRARY = "model.so"
HOST_LIBRARY = "host.so"  # host twin of a cross-compiled model.so
PLAN = "plan.json"
METADATA = "metadata.json"


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


def write_artifact(out_dir: str | os.PathLike, executable: tvm.runtime.Executable, plan: QuantPlan,
                   metadata: dict[str, Any], fcompile=None, host_executable=None) -> Path:
    """Write library, plan and metadata (with the SHA-256 of library and plan) to `out_dir`.
    fcompile: export_library's compiler (a cross compiler for another architecture). host_executable:
    the same integer graph built for this machine (HOST_LIBRARY), the reference a device run is checked
    against bit for bit (hyq_tvm.bench)."""
    with atomic_dir(out_dir) as tmp:
        executable.export_library(str(tmp / LIBRARY), fcompile=fcompile)
        plan.save(tmp / PLAN)
        hashes = {"library": sha256_file(tmp / LIBRARY), "plan": sha256_file(tmp / PLAN),
                  "weights": plan.model["weights_sha256"]}
        files = {"library": LIBRARY, "plan": PLAN}
        if host_executable is not None:
            host_executable.export_library(str(tmp / HOST_LIBRARY))
            hashes["host_library"] = sha256_file(tmp / HOST_LIBRARY)
            files["host_library"] = HOST_LIBRARY
        write_json(tmp / METADATA, {"format": FORMAT, "version": VERSION, **metadata, "sha256": hashes,
                                    "files": files})
    return Path(out_dir)
