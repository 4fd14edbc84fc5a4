"""Firmware for MCU boards: a tiny hand-written model C folder gets the board files (start-up code, linker script,
Makefile), is built with the semihosting harness for each QEMU machine and run there (outputs equal numpy's,
exact and repeatable instruction counts, per kernel call in a profile build); code sizes and floating-point
instructions are read from the ELF; failures, faults, missing tools and models too big are reported."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hyq_tvm.errors import HyqError
from hyq_tvm.mcu import firmware
from hyq_tvm.mcu.boards import load_board
from hyq_tvm.mcu.firmware import (STACK_BYTES, build_emulated, check_fits, code_size, float_instructions, run_emulated,
                                  write_board_files)

HEADER = """\
#include <stdint.h>
#define HYQ_INPUT_BYTES 64
#define HYQ_OUTPUT_BYTES 64
int hyq_model_run(const int8_t *input, int8_t *output);
"""
# output = saturate(3 * input + 1); the 64-bit division (libgcc's __aeabi_ldivmod) only decides the status.
MODEL = """\
#include "hyq_model.h"
volatile int64_t divisor = 7;
int calls;  /* .bss */
int hyq_model_run(const int8_t *input, int8_t *output) {
  int64_t sum = 0;
  for (int i = 0; i < HYQ_INPUT_BYTES; i++) {
    int v = 3 * input[i] + 1;
    output[i] = (int8_t)(v > 127 ? 127 : v < -128 ? -128 : v);
    sum += (int64_t)input[i] * 1000003;
  }
  calls++;
  return sum / divisor == INT64_MAX;
}
"""
# Chosen by input[0]: 1 returns an error, 2 reads unmapped memory.
BAD_MODEL = """\
#include "hyq_model.h"
int hyq_model_run(const int8_t *input, int8_t *output) {
  if (input[0] == 1) return 7;
  if (input[0] == 2) return *(volatile int *)0xF0000000;
  output[0] = input[0];
  return 0;
}
"""
# Three kernel calls, each a loop of LENGTHS[i] iterations, with the profiling hook of emit.py's generated code
# (noipa: with noinline alone gcc -O2 may call a copy of the marker made without its unused argument).
LENGTHS = (300, 100, 200)
PROFILED_MODEL = """\
#include "hyq_model.h"
#ifdef HYQ_PROFILE
__attribute__((noipa)) void hyq_step_marker(int step) { __asm__ volatile("" ::: "memory"); (void)step; }
#define HYQ_MARK(i) hyq_step_marker(i)
#else
#define HYQ_MARK(i)
#endif
__attribute__((noinline)) int __tvm_ffi_step(const int8_t *input, int8_t *output, int length) {
  for (int i = 0; i < length; i++) output[i & 63] += input[i & 63];
  return 0;
}
int hyq_model_run(const int8_t *input, int8_t *output) {
  for (int i = 0; i < HYQ_OUTPUT_BYTES; i++) output[i] = 0;
  HYQ_MARK(0);
  if (__tvm_ffi_step(input, output, %d) != 0) return 1;
  HYQ_MARK(1);
  if (__tvm_ffi_step(input, output, %d) != 0) return 1;
  HYQ_MARK(2);
  if (__tvm_ffi_step(input, output, %d) != 0) return 1;
  HYQ_MARK(3);
  return 0;
}
""" % LENGTHS
# hyq_scale uses float, hyq_sum and hyq_add only integers (hyq_add is vectorised with integer MVE on a Cortex-M55).
FLOAT_MODEL = """\
#include "hyq_model.h"
__attribute__((noinline)) int hyq_scale(int x) { return (int)(x * 0.25f + 0.5f); }
__attribute__((noinline)) int hyq_sum(const int8_t *input) {
  int sum = 0;
  for (int i = 0; i < HYQ_INPUT_BYTES; i++) sum += input[i];
  return sum;
}
__attribute__((noinline)) void hyq_add(int8_t *restrict output, const int8_t *restrict input) {
  for (int i = 0; i < HYQ_OUTPUT_BYTES; i++) output[i] = (int8_t)(input[i] + 1);
}
int hyq_model_run(const int8_t *input, int8_t *output) {
  hyq_add(output, input);
  return hyq_scale(hyq_sum(input)) == 12345;
}
"""
MACHINES = ["mps2-an500", "mps2-an386", "mps2-an505", "mps3-an547", "stm32f746-disco"]


@pytest.fixture(scope="module")
def tools():
    missing = [tool for tool in ("arm-none-eabi-gcc", "qemu-system-arm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: gcc-arm-none-eabi libnewlib-arm-none-eabi "
                    f"qemu-system-arm, or run scripts/setup.sh as root)")


def model_folder(folder: Path, model: str = MODEL) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hyq_model.h").write_text(HEADER)
    (folder / "model.c").write_text(model)
    return folder


def expected(inputs: np.ndarray) -> np.ndarray:
    return np.clip(3 * inputs.astype(np.int64) + 1, -128, 127).astype(np.int8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("name", MACHINES)
def test_the_tiny_model_runs_on_each_machine_with_exact_repeatable_instruction_counts(tools, tiny, tmp_path, name):
    board = load_board(name)
    write_board_files(tiny, board)  # its hyq_startup.c in the folder is left out of the emulated build
    elf = build_emulated(tiny, board, tmp_path / "model.elf")
    symbols = subprocess.run(["arm-none-eabi-nm", elf], capture_output=True, text=True).stdout
    assert "__aeabi_ldivmod" in symbols and "hyq_model_run" in symbols
    inputs = np.random.default_rng(0).integers(-128, 128, (4, 64), dtype=np.int8)
    first, second = run_emulated(elf, board, inputs), run_emulated(elf, board, inputs)
    np.testing.assert_array_equal(first.outputs, expected(inputs))
    assert first.outputs.shape == (4, 64) and first.outputs.dtype == np.int8
    assert 500 < first.instructions_per_inference < 5000, first.instructions_per_inference
    assert first.instructions_per_inference == second.instructions_per_inference
    assert first.seconds > 0
    plain = run_emulated(elf, board, inputs[:1], count_instructions=False)
    assert plain.instructions_per_inference is None
    np.testing.assert_array_equal(plain.outputs, expected(inputs[:1]))


def test_a_profile_build_counts_each_kernel_call_exactly(tools, tmp_path, monkeypatch):
    board = load_board("mps2-an505")
    folder = model_folder(tmp_path / "model", PROFILED_MODEL)
    elf = build_emulated(folder, board, tmp_path / "profile.elf", profile=True)
    inputs = np.random.default_rng(1).integers(-128, 128, (2, 64), dtype=np.int8)
    first = run_emulated(elf, board, inputs, profile=True)
    steps = first.step_instructions
    assert len(steps) == len(LENGTHS) and sorted(steps) == [steps[1], steps[2], steps[0]], steps
    per_iteration = round((steps[0] - steps[1]) / (LENGTHS[0] - LENGTHS[1]))
    assert all(0 < step - per_iteration * length < 30 for step, length in zip(steps, LENGTHS)), steps  # + calls
    assert abs(first.instructions_per_inference - sum(steps)) < 100, (first.instructions_per_inference, steps)
    assert run_emulated(elf, board, inputs[1:], count_instructions=False, profile=True).step_instructions == steps
    address = firmware._marker_address(elf)
    monkeypatch.setattr(firmware, "_marker_address", lambda elf: address | 1)  # the Thumb bit, as in the symbol table
    assert run_emulated(elf, board, inputs[:1], count_instructions=False, profile=True).step_instructions == steps
    monkeypatch.undo()
    plain = build_emulated(folder, board, tmp_path / "plain.elf")
    assert run_emulated(plain, board, inputs).step_instructions is None
    with pytest.raises(HyqError, match="plain.elf has no hyq_step_marker: not a profile build"):
        run_emulated(plain, board, inputs, profile=True)
    uneven = model_folder(tmp_path / "uneven", PROFILED_MODEL.replace("HYQ_MARK(3);", "if (input[0]) HYQ_MARK(3);"))
    elf = build_emulated(uneven, board, tmp_path / "uneven.elf", profile=True)
    inputs[0, 0] = 0
    with pytest.raises(HyqError, match="hyq_step_marker ran 7 times in 2 inferences, not the same number"):
        run_emulated(elf, board, inputs, count_instructions=False, profile=True)


def test_code_size_and_the_floating_point_instructions_of_the_model(tools, tmp_path):
    folder = model_folder(tmp_path / "model", FLOAT_MODEL)
    board = load_board("mps2-an500")
    with pytest.raises(HyqError, match="not permitted with '-mgeneral-regs-only'"):   # model C: integer only
        build_emulated(folder, board, tmp_path / "m7.elf")
    elf = tmp_path / "m7.o"   # hard float, double-precision FPU
    subprocess.run(["arm-none-eabi-gcc", *board.gcc_flags, "-O2", "-c", folder / "model.c", "-o", elf], check=True)
    scale = float_instructions(elf, ["hyq_scale"])
    assert scale and all(line.startswith("hyq_scale: v") for line in scale), scale
    assert any(".f32" in line for line in scale), scale
    assert float_instructions(elf, ["hyq_sum", "hyq_add"]) == []
    assert float_instructions(elf) == scale  # the model's functions: hyq_* and __tvm_ffi_*
    with pytest.raises(HyqError, match="m7.o has no function hyq_nothing"):
        float_instructions(elf, ["hyq_nothing"])
    elf = build_emulated(folder, load_board("mps3-an547"), tmp_path / "m55.elf")  # MVE: its float C builds
    sizes = code_size(elf)
    assert set(sizes) == {"text", "data", "bss"} and sizes["text"] > 1000 and min(sizes.values()) >= 0, sizes
    add = subprocess.run(["arm-none-eabi-objdump", "-d", "--disassemble=hyq_add", elf], capture_output=True,
                         text=True).stdout
    assert re.search(r"\tvadd\.i8\tq\d", add) and re.search(r"\tvldr\td\d", add), add  # MVE and its constant
    assert {line.split(":")[0] for line in float_instructions(elf)} == {"hyq_scale"}


def test_board_files_build_with_make_and_link_for_the_real_board(tools, tmp_path):
    folder = model_folder(tmp_path / "model")
    board = load_board("stm32f746-disco")
    written = write_board_files(folder, board)
    assert [p.name for p in written] == ["hyq_startup.c", "stm32f746-disco.ld", "Makefile"]
    assert "-mcpu=cortex-m7 -mthumb -mfpu=fpv5-sp-d16 -mfloat-abi=hard" in (folder / "Makefile").read_text()
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    subprocess.run(["make", "-s"], cwd=folder, check=True, capture_output=True)
    assert (folder / "libhyq_model.a").is_file() and (folder / "hyq_startup.o").is_file()
    (tmp_path / "main.c").write_text('#include "hyq_model.h"\nstatic int8_t in[64], out[64];\n'
                                     "int main(void) { return hyq_model_run(in, out); }\n")
    elf = tmp_path / "firmware.elf"
    subprocess.run(["arm-none-eabi-gcc", *board.gcc_flags, "-O2", "-I", folder, "-T", folder / "stm32f746-disco.ld",
                    "-Wl,--gc-sections", "--specs=nano.specs", "--specs=nosys.specs", folder / "hyq_startup.o",
                    tmp_path / "main.c", folder / "libhyq_model.a", "-o", elf], check=True, capture_output=True)
    headers = subprocess.run(["arm-none-eabi-objdump", "-h", elf], capture_output=True, text=True).stdout
    sections = {f[1]: (int(f[3], 16), int(f[4], 16)) for f in map(str.split, headers.splitlines())
                if len(f) > 4 and f[0].isdigit()}  # name: (VMA, LMA)
    assert sections[".vectors"] == (0x08000000, 0x08000000)
    vma, lma = sections[".data"]
    assert 0x20000000 <= vma < 0x20050000 and 0x08000000 <= lma < 0x08100000  # copied from flash at reset
    assert 0x20000000 <= sections[".bss"][0] < 0x20050000


def test_the_startup_code_copies_data_and_exits_with_mains_status_on_qemu(tools, tmp_path):
    """The board files alone (no harness): a firmware linked with them runs on mps2-an500 and exits with
    main's status, which reads an initialised global (.data, copied from flash) and a zeroed one (.bss)."""
    folder = model_folder(tmp_path / "model")
    board = load_board("mps2-an500")
    write_board_files(folder, board)
    (tmp_path / "main.c").write_text('#include "hyq_model.h"\nstatic int8_t in[64], out[64];\nint seven = 7;\n'
                                     "extern int calls;\n"
                                     "int main(void) { return hyq_model_run(in, out) + seven + 10 * calls; }\n")
    elf = tmp_path / "firmware.elf"
    subprocess.run(["arm-none-eabi-gcc", *board.gcc_flags, "-O2", "-I", folder, "-T", folder / "mps2-an500.ld",
                    "--specs=rdimon.specs", folder / "hyq_startup.c", folder / "model.c", tmp_path / "main.c",
                    "-o", elf], check=True, capture_output=True)
    r = subprocess.run(["qemu-system-arm", "-M", "mps2-an500", "-nographic", "-semihosting", "-kernel", elf],
                       capture_output=True, timeout=60)
    assert r.returncode == 17, r


