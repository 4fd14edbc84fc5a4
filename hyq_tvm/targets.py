"""Compilation targets, one TOML file each in targets/: read into TVM targets.

A target file holds:
  description = "..."
  [llvm]       the TVM target dict (kind = "llvm", mtriple, mcpu, mattr, num-cores)
  [cross]      compiler = "aarch64-linux-gnu-g++" (links model.so for the board), arch = "aarch64"
               (the ELF machine of that library); absent for the host, which links natively
  [rpc]        key = tracker key of the board, threads = TVM runtime threads on it (TVM_NUM_THREADS of the
               emulated board's RPC server; default: num-cores)
  [emulation]  qemu_arch, qemu_cpu: the qemu-user stand-in (hyq_tvm.devices) when no board is reachable
Files with an [mcu] table instead are microcontroller boards, read by hyq_tvm.mcu.boards.

tvm is imported lazily so that reading targets (e.g. the board table of hyq_tvm.devices) stays cheap.
"""
from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import HyqError
from .resources import data_dir

TARGET_DIR = data_dir("targets")

# ELF e_machine values of the architectures we may meet, and platform.machine() spellings.
_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv7l": "arm", "armv8l": "arm"}


def normalize_arch(name: str) -> str:
    """aarch64 / x86_64 / arm / ... for an architecture name (platform.machine() or triple spelling)."""
    name = name.lower()
    return _ARCH_ALIASES.get(name, name)


def host_arch() -> str:
    return normalize_arch(platform.machine())


def elf_arch(path: str | os.PathLike) -> str:
    """The architecture of an ELF file (shared library), from its header; HyqError if it is not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise HyqError(f"{path} is not an ELF file")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine}")


@dataclass(frozen=True)
class TargetSpec:
    """A target as described by targets/NAME.toml."""

    name: str
    description: str
    llvm: dict[str, Any]
    cross_compiler: str | None = None   # None: link with the host's compiler
    arch: str = ""                      # ELF architecture of the library built for this target
    rpc_key: str | None = None
    threads: int | None = None
    qemu_arch: str | None = None
    qemu_cpu: str | None = None         # None: no emulation recipe

    @property
    def is_host(self) -> bool:
        return self.cross_compiler is None

    @property
    def emulated_by(self) -> str | None:
        """'qemu-aarch64 -cpu cortex-a72' style recipe, or None."""
        return f"qemu-{self.qemu_arch} -cpu {self.qemu_cpu}" if self.qemu_cpu else None

    def triple(self) -> str:
        """The LLVM target triple the code is generated for."""
        if "mtriple" in self.llvm:
            return str(self.llvm["mtriple"])
        import tvm

        return tvm.target.codegen.llvm_get_system_triple()

    def tvm_target(self):
        """The TVM target; mcpu "native" and num-cores 0 resolve to this machine."""
        import tvm

        config = dict(self.llvm)
        if config.get("num-cores") == 0:
            config["num-cores"] = os.cpu_count() or 1
        if config.get("mcpu") == "native":
            config["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
            config["mattr"] = list(config.get("mattr", [])) + _missing_avx512(config)
        return tvm.target.Target(config)

    def fcompile(self) -> Callable | None:
        """The export_library fcompile for this target: the cross compiler, or None (host default)."""
        if self.cross_compiler is None:
            return None
        import shutil

        from tvm.support import cc

        if shutil.which(self.cross_compiler) is None:
            raise HyqError(f"cross compiler {self.cross_compiler} for target {self.name} not found: install "
                           f"it (Debian: apt-get install g++-aarch64-linux-gnu, or run scripts/setup.sh)")
        return cc.cross_compiler(self.cross_compiler)

    def summary(self) -> dict[str, Any]:
        """Facts for metadata.json and reports."""
        return {"name": self.name, "triple": self.triple(), "arch": self.arch, "mcpu": self.llvm.get("mcpu"),
                "cross_compiler": self.cross_compiler, "rpc_key": self.rpc_key, "threads": self.threads,
                "emulation": self.emulated_by}


def _missing_avx512(config: dict[str, Any]) -> list[str]:
    """["-avx512f"] where LLVM assumes AVX-512 for the CPU but the kernel does not expose it (some VMs)."""
    import tvm

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    features = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(config))
    return ["-avx512f"] if "avx512f" in features and "avx512f" not in cpuinfo.read_text().split() else []


def _is_board(path: Path) -> bool:
    """Whether the target file describes a microcontroller board (an [mcu] table: hyq_tvm.mcu reads it)."""
    try:
        return "mcu" in tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError:
        return False


def known_targets() -> list[str]:
    """Names of the LLVM targets in targets/ (not the microcontroller boards)."""
    return sorted(p.stem for p in TARGET_DIR.glob("*.toml") if not _is_board(p))


def _table(config: dict, key: str, path: Path) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise HyqError(f"target file {path}: [{key}] must be a table")
    return value


def load_target(name: str) -> TargetSpec:
    """The target called `name`, or a HyqError listing the known ones."""
    path = TARGET_DIR / f"{name}.toml"
    if not path.is_file():
        raise HyqError(f"unknown target {name!r}; known targets: {', '.join(known_targets())}")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise HyqError(f"target file {path} is not valid TOML ({err})") from None
    if "mcu" in config:
        raise HyqError(f"{name!r} is a microcontroller board: compile it with a plan calibrated with --mode integer "
                       f"(python -m hyq_tvm.compile --target {name}); bench and devices take Linux targets")
    if not isinstance(config.get("llvm"), dict) or config["llvm"].get("kind") != "llvm":
        raise HyqError(f"target file {path} needs an [llvm] table with kind = \"llvm\"")
    cross, rpc, emu = (_table(config, k, path) for k in ("cross", "rpc", "emulation"))
    llvm = config["llvm"]
    if cross and "compiler" not in cross:
        raise HyqError(f"target file {path}: [cross] needs compiler = \"...\"")
    arch = cross.get("arch") or (llvm["mtriple"].split("-")[0] if "mtriple" in llvm else host_arch())
    if emu and "qemu_cpu" not in emu:
        raise HyqError(f"target file {path}: [emulation] needs qemu_cpu = \"...\"")
    threads = rpc.get("threads", llvm.get("num-cores") or None)
    return TargetSpec(name, str(config.get("description", "")), llvm, cross_compiler=cross.get("compiler"),
                      arch=normalize_arch(arch), rpc_key=rpc.get("key"), threads=threads,
                      qemu_arch=emu.get("qemu_arch", normalize_arch(arch)) if emu else None,
                      qemu_cpu=emu.get("qemu_cpu"))


def emulated_targets() -> list[TargetSpec]:
    """Every target with an [emulation] recipe (the boards of hyq_tvm.devices), by name."""
    specs = [load_target(n) for n in known_targets()]
    return [s for s in specs if s.qemu_cpu]


def target_for_key(key: str) -> TargetSpec | None:
    """The target whose RPC key (or name) is `key`, or None."""
    for name in known_targets():
        spec = load_target(name)
        if key in (spec.rpc_key, spec.name):
            return spec
    return None
