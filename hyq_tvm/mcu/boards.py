"""Microcontroller boards: the target files in targets/ with an [mcu] table (Cortex-M parts programmed in C).

An MCU target file holds:
  description = "..."
  [mcu]        cpu, fpu, float-abi: the gcc flags -mcpu, -mfpu, -mfloat-abi;
               flash, ram = { origin = ADDRESS, size = BYTES }: the real part's memories;
               vectors = ADDRESS (optional): where the core reads its vector table at reset (default: flash origin)
  [mcu.qemu]   machine: the qemu-system-arm machine that stands in for the board (it has the same core), and
               flash, ram, vectors (as above): the memories of that machine the emulated firmware is linked for
Linux boards (Raspberry Pi, ...) have no [mcu] table; hyq_tvm.targets reads them.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from ..errors import HyqError
from ..resources import data_dir

# The Cortex-M machines of qemu-system-arm 7.2 a board can name, and their cores.
QEMU_MACHINES = {"mps2-an386": "cortex-m4", "mps2-an500": "cortex-m7", "mps2-an505": "cortex-m33",
                 "mps3-an547": "cortex-m55"}
FLOAT_ABIS = ("soft", "softfp", "hard")
MVE_CORES = ("cortex-m55", "cortex-m85")  # Helium (M-profile vector extension)
VECTOR_TABLE_BYTES = 64  # the 16 system exception vectors of hyq_startup.c
_MCU_KEYS = {"cpu", "fpu", "float-abi", "flash", "ram", "vectors", "qemu"}
_MEMORY_KEYS = {"flash", "ram", "vectors"}
_QEMU_KEYS = _MEMORY_KEYS | {"machine"}
_TOP_KEYS = {"description", "mcu"}


@dataclass(frozen=True)
class Region:
    """A memory: `size` bytes from address `origin`."""

    origin: int
    size: int

    def __post_init__(self):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.origin, self.size)):
            raise HyqError(f"a memory region needs integer origin and size, got {self.origin!r}, {self.size!r}")
        if self.size <= 0 or self.origin < 0 or self.end > 1 << 32:
            raise HyqError(f"memory region {self}: the size must be positive and the region lie below 4 GB")
        if self.origin % 8 or self.size % 8:
            raise HyqError(f"memory region {self}: origin and size must be multiples of 8")

    def __str__(self) -> str:
        return f"{self.size} bytes at {self.origin:#010x}"

    @property
    def end(self) -> int:
        return self.origin + self.size

    def overlaps(self, other: Region) -> bool:
        return self.origin < other.end and other.origin < self.end


@dataclass(frozen=True)
class MemoryMap:
    """Where a firmware image lives: flash (code, constants, initial .data), RAM, and the vector table."""

    flash: Region
    ram: Region
    vectors: int

    def __post_init__(self):
        if not isinstance(self.vectors, int) or isinstance(self.vectors, bool):
            raise HyqError(f"the vector table address must be an integer, got {self.vectors!r}")
        if self.flash.overlaps(self.ram):
            raise HyqError(f"flash {self.flash} and RAM {self.ram} overlap")
        if self.vectors % 128:
            raise HyqError(f"the vector table address {self.vectors:#x} must be 128-byte aligned")
        table = Region(self.vectors, VECTOR_TABLE_BYTES)
        if self.separate_vectors and (table.overlaps(self.flash) or table.overlaps(self.ram)):
            raise HyqError(f"the vector table at {self.vectors:#x} must be the start of flash or lie outside "
                           f"flash and RAM")

    @property
    def separate_vectors(self) -> bool:
        """True when the vector table lives in a memory of its own instead of the start of flash."""
        return self.vectors != self.flash.origin


@dataclass(frozen=True)
class Board:
    """A Cortex-M board: its core and gcc flags, its memories, and the QEMU machine that emulates it."""

    name: str
    description: str
    cpu: str             # gcc -mcpu
    fpu: str             # gcc -mfpu
    float_abi: str       # gcc -mfloat-abi
    memory: MemoryMap    # the real part
    qemu_machine: str    # qemu-system-arm -M
    qemu_memory: MemoryMap

    def __post_init__(self):
        if not self.cpu.startswith("cortex-m"):
            raise HyqError(f"board {self.name}: cpu {self.cpu!r} is not a Cortex-M core")
        if not self.fpu:
            raise HyqError(f"board {self.name}: fpu must name a gcc -mfpu value (\"auto\" for the core's own)")
        if self.float_abi not in FLOAT_ABIS:
            raise HyqError(f"board {self.name}: float-abi {self.float_abi!r} is not one of {', '.join(FLOAT_ABIS)}")
        if self.qemu_machine not in QEMU_MACHINES:
            raise HyqError(f"board {self.name}: unknown QEMU machine {self.qemu_machine!r}; known: "
                           f"{', '.join(QEMU_MACHINES)}")
        if QEMU_MACHINES[self.qemu_machine] != self.cpu:
            raise HyqError(f"board {self.name} ({self.cpu}) cannot be emulated by {self.qemu_machine} "
                           f"({QEMU_MACHINES[self.qemu_machine]}): name a machine with the same core")
        for key in ("flash", "ram"):
            real, emulated = getattr(self.memory, key), getattr(self.qemu_memory, key)
            if emulated.size < real.size:
                raise HyqError(f"board {self.name}: the emulated {key} ({emulated}) is smaller than the board's "
                               f"({real}); link the emulation for a larger memory of {self.qemu_machine}")

    @property
    def model_flags(self) -> list[str]:
        """gcc flags for the integer model's C: no FPU register at all (-mgeneral-regs-only), except on a core with
        MVE, whose integer vectors live in the FPU's registers."""
        return [] if self.cpu in MVE_CORES else ["-mgeneral-regs-only"]

    @property
    def gcc_flags(self) -> list[str]:
        """The arm-none-eabi-gcc flags that select this board's core, FPU and calling convention."""
        return [f"-mcpu={self.cpu}", "-mthumb", f"-mfpu={self.fpu}", f"-mfloat-abi={self.float_abi}"]


