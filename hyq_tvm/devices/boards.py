"""Emulated boards: a name, the QEMU CPU model that stands in for it and the TVM target that fits it.

The table is read from targets/*.toml (hyq_tvm.targets): every target with an [emulation] section is
a board. Everything runs under qemu-user, so wall-clock times measured on these boards say nothing
about real hardware; instruction counts do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import HyqError
from ..targets import TargetSpec, emulated_targets


@dataclass(frozen=True)
class Board:
    name: str
    qemu_cpu: str          # qemu-aarch64 -cpu / QEMU_CPU
    mcpu: str              # LLVM -mcpu
    num_cores: int
    description: str
    mattr: tuple = field(default=("+neon",))
    qemu_arch: str = "aarch64"
    triple: str = "aarch64-linux-gnu"
    key: str = ""          # default tracker key (the board name when empty)
    threads: int | None = None
    arch: str = "aarch64"  # ELF architecture of libraries built for it

    def target(self) -> dict:
        """The TVM target dict for code that runs on this board."""
        return {"kind": "llvm", "mtriple": self.triple, "mcpu": self.mcpu, "mattr": list(self.mattr),
                "num-cores": self.num_cores}


def board_from_target(spec: TargetSpec) -> Board:
    llvm = spec.llvm
    return Board(spec.name, spec.qemu_cpu, llvm["mcpu"], int(llvm.get("num-cores", 1)), spec.description,
                 tuple(llvm.get("mattr", ())), spec.qemu_arch, spec.triple(), spec.rpc_key or spec.name,
                 spec.threads, spec.arch)


BOARDS: dict[str, Board] = {s.name: board_from_target(s) for s in emulated_targets()}


def known_boards() -> str:
    return ", ".join(f"{b.name} (-cpu {b.qemu_cpu})" for b in BOARDS.values())


def get_board(name: str) -> Board:
    try:
        return BOARDS[name]
    except KeyError:
        raise HyqError(f"unknown board {name!r}; known boards: {known_boards()}") from None
