"""Compilation targets, one TOML file each in targets/: read into TVM targets."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm

from .errors import HyqError

TARGET_DIR = Path(__file__).resolve().parent.parent / "targets"


@dataclass(frozen=True)
class TargetSpec:
    """A target as described by targets/NAME.toml."""

    name: str
    description: str
    llvm: dict[str, Any]

    def tvm_target(self) -> tvm.target.Target:
        """The TVM target; mcpu "native" and num-cores 0 resolve to this machine."""
        config = dict(self.llvm)
        if config.get("num-cores") == 0:
            config["num-cores"] = os.cpu_count() or 1
        if config.get("mcpu") == "native":
            config["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
            config["mattr"] = list(config.get("mattr", [])) + _missing_avx512(config)
        return tvm.target.Target(config)


def _missing_avx512(config: dict[str, Any]) -> list[str]:
    """["-avx512f"] where LLVM assumes AVX-512 for the CPU but the kernel does not expose it (some VMs)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    features = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(config))
    return ["-avx512f"] if "avx512f" in features and "avx512f" not in cpuinfo.read_text().split() else []


def known_targets() -> list[str]:
    """Names of the targets in targets/."""
    return sorted(p.stem for p in TARGET_DIR.glob("*.toml"))


def load_target(name: str) -> TargetSpec:
    """The target called `name`, or a HyqError listing the known ones."""
    path = TARGET_DIR / f"{name}.toml"
    if not path.is_file():
        raise HyqError(f"unknown target {name!r}; known targets: {', '.join(known_targets())}")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise HyqError(f"target file {path} is not valid TOML ({err})") from None
    if not isinstance(config.get("llvm"), dict) or config["llvm"].get("kind") != "llvm":
        raise HyqError(f"target file {path} needs an [llvm] table with kind = \"llvm\"")
    return TargetSpec(name, str(config.get("description", "")), config["llvm"])