def _read(name: str) -> dict[str, Any] | None:
    """The TOML of targets/NAME.toml, or None when there is no such file."""
    path = data_dir("targets") / f"{name}.toml"
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise HyqError(f"target file {path} is not valid TOML ({err})") from None


def _table(value: Any, where: str, keys: set[str]) -> dict[str, Any]:
    """`value` checked to be a table with no keys but `keys`."""
    if not isinstance(value, dict):
        raise HyqError(f"{where} must be a table")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise HyqError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(keys))}")
    return value


def _memory(table: dict[str, Any], where: str) -> MemoryMap:
    regions = {}
    for key in ("flash", "ram"):
        region = _table(table.get(key), f"{where} {key}", {"origin", "size"})
        if set(region) != {"origin", "size"}:
            raise HyqError(f"{where} needs {key} = {{ origin = ADDRESS, size = BYTES }}")
        regions[key] = Region(region["origin"], region["size"])
    return MemoryMap(regions["flash"], regions["ram"], table.get("vectors", regions["flash"].origin))


def _board(name: str, config: dict[str, Any]) -> Board:
    try:
        _table(config, "the top level", _TOP_KEYS)
        mcu = _table(config["mcu"], "[mcu]", _MCU_KEYS)
        qemu = _table(mcu.get("qemu"), "[mcu.qemu]", _QEMU_KEYS)
        missing = sorted({"cpu", "fpu", "float-abi"} - set(mcu)) + ([] if "machine" in qemu else ["qemu.machine"])
        if missing:
            raise HyqError(f"[mcu] needs {', '.join(missing)}")
        return Board(name, str(config.get("description", "")), str(mcu["cpu"]), str(mcu["fpu"]),
                     str(mcu["float-abi"]), _memory(mcu, "[mcu]"), str(qemu["machine"]), _memory(qemu, "[mcu.qemu]"))
    except HyqError as err:
        raise HyqError(f"target file {data_dir('targets') / name}.toml: {err}") from None


def mcu_boards() -> list[str]:
    """Names of the MCU boards (targets/*.toml with an [mcu] table)."""
    return sorted(p.stem for p in data_dir("targets").glob("*.toml") if is_mcu_target(p.stem))


def is_mcu_target(name: str) -> bool:
    """True when targets/NAME.toml describes a microcontroller (has an [mcu] table)."""
    config = _read(name)
    return config is not None and "mcu" in config


def load_board(name: str) -> Board:
    """The MCU board called `name`, or a HyqError listing the MCU boards."""
    config = _read(name)
    if config is None or "mcu" not in config:
        what = f"{name!r} is a Linux target, not an MCU board" if config else f"unknown MCU board {name!r}"
        raise HyqError(f"{what}; MCU boards: {', '.join(mcu_boards())}")
    return _board(name, config)