def test_model_errors_faults_bad_inputs_and_timeouts_are_reported(tools, tmp_path):
    board = load_board("mps2-an500")
    elf = build_emulated(model_folder(tmp_path / "bad", BAD_MODEL), board, tmp_path / "bad.elf")
    inputs = np.zeros((2, 64), np.int8)
    inputs[1, 0] = 1
    with pytest.raises(HyqError, match=r"exit status 5: hyq_model_run returned an error\): "
                                       r"hyq: hyq_model_run returned 7 on input 1$"):
        run_emulated(elf, board, inputs)
    inputs[1, 0] = 2
    with pytest.raises(HyqError, match=r"exit status 131: the core took a HardFault exception\): "
                                       r"hyq: HardFault at pc 0x[0-9a-f]{8} \(CFSR"):
        run_emulated(elf, board, inputs)
    with pytest.raises(HyqError, match="hyq: inputs.bin holds fewer than 2 inputs of HYQ_INPUT_BYTES = 64 bytes"):
        run_emulated(elf, board, np.zeros((2, 63), np.int8))
    with pytest.raises(HyqError, match="must be an int8 array"):
        run_emulated(elf, board, np.zeros((2, 64), np.float32))
    (tmp_path / "loop").mkdir()
    loop = model_folder(tmp_path / "loop", BAD_MODEL.replace("return 7;", "for (;;) {}"))
    elf = build_emulated(loop, board, tmp_path / "loop.elf")
    inputs[1, 0] = 1
    with pytest.raises(HyqError, match="ran longer than 1 s on QEMU mps2-an500"):
        run_emulated(elf, board, inputs, count_instructions=False, timeout=1)


