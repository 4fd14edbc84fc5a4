"""Emulated boards: a name, the QEMU CPU model that stands in for it and the TVM target that fits it.

A small table for now (to move into targets/*.toml later). Everything runs under qemu-user, so
wall-clock times measured on these boards say nothing about real hardware; instruction counts do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import HyqError


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

    def target(self) -> dict:
        """The TVM target dict for code that runs on this board."""
        return {"kind": "llvm", "mtriple": self.triple, "mcpu": self.mcpu, "mattr": list(self.mattr),
                "num-cores": self.num_cores}


BOARDS: dict[str, Board] = {b.name: b for b in (
    Board("rasp4b", "cortex-a72", "cortex-a72", 4, "Raspberry Pi 4 Model B (BCM2711, 4x Cortex-A72)"),
    Board("rasp3b", "cortex-a53", "cortex-a53", 4, "Raspberry Pi 3 Model B (BCM2837, 4x Cortex-A53)"),
    Board("jetson-nano", "cortex-a57", "cortex-a57", 4, "NVIDIA Jetson Nano CPU (4x Cortex-A57)"),
    Board("rk3399", "cortex-a72", "cortex-a72", 2, "Rockchip RK3399 big cores (2x Cortex-A72; the 4x A53 are not modelled)"),
)}


def known_boards() -> str:
    return ", ".join(f"{b.name} (-cpu {b.qemu_cpu})" for b in BOARDS.values())


def get_board(name: str) -> Board:
    try:
        return BOARDS[name]
    except KeyError:
        raise HyqError(f"unknown board {name!r}; known boards: {known_boards()}") from None
