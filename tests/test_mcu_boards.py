"""MCU boards (targets/*.toml with an [mcu] table): they load and validate, unknown names are refused with the list
of boards, and they sit beside the Linux targets without disturbing hyq_tvm.targets."""
from __future__ import annotations

import pytest

from hyq_tvm.errors import HyqError
from hyq_tvm.mcu import boards
from hyq_tvm.mcu.boards import Board, MemoryMap, Region, is_mcu_target, load_board, mcu_boards
from hyq_tvm.targets import emulated_targets, known_targets, load_target

# name: (cpu, QEMU machine, flash bytes, RAM bytes)
BOARDS = {"corstone-300": ("cortex-m55", "mps3-an547", 8 << 20, 4 << 20),
          "mps2-an386": ("cortex-m4", "mps2-an386", 4 << 20, 4 << 20),
          "mps2-an500": ("cortex-m7", "mps2-an500", 4 << 20, 4 << 20),
          "mps2-an505": ("cortex-m33", "mps2-an505", 4 << 20, 4 << 20),
          "mps3-an547": ("cortex-m55", "mps3-an547", 8 << 20, 4 << 20),
          "nrf5340": ("cortex-m33", "mps2-an505", 1 << 20, 512 << 10),
          "stm32f746-disco": ("cortex-m7", "mps2-an500", 1 << 20, 320 << 10),
          "stm32h743": ("cortex-m7", "mps2-an500", 2 << 20, 512 << 10)}
TOML = """\
description = "a test board"
[mcu]
cpu = "cortex-m7"
fpu = "fpv5-d16"
float-abi = "hard"
flash = { origin = 0x08000000, size = 0x100000 }
ram = { origin = 0x20000000, size = 0x50000 }
[mcu.qemu]
machine = "mps2-an500"
flash = { origin = 0, size = 0x400000 }
ram = { origin = 0x20000000, size = 0x400000 }
"""


def test_the_mcu_boards_load_with_their_cores_machines_and_memories():
    assert mcu_boards() == sorted(BOARDS)
    for name, (cpu, machine, flash, ram) in BOARDS.items():
        board = load_board(name)
        assert (board.cpu, board.qemu_machine, board.memory.flash.size, board.memory.ram.size) == (cpu, machine,
                                                                                                 flash, ram)
        assert board.gcc_flags[:2] == [f"-mcpu={cpu}", "-mthumb"] and board.description
        assert board.qemu_memory.ram.size >= board.memory.ram.size
    stm32 = load_board("stm32f746-disco")
    assert stm32.gcc_flags == ["-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-sp-d16", "-mfloat-abi=hard"]
    assert (stm32.memory.flash.origin, stm32.memory.ram.origin, stm32.memory.vectors) == (0x08000000, 0x20000000,
                                                                                          0x08000000)
    assert load_board("stm32h743").memory.ram.origin == 0x24000000  # the AXI SRAM
    m55 = load_board("corstone-300")
    assert m55.memory.separate_vectors and m55.memory.vectors == 0x10000000  # boots from the ITCM


def test_unknown_boards_and_linux_targets_are_refused_with_the_list_of_mcu_boards():
    with pytest.raises(HyqError, match=r"^unknown MCU board 'stm32f0'; MCU boards: corstone-300, .*stm32h743$"):
        load_board("stm32f0")
    with pytest.raises(HyqError, match=r"^'rasp4b' is a Linux target, not an MCU board; MCU boards: corstone-300"):
        load_board("rasp4b")


def test_mcu_and_linux_targets_are_told_apart():
    assert is_mcu_target("nrf5340") and not is_mcu_target("rasp4b") and not is_mcu_target("host")
    assert not is_mcu_target("nope")
    assert not set(BOARDS) & set(known_targets())
    with pytest.raises(HyqError, match=r"^'stm32h743' is a microcontroller board: compile it with a plan calibrated"):
        load_target("stm32h743")
    assert not set(BOARDS) & {spec.name for spec in emulated_targets()}  # not qemu-user boards


def test_regions_memory_maps_and_boards_validate_themselves():
    with pytest.raises(HyqError, match="size must be positive"):
        Region(0x20000000, 0)
    with pytest.raises(HyqError, match="below 4 GB"):
        Region(0xFFFFF000, 0x2000)
    with pytest.raises(HyqError, match="multiples of 8"):
        Region(0x20000004, 0x1000)
    flash, ram = Region(0, 0x1000), Region(0x20000000, 0x1000)
    with pytest.raises(HyqError, match="overlap"):
        MemoryMap(flash, Region(0x800, 0x1000), 0)
    with pytest.raises(HyqError, match="128-byte aligned"):
        MemoryMap(flash, ram, 0x40)
    with pytest.raises(HyqError, match="outside flash and RAM"):
        MemoryMap(flash, ram, 0x80)
    memory = MemoryMap(flash, ram, 0)
    Board("b", "", "cortex-m4", "fpv4-sp-d16", "hard", memory, "mps2-an386", memory)
    with pytest.raises(HyqError, match="cannot be emulated by mps2-an386"):
        Board("b", "", "cortex-m7", "fpv5-d16", "hard", memory, "mps2-an386", memory)
    with pytest.raises(HyqError, match="float-abi"):
        Board("b", "", "cortex-m4", "fpv4-sp-d16", "hardest", memory, "mps2-an386", memory)
    with pytest.raises(HyqError, match="not a Cortex-M core"):
        Board("b", "", "cortex-a72", "neon", "hard", memory, "mps2-an386", memory)
    small = MemoryMap(flash, Region(0x20000000, 0x800), 0)
    with pytest.raises(HyqError, match="emulated ram .* is smaller than the board's"):
        Board("b", "", "cortex-m4", "fpv4-sp-d16", "hard", memory, "mps2-an386", small)


@pytest.mark.parametrize("old, new, message", [
    ("[mcu]\n", "[mcu]\ncolour = 1\n", r"\[mcu\]: unknown key\(s\) colour"),
    ('cpu = "cortex-m7"\n', "", "needs cpu"),
    ("size = 0x50000", "size = 0", "size must be positive"),
    ("size = 0x50000", "length = 0x50000", r"ram: unknown key\(s\) length"),
    ('machine = "mps2-an500"', 'machine = "mps2-an386"', "cannot be emulated by mps2-an386"),
])
def test_a_bad_board_file_is_refused_with_its_path(tmp_path, monkeypatch, old, new, message):
    monkeypatch.setattr(boards, "data_dir", lambda name: tmp_path)
    (tmp_path / "test-board.toml").write_text(TOML)
    assert load_board("test-board").memory.ram.size == 0x50000
    (tmp_path / "test-board.toml").write_text(TOML.replace(old, new, 1))
    with pytest.raises(HyqError, match=f"^target file {tmp_path}/test-board.toml: .*{message}"):
        load_board("test-board")