def test_build_errors_name_the_problem(tools, tmp_path):
    board = load_board("mps2-an386")
    with pytest.raises(HyqError, match="holds no model C code"):
        build_emulated(tmp_path, board, tmp_path / "x.elf")
    huge = MODEL.replace("int calls;", "int calls;\nint8_t scratch[5 << 20];  /* > 4 MB of RAM */").replace(
        "calls++;", "scratch[calls++] = 1;")
    with pytest.raises(HyqError, match="could not build .* for mps2-an386 .*RAM"):
        build_emulated(model_folder(tmp_path / "huge", huge), board, tmp_path / "x.elf")
    broken = model_folder(tmp_path / "broken", MODEL.replace("calls++;", "calls++"))
    with pytest.raises(HyqError, match=r"model.c:\d+:\d+: error: expected"):
        build_emulated(broken, board, tmp_path / "x.elf")
    assert not (tmp_path / "x.elf").exists()


def test_a_missing_toolchain_or_qemu_names_the_debian_packages(tmp_path, monkeypatch):
    board = load_board("mps2-an500")
    folder = model_folder(tmp_path / "model")
    monkeypatch.setattr(firmware.shutil, "which", lambda name: None)
    with pytest.raises(HyqError, match="install the Debian packages gcc-arm-none-eabi libnewlib-arm-none-eabi"):
        build_emulated(folder, board, tmp_path / "x.elf")
    with pytest.raises(HyqError, match="install the Debian package qemu-system-arm"):
        run_emulated(tmp_path / "x.elf", board, np.zeros((1, 64), np.int8))


def test_check_fits_compares_a_model_with_the_boards_memories():
    board = load_board("stm32f746-disco")  # 1 MB flash, 320 KB RAM
    check_fits(board, 900 << 10, 200 << 10)
    check_fits(board, 1 << 20, (320 << 10) - STACK_BYTES)
    with pytest.raises(HyqError, match=r"^the model does not fit stm32f746-disco: it needs 2,048.0 KiB of flash "
                                       r"and 100.0 KiB of RAM \+ 16.0 KiB of stack, the board has 1,024.0 KiB of "
                                       r"flash and 320.0 KiB of RAM; use a smaller model or a board it fits "
                                       r"\(corstone-300, mps2-an386, .*stm32h743\)$"):
        check_fits(board, 2 << 20, 100 << 10)
    with pytest.raises(HyqError, match="does not fit stm32f746-disco"):
        check_fits(board, 100, (320 << 10) - STACK_BYTES + 1)
    with pytest.raises(HyqError, match=r"\(none of the MCU boards\)$"):
        check_fits(board, 100 << 20, 0)
    with pytest.raises(HyqError, match="cannot be negative"):
        check_fits(board, -1, 0)
