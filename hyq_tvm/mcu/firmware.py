"""Firmware around a model's C folder for a Cortex-M board: start-up code, linker script and Makefile for the
real board; an emulated build with a semihosting test harness, run under qemu-system-arm with exact
instruction counts; and the check that a model fits the board's memories.

The model's C folder holds hyq_model.h, which declares `int hyq_model_run(const int8_t *input, int8_t *output)`
(0 on success) and defines HYQ_INPUT_BYTES and HYQ_OUTPUT_BYTES (int8 values of one input and one output), and
.c files that use no heap and no C library beyond <stdint.h>, <string.h>, <math.h> and <stdbool.h>.

Everything is compiled with -O2 (measured on an int8 16x64x64 matrix multiply with Q31 requantization: -Os
ran 16 % more instructions on Cortex-M4, M7 and M33, 478,427 against 413,912, and 0.3 % fewer on Cortex-M55,
for 4-8 bytes less code; -O3 gained nothing): the weights, not the code, fill a model's flash.

QEMU is not cycle accurate: emulated wall times say nothing about the real board; instruction counts are exact.
A profile build (-DHYQ_PROFILE) has the model call hyq_step_marker(i) before its kernel call i and after the last;
its emulated run gives the instructions of each kernel call.
"""
from __future__ import annotations

import bisect
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..devices.icount import build_plugin, parse_count
from ..errors import HyqError
from ..fileio import atomic_path
from .boards import VECTOR_TABLE_BYTES, Board, MemoryMap, load_board, mcu_boards

MODEL_HEADER = "hyq_model.h"
STARTUP = "hyq_startup.c"
MAKEFILE = "Makefile"
HARNESS = "hyq_harness.c"  # written to the emulated build's own folder, never into the model's
CFLAGS = ("-O2", "-ffunction-sections", "-fdata-sections", "-Wall")
STACK_BYTES = 16 * 1024  # RAM the linker script keeps free above .bss for the stack and the C library's heap
TOOLCHAIN = "arm-none-eabi-gcc"
TOOLCHAIN_PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi"
QEMU = "qemu-system-arm"
BINUTILS_PACKAGE = "binutils-arm-none-eabi"
MARKER = "hyq_step_marker"  # the function a profile build calls before each kernel call and after the last
MODEL_PREFIXES = ("__tvm_ffi_", "hyq_")  # the names of the model's functions
STARTUP_FUNCTIONS = ("hyq_exception", "hyq_semihost", "hyq_write")  # hyq_startup.c's, not the model's
FLOAT_TYPES = ("f16", "f32", "f64", "bf16")  # the data types of floating-point instructions

# Exit statuses of hyq_harness.c (name in the C code: meaning).
HARNESS_STATUSES = {2: ("HYQ_USAGE", "bad harness command line"),
                    3: ("HYQ_OPEN", "an input or output file could not be opened"),
                    4: ("HYQ_INPUT_SIZE", "the inputs are not N x HYQ_INPUT_BYTES bytes"),
                    5: ("HYQ_MODEL", "hyq_model_run returned an error"),
                    6: ("HYQ_WRITE", "the outputs could not be written")}
# Exceptions that hyq_startup.c's handlers report with exit status 128 + their number.
EXCEPTIONS = {2: "NMI", 3: "HardFault", 4: "MemManage", 5: "BusFault", 6: "UsageFault", 7: "SecureFault",
              11: "SVCall", 12: "DebugMonitor", 14: "PendSV", 15: "SysTick"}

_STARTUP_C = """\
/* hyq_startup.c, written by hyq-tvm: start-up code for
 * @DESCRIPTION@.
 *
 * The vector table (the 16 system exceptions; the firmware enables no interrupt), Reset_Handler and handlers
 * for the other exceptions. Reset_Handler gives the FPU (and MVE on a Cortex-M55) full access, copies .data
 * from flash to RAM, zeroes .bss, opens the semihosting console when newlib's rdimon library is linked in,
 * runs the C library's constructors and exits with main()'s status. Caches stay as reset left them (off on a
 * Cortex-M7: turn them on in main() for speed, e.g. with CMSIS's SCB_EnableICache and SCB_EnableDCache).
 * An exception handler writes which exception was taken and the interrupted pc, then exits through
 * semihosting with status 128 + the exception number (131: HardFault); on a board with no debugger attached
 * the semihosting call locks the core up, which also stops it.
 * The handlers are weak: the firmware's own NMI_Handler, SysTick_Handler, ... replace them. */
#include <stdint.h>
#include <stdlib.h>

typedef void (*hyq_vector)(void);

extern uint32_t __stack_top[], __data_load[], __data_start[], __data_end[], __bss_start__[], __bss_end__[];
extern void __libc_init_array(void);
extern void initialise_monitor_handles(void) __attribute__((weak)); /* newlib's semihosting library (rdimon) */
extern int main(void);

void Reset_Handler(void);
void hyq_exception(const uint32_t *frame, uint32_t number) __attribute__((noreturn, used));

/* A handler: r0 = the stacked frame (on the stack that was in use), r1 = the exception number. */
#define HYQ_HANDLER(name, number)                                                                \\
  __attribute__((weak, naked)) void name(void) {                                                 \\
    __asm volatile("movs r1, %0\\n\\ttst lr, #4\\n\\tite eq\\n\\tmrseq r0, msp\\n\\tmrsne r0, psp\\n\\t"    \\
                   "b hyq_exception" : : "i"(number));                                             \\
  }
HYQ_HANDLER(NMI_Handler, 2)
HYQ_HANDLER(HardFault_Handler, 3)
HYQ_HANDLER(MemManage_Handler, 4)
HYQ_HANDLER(BusFault_Handler, 5)
HYQ_HANDLER(UsageFault_Handler, 6)
HYQ_HANDLER(SecureFault_Handler, 7)
HYQ_HANDLER(SVC_Handler, 11)
HYQ_HANDLER(DebugMon_Handler, 12)
HYQ_HANDLER(PendSV_Handler, 14)
HYQ_HANDLER(SysTick_Handler, 15)

__attribute__((section(".vectors"), used)) const hyq_vector hyq_vectors[16] = {
    (hyq_vector)__stack_top, Reset_Handler, NMI_Handler, HardFault_Handler, MemManage_Handler,
    BusFault_Handler, UsageFault_Handler, SecureFault_Handler, 0, 0, 0, SVC_Handler, DebugMon_Handler, 0,
    PendSV_Handler, SysTick_Handler};

void Reset_Handler(void) {
  *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20; /* CPACR: CP10 and CP11 full access */
  __asm volatile("dsb\\n\\tisb" : : : "memory");
  for (uint32_t *from = __data_load, *to = __data_start; to < __data_end;) *to++ = *from++;
  for (uint32_t *to = __bss_start__; to < __bss_end__;) *to++ = 0;
  if (initialise_monitor_handles) initialise_monitor_handles();
  __libc_init_array();
  exit(main());
}

static int hyq_semihost(int operation, const void *argument) {
  register int r0 __asm("r0") = operation;
  register const void *r1 __asm("r1") = argument;
  __asm volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

/* Write `text`, then `value` in hexadecimal, to the semihosting console (SYS_WRITE0). */
static void hyq_write(const char *text, uint32_t value) {
  char hex[9] = {0};
  for (int i = 7; i >= 0; i--, value >>= 4) hex[i] = "0123456789abcdef"[value & 15];
  hyq_semihost(0x04, text);
  hyq_semihost(0x04, hex);
}

void hyq_exception(const uint32_t *frame, uint32_t number) {
  static const char *const names[16] = {
      [2] = "NMI", [3] = "HardFault", [4] = "MemManage", [5] = "BusFault", [6] = "UsageFault",
      [7] = "SecureFault", [11] = "SVCall", [12] = "DebugMonitor", [14] = "PendSV", [15] = "SysTick"};
  hyq_semihost(0x04, "hyq: ");
  hyq_semihost(0x04, names[number & 15] ? names[number & 15] : "exception");
  hyq_write(" at pc 0x", frame[6]);
  hyq_write(" (CFSR 0x", *(volatile uint32_t *)0xE000ED28);
  hyq_write(", HFSR 0x", *(volatile uint32_t *)0xE000ED2C);
  hyq_semihost(0x04, ")\\n");
  const uint32_t status[2] = {0x20026, 128 + number}; /* ADP_Stopped_ApplicationExit, exit status */
  hyq_semihost(0x20, status);                         /* SYS_EXIT_EXTENDED */
  for (;;) {
  }
}
"""

_LINKER_SCRIPT = """\
/* @FILE@, written by hyq-tvm: linker script for
 * @DESCRIPTION@.
 * Flash: code, constants and the initial values of .data; Reset_Handler (hyq_startup.c) copies .data to RAM
 * and zeroes .bss. Above .bss the C library's heap grows up towards the stack, which grows down from the top
 * of RAM; at least @STACK@ bytes are kept free for both. */
MEMORY
{
@VECTOR_MEMORY@  FLASH (rx) : ORIGIN = @FLASH_ORIGIN@, LENGTH = @FLASH_SIZE@
  RAM (rwx) : ORIGIN = @RAM_ORIGIN@, LENGTH = @RAM_SIZE@
}

ENTRY(Reset_Handler)

SECTIONS
{
  .vectors : { KEEP(*(.vectors)) } > @VECTOR_REGION@
  .text : ALIGN(4)
  {
    *(.text .text.*)
    KEEP(*(.init))
    KEEP(*(.fini))
    *(.rodata .rodata.*)
    KEEP(*(.eh_frame*))
  } > FLASH
  .ARM.extab : { *(.ARM.extab* .gnu.linkonce.armextab.*) } > FLASH
  .ARM.exidx :
  {
    PROVIDE_HIDDEN(__exidx_start = .);
    *(.ARM.exidx* .gnu.linkonce.armexidx.*)
    PROVIDE_HIDDEN(__exidx_end = .);
  } > FLASH
  .preinit_array :
  {
    PROVIDE_HIDDEN(__preinit_array_start = .);
    KEEP(*(.preinit_array))
    PROVIDE_HIDDEN(__preinit_array_end = .);
  } > FLASH
  .init_array :
  {
    PROVIDE_HIDDEN(__init_array_start = .);
    KEEP(*(SORT(.init_array.*)))
    KEEP(*(.init_array))
    PROVIDE_HIDDEN(__init_array_end = .);
  } > FLASH
  .fini_array :
  {
    PROVIDE_HIDDEN(__fini_array_start = .);
    KEEP(*(SORT(.fini_array.*)))
    KEEP(*(.fini_array))
    PROVIDE_HIDDEN(__fini_array_end = .);
  } > FLASH
  .data : ALIGN(4)
  {
    __data_start = .;
    *(.data .data.*)
    . = ALIGN(4);
    __data_end = .;
  } > RAM AT > FLASH
  __data_load = LOADADDR(.data);
  .bss (NOLOAD) : ALIGN(4)
  {
    __bss_start__ = .;
    *(.bss .bss.*)
    *(COMMON)
    . = ALIGN(4);
    __bss_end__ = .;
  } > RAM
  . = ALIGN(8);
  end = .;      /* the heap starts here (the C library's _sbrk) */
  __end__ = .;
  __stack_top = ORIGIN(RAM) + LENGTH(RAM);
  ASSERT(__stack_top - end >= @STACK@,
         "hyq: RAM overflow: .data and .bss leave less than @STACK@ bytes for the stack and heap")
}
"""

_MAKEFILE = """\
# Makefile, written by hyq-tvm: the model's C code for
# @DESCRIPTION@.
#
#   make        builds libhyq_model.a (the model: every .c file here but hyq_startup.c) and hyq_startup.o
#               (vector table, Reset_Handler, exception handlers) with arm-none-eabi-gcc
#   make clean  removes them
#
# Link them into your firmware with the board's linker script, for example:
#   arm-none-eabi-gcc $(CPUFLAGS) -T @LDSCRIPT@ -Wl,--gc-sections --specs=nano.specs --specs=nosys.specs \\
#       hyq_startup.o main.o libhyq_model.a -lm -o firmware.elf
# or link libhyq_model.a alone into a firmware that has its own start-up code and linker script.
CC = arm-none-eabi-gcc
AR = arm-none-eabi-ar
CPUFLAGS = @CPUFLAGS@
CFLAGS = $(CPUFLAGS) @CFLAGS@
MODEL_OBJECTS = $(patsubst %.c,%.o,$(filter-out hyq_startup.c,$(wildcard *.c)))

all: libhyq_model.a hyq_startup.o

libhyq_model.a: $(MODEL_OBJECTS)
\trm -f $@
\t$(AR) rcs $@ $^

%.o: %.c $(wildcard *.h)
\t$(CC) $(CFLAGS) -c $< -o $@

clean:
\trm -f *.o libhyq_model.a

.PHONY: all clean
"""

_HARNESS_C = """\
/* hyq_harness.c: runs the model on QEMU through semihosting, written by hyq-tvm (not part of the firmware).
 *
 * Semihosting command line: hyq INPUTS OUTPUTS N MODE. Reads N inputs of HYQ_INPUT_BYTES int8 values from the
 * host file INPUTS and writes N outputs of HYQ_OUTPUT_BYTES to the host file OUTPUTS. MODE "run" calls
 * hyq_model_run on each input; "skip" does the same reads and writes without calling it, so that the
 * difference between the instruction counts of the two runs is the cost of the N calls. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hyq_model.h"

@STATUSES@

static int8_t input[HYQ_INPUT_BYTES], output[HYQ_OUTPUT_BYTES];

/* The semihosting command line (SYS_GET_CMDLINE) split at spaces into at most `most` words; their number. */
static int command_line(char *line, int size, char **words, int most) {
  struct {
    char *buffer;
    int length;
  } block = {line, size - 1};
  register int r0 __asm("r0") = 0x15;
  register void *r1 __asm("r1") = &block;
  __asm volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  if (r0 != 0) return 0;
  line[block.length] = '\\0';
  int n = 0;
  for (char *word = strtok(line, " "); word != NULL && n < most; word = strtok(NULL, " ")) words[n++] = word;
  return n;
}

int main(void) {
  char line[1024], *arg[6], *end;
  long n;
  if (command_line(line, sizeof line, arg, 6) != 5 || (n = strtol(arg[3], &end, 10)) < 1 || *end != '\\0' ||
      (strcmp(arg[4], "run") != 0 && strcmp(arg[4], "skip") != 0)) {
    fputs("hyq: usage: hyq INPUTS OUTPUTS N run|skip\\n", stderr);
    return HYQ_USAGE;
  }
  int run = strcmp(arg[4], "run") == 0;
  FILE *in = fopen(arg[1], "rb"), *out = fopen(arg[2], "wb");
  if (in == NULL || out == NULL) {
    fprintf(stderr, "hyq: cannot open %s\\n", in == NULL ? arg[1] : arg[2]);
    return HYQ_OPEN;
  }
  for (long i = 0; i < n; i++) {
    if (fread(input, 1, sizeof input, in) != sizeof input) {
      fprintf(stderr, "hyq: %s holds fewer than %ld inputs of HYQ_INPUT_BYTES = %ld bytes\\n", arg[1], n,
              (long)sizeof input);
      return HYQ_INPUT_SIZE;
    }
    if (run) {
      int status = hyq_model_run(input, output);
      if (status != 0) {
        fprintf(stderr, "hyq: hyq_model_run returned %d on input %ld\\n", status, i);
        return HYQ_MODEL;
      }
    }
    if (fwrite(output, 1, sizeof output, out) != sizeof output) {
      fprintf(stderr, "hyq: cannot write %s\\n", arg[2]);
      return HYQ_WRITE;
    }
  }
  if (fgetc(in) != EOF) {
    fprintf(stderr, "hyq: %s holds more than %ld inputs of HYQ_INPUT_BYTES = %ld bytes\\n", arg[1], n,
            (long)sizeof input);
    return HYQ_INPUT_SIZE;
  }
  fclose(in);
  if (fclose(out) != 0) {
    fprintf(stderr, "hyq: cannot write %s\\n", arg[2]);
    return HYQ_WRITE;
  }
  return 0;
}
"""


def _fill(template: str, **values: object) -> str:
    """`template` with each @KEY@ replaced by values[KEY]."""
    for key, value in values.items():
        template = template.replace(f"@{key}@", str(value))
    return template


def startup_code(board: Board) -> str:
    """hyq_startup.c for `board`: vector table, Reset_Handler, exception handlers."""
    return _fill(_STARTUP_C, DESCRIPTION=board.description or board.name)


def linker_script(board: Board, memory: MemoryMap, file: str) -> str:
    """The linker script `file` that places a firmware in `memory` (the board's, or its QEMU machine's)."""
    separate = memory.separate_vectors
    vectors = f"  VECTORS (rx) : ORIGIN = {memory.vectors:#010x}, LENGTH = {VECTOR_TABLE_BYTES}\n"
    return _fill(_LINKER_SCRIPT, FILE=file, DESCRIPTION=board.description or board.name, STACK=STACK_BYTES,
                 VECTOR_MEMORY=vectors if separate else "", VECTOR_REGION="VECTORS" if separate else "FLASH",
                 FLASH_ORIGIN=f"{memory.flash.origin:#010x}", FLASH_SIZE=f"{memory.flash.size:#x}",
                 RAM_ORIGIN=f"{memory.ram.origin:#010x}", RAM_SIZE=f"{memory.ram.size:#x}")


def write_board_files(folder: str | Path, board: Board) -> list[Path]:
    """Write hyq_startup.c, the board's linker script BOARD.ld and a Makefile (builds libhyq_model.a and
    hyq_startup.o with arm-none-eabi-gcc) into the model's C folder; return their paths."""
    folder = Path(folder)
    ldscript = f"{board.name}.ld"
    texts = {STARTUP: startup_code(board),
             ldscript: linker_script(board, board.memory, ldscript),
             MAKEFILE: _fill(_MAKEFILE, DESCRIPTION=board.description or board.name, LDSCRIPT=ldscript,
                             CPUFLAGS=" ".join(board.gcc_flags), CFLAGS=" ".join((*CFLAGS, *board.model_flags)))}
    for name, text in texts.items():
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text)
    return [folder / name for name in texts]


def _toolchain() -> str:
    """arm-none-eabi-gcc, checked to find newlib's semihosting library; else a HyqError naming the packages."""
    gcc = shutil.which(TOOLCHAIN)
    found = gcc and subprocess.run([gcc, "-print-file-name=rdimon.specs"], capture_output=True,
                                   text=True).stdout.strip() != "rdimon.specs"
    if not found:
        raise HyqError(f"{TOOLCHAIN} with newlib not found: install the Debian packages {TOOLCHAIN_PACKAGES} "
                       f"(apt-get install {TOOLCHAIN_PACKAGES}, or run scripts/setup.sh)")
    return gcc


def _first_error(stderr: str) -> str:
    """The compiler's or the linker's first error message."""
    lines = [re.sub(r"^\S*/ld: ", "ld: ", line.strip()) for line in stderr.splitlines()
             if line.strip() and not line.startswith("collect2") and not line.rstrip().endswith(":")]
    return next((line for line in lines if "error" in line or line.startswith("ld: ")), "no message")[:300]


def _model_sources(folder: Path) -> list[Path]:
    """The model's .c files in its C folder (not the start-up code); a HyqError when it holds none."""
    sources = sorted(p for p in folder.glob("*.c") if p.name != STARTUP)
    if not (folder / MODEL_HEADER).is_file() or not sources:
        raise HyqError(f"{folder} holds no model C code ({MODEL_HEADER} and .c files): emit the model's C folder "
                       f"first")
    return sources


def _frames(stack_usage: str) -> dict[str, int]:
    """Stack frame bytes per function from gcc's -fstack-usage lines ("file:line:col:name  bytes  static")."""
    frames = {}
    for line in stack_usage.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[1].strip().isdigit():
            frames[fields[0].rsplit(":", 1)[-1]] = int(fields[1])
    return frames


def model_size(folder: str | Path, board: Board) -> dict[str, int]:
    """text, data and bss bytes of the model's C compiled for the board (as the Makefile compiles it), summed over
    its object files: what the model adds to a firmware's flash (text + data) and RAM (data + bss); and "stack",
    the deepest stack one inference takes: hyq_model_run's frame plus the largest kernel frame (gcc -fstack-usage;
    the kernels call nothing that takes stack but inline helpers)."""
    folder = Path(folder).resolve()
    gcc = _toolchain()
    total = {"text": 0, "data": 0, "bss": 0}
    frames: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="hyq-objects-") as tmp:
        for source in _model_sources(folder):
            obj = Path(tmp) / f"{source.stem}.o"
            r = subprocess.run([gcc, *board.gcc_flags, *CFLAGS, *board.model_flags, "-fstack-usage", "-I",
                                str(folder), "-c", str(source), "-o", str(obj)], capture_output=True, text=True)
            if r.returncode != 0:
                raise HyqError(f"{TOOLCHAIN} could not compile {source.name} for {board.name}: "
                               f"{_first_error(r.stderr)}")
            for key, value in code_size(obj).items():
                total[key] += value
            usage = obj.with_suffix(".su")
            frames.update(_frames(usage.read_text()) if usage.is_file() else {})
    kernels = [size for name, size in frames.items() if name.startswith("__tvm_ffi_")]
    total["stack"] = frames.get("hyq_model_run", 0) + max(kernels, default=0)
    return total


def build_emulated(folder: str | Path, board: Board, out_elf: str | Path, profile: bool = False) -> Path:
    """Build the model's C folder with a semihosting test harness (hyq_harness.c) into `out_elf`, an ELF for
    the board's QEMU machine (its memory map; the board's core and compiler flags); return its path.
    profile: a profile build (-DHYQ_PROFILE), whose run_emulated(..., profile=True) counts each kernel call."""
    folder, out_elf = Path(folder).resolve(), Path(out_elf)
    gcc = _toolchain()
    sources = _model_sources(folder)
    statuses = "\n".join(f"#define {name} {status} /* {meaning} */"
                         for status, (name, meaning) in HARNESS_STATUSES.items())
    with tempfile.TemporaryDirectory(prefix="hyq-firmware-") as tmp:
        build = Path(tmp)
        (build / HARNESS).write_text(_fill(_HARNESS_C, STATUSES=statuses))
        (build / STARTUP).write_text(startup_code(board))
        ldscript = f"{board.qemu_machine}.ld"
        (build / ldscript).write_text(linker_script(board, board.qemu_memory, ldscript))
        with atomic_path(out_elf) as elf:
            cmd = [gcc, *board.gcc_flags, *CFLAGS, *board.model_flags, *(["-DHYQ_PROFILE"] if profile else []),
                   "-I", str(folder), *map(str, sources), str(build / STARTUP), str(build / HARNESS), "-T", str(build / ldscript), "-Wl,--gc-sections", "--specs=rdimon.specs",
                   "-lm", "-o", str(elf)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise HyqError(f"{TOOLCHAIN} could not build {folder} for {board.name} ({board.qemu_machine}): "
                               f"{_first_error(r.stderr)}")
    return out_elf


@dataclass(frozen=True)
class Emulated:
    """What an emulated run gave: the outputs (N, HYQ_OUTPUT_BYTES) int8, the instructions one inference
    executed (None when not counted), the wall-clock seconds of the run (QEMU start-up included; says
    nothing about the real board) and, from a profiled run, the instructions of each kernel call of the first
    inference (None when not profiled)."""

    outputs: np.ndarray
    instructions_per_inference: int | None
    seconds: float
    step_instructions: tuple[int, ...] | None = None


def _status(code: int) -> str:
    """What an exit status of the emulated firmware means."""
    if code < 0:
        return f"QEMU was killed by signal {-code}"
    if code in HARNESS_STATUSES:
        return f"exit status {code}: {HARNESS_STATUSES[code][1]}"
    if code - 128 in EXCEPTIONS:
        return f"exit status {code}: the core took a {EXCEPTIONS[code - 128]} exception"
    return f"exit status {code}"


def _tail(*outputs: bytes | str | None) -> str:
    """The last lines QEMU and the firmware printed, on one line."""
    text = "\n".join(o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in outputs)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-4:])[-400:] or "no output"


def _run_qemu(qemu: str, elf: Path, board: Board, where: Path, n: int, mode: str, plugin: Path | None,
              timeout: float, mark: int | None = None) -> str | None:
    """One run of the harness in `where` (inputs.bin -> outputs.bin); the plugin's report when counted (with
    the marks of the function at address `mark` when given)."""
    count = where / f"icount-{mode}"
    cmd = [qemu, "-M", board.qemu_machine, "-nographic", "-semihosting-config",
           f"enable=on,target=native,arg=hyq,arg=inputs.bin,arg=outputs.bin,arg={n},arg={mode}",
           "-kernel", str(elf)]
    if plugin is not None:
        cmd += ["-plugin", f"{plugin},out={count}" + (f",mark={mark:#x}" if mark is not None else "")]
    try:
        proc = subprocess.run(cmd, cwd=where, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise HyqError(f"{elf.name} ran longer than {timeout:g} s on QEMU {board.qemu_machine} (raise the timeout "
                       f"or run fewer inputs): {_tail(err.stdout, err.stderr)}") from None
    if proc.returncode != 0:
        raise HyqError(f"{elf.name} failed on QEMU {board.qemu_machine} ({_status(proc.returncode)}): "
                       f"{_tail(proc.stdout, proc.stderr)}")
    if plugin is None:
        return None
    if not count.is_file():
        raise HyqError("the QEMU plugin wrote no instruction count")
    return count.read_text()


def _step_instructions(report: str, n: int) -> tuple[int, ...]:
    """The instructions between successive hyq_step_marker calls of the first of `n` inferences, from the
    plugin's icount_marks line."""
    line = next((line.split()[1:] for line in report.splitlines() if line.split()[:1] == ["icount_marks"]), None)
    if line is None:
        raise HyqError("the QEMU plugin wrote no icount_marks line: rebuild it from native/icount.c")
    marks = [int(mark) for mark in line]
    if not marks or len(marks) % n:
        raise HyqError(f"{MARKER} ran {len(marks)} times in {n} inferences, not the same number of times (at least "
                       f"once) in each: the model must call it before each kernel call and after the last")
    first = marks[:len(marks) // n]
    return tuple(b - a for a, b in zip(first, first[1:]))


def run_emulated(elf: str | Path, board: Board, inputs: np.ndarray, count_instructions: bool = True,
                 timeout: float = 600, profile: bool = False) -> Emulated:
    """Run the harness ELF of build_emulated on the board's QEMU machine over `inputs` (N, ...) int8, one
    inference per row. With count_instructions, instructions_per_inference is the mean over the N inputs
    (rounded to the nearest integer) of the instructions a hyq_model_run call executes, the call itself
    included: the instruction count of this run minus that of a second run which skips the model. It is
    exact and deterministic. With profile (an ELF of build_emulated(..., profile=True)), step_instructions[i]
    is what kernel call i of the first inference executed, from the hyq_step_marker call before it to the one
    after it (so its few call instructions included); also exact. Each QEMU run may take `timeout` seconds."""
    elf = Path(elf).resolve()
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise HyqError(f"{QEMU} not found: install the Debian package {QEMU} (apt-get install {QEMU}, "
                       f"or run scripts/setup.sh)")
    if not elf.is_file():
        raise HyqError(f"{elf} not found: build it with build_emulated first")
    data = np.asarray(inputs)
    if data.dtype != np.int8 or data.ndim < 2 or len(data) == 0:
        raise HyqError(f"the inputs must be an int8 array of shape (N, ...) with N >= 1, got {data.dtype} "
                       f"{data.shape}")
    n = len(data)
    mark = _marker_address(elf) if profile else None
    plugin = build_plugin() if count_instructions or profile else None
    with tempfile.TemporaryDirectory(prefix="hyq-qemu-") as tmp:
        where = Path(tmp)
        (where / "inputs.bin").write_bytes(np.ascontiguousarray(data).tobytes())
        start = time.perf_counter()
        report = _run_qemu(qemu, elf, board, where, n, "run", plugin, timeout, mark)
        seconds = time.perf_counter() - start
        raw = (where / "outputs.bin").read_bytes()
        if not raw or len(raw) % n:
            raise HyqError(f"{elf.name} wrote {len(raw)} output bytes for {n} inputs: rebuild it with "
                           f"build_emulated")
        per_inference = None
        if count_instructions:
            skipped = parse_count(_run_qemu(qemu, elf, board, where, n, "skip", plugin, timeout))
            per_inference = (2 * (parse_count(report) - skipped) + n) // (2 * n)
    return Emulated(np.frombuffer(raw, np.int8).reshape(n, -1).copy(), per_inference, seconds,
                    _step_instructions(report, n) if profile else None)


def _binutil(tool: str, *args: str | Path) -> str:
    """The output of arm-none-eabi-TOOL ARGS; a HyqError naming the package when missing or failing."""
    path = shutil.which(f"arm-none-eabi-{tool}")
    if path is None:
        raise HyqError(f"arm-none-eabi-{tool} not found: install the Debian package {BINUTILS_PACKAGE} "
                       f"(apt-get install {BINUTILS_PACKAGE}, or run scripts/setup.sh)")
    r = subprocess.run([path, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise HyqError(f"arm-none-eabi-{tool} failed: {(r.stderr.strip().splitlines() or ['no message'])[0][:300]}")
    return r.stdout


def _functions(elf: Path) -> dict[str, tuple[int, int]]:
    """The ELF's functions: {name: (start address without the Thumb bit, size in bytes)}."""
    if not elf.is_file():
        raise HyqError(f"{elf} not found: build it with build_emulated first")
    functions = {}
    for fields in map(str.split, _binutil("nm", "--defined-only", "-S", elf).splitlines()):
        if len(fields) == 4 and fields[2] in ("T", "t"):
            functions[fields[3]] = (int(fields[0], 16) & ~1, int(fields[1], 16))
    return functions


def _marker_address(elf: Path) -> int:
    """The address of hyq_step_marker in a profile build."""
    functions = _functions(elf)
    clones = sorted(name for name in functions if name.startswith(f"{MARKER}."))
    if clones:
        raise HyqError(f"the compiler copied {MARKER} into {', '.join(clones)}, which the model calls instead: "
                       f"declare it __attribute__((noipa))")
    if MARKER not in functions:
        raise HyqError(f"{elf.name} has no {MARKER}: not a profile build; build it with "
                       f"build_emulated(..., profile=True) from a model emitted with the profiling hook")
    return functions[MARKER][0]


def code_size(elf: str | Path) -> dict[str, int]:
    """The bytes of an ELF's sections, as arm-none-eabi-size counts them: "text" (code, constants, vector table;
    in flash), "data" (initialised variables: in RAM, their first values also in flash) and "bss" (zeroed
    variables, in RAM)."""
    elf = Path(elf)
    if not elf.is_file():
        raise HyqError(f"{elf} not found: build it with build_emulated first")
    text, data, bss = (int(v) for v in _binutil("size", "-B", elf).splitlines()[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def _is_float(mnemonic: str, operands: str, mve: bool) -> bool:
    """Whether an instruction (objdump's text) is a floating-point one: see float_instructions."""
    return mnemonic.startswith("v") and (
        any(kind in FLOAT_TYPES for kind in mnemonic.split(".")[1:])
        or not mve and re.search(r"\b([sd]\d+|fpscr)\b", operands.split("@")[0].split("<")[0]) is not None)


def float_instructions(elf: str | Path, functions: list[str] | None = None) -> list[str]:
    """The floating-point instructions in the ELF's `functions` (default: the model's, those named __tvm_ffi_*
    or hyq_*, not the start-up code's), each as "function: instruction" (objdump's text), in address order.
    Floating point: an FPU or MVE instruction (mnemonic "v...") with a floating-point data type (.f16, .f32, .f64,
    .bf16: vadd.f32, vcvt.s32.f32, vmov.f32 s0, #1.0, MVE's vmul.f32 q0, ...) and, on a core without MVE, any
    other with an operand in the FPU's registers s0-s31, d0-d31 or fpscr (vldr s0, vmov r0, s1, vpush {d8},
    vmrs APSR_nzcv, fpscr), even one that only moves integers (gcc's spills to s registers, 64-bit copies
    through d registers): it needs the FPU all the same. On a core with MVE (Cortex-M55) those registers are
    the halves of the q registers, which integer MVE loads and moves through (vldr d4 of a vector constant), so
    there only the typed instructions count. Integer MVE (vadd.i8 q0, vmla.s8, vldrb.8 q0, ...) is never
    floating point."""
    elf = Path(elf)
    known = _functions(elf)
    if functions is None:
        functions = [name for name in known if name.startswith(MODEL_PREFIXES) and name not in STARTUP_FUNCTIONS]
    missing = [name for name in functions if name not in known]
    if missing:
        raise HyqError(f"{elf.name} has no function {', '.join(missing)}: name functions it defines")
    ranges = sorted((known[name][0], known[name][0] + known[name][1], name) for name in set(functions))
    if not ranges:
        return []
    starts = [start for start, _, _ in ranges]
    mve = "Tag_MVE_arch:" in _binutil("readelf", "-A", elf)
    listing = _binutil("objdump", "-d", "--no-show-raw-insn", *(["-m", "armv8.1-m.main"] if mve else []),
                       f"--start-address={starts[0]:#x}", f"--stop-address={max(end for _, end, _ in ranges):#x}",
                       elf)  # objdump decodes MVE only when told the architecture
    found = []
    for match in re.finditer(r"^\s*([0-9a-f]+):\s+(\S+)[ \t]*(.*)$", listing, re.M):
        address, mnemonic, operands = int(match[1], 16), match[2], match[3]
        start, end, name = ranges[max(bisect.bisect_right(starts, address) - 1, 0)]
        if start <= address < end and _is_float(mnemonic, operands, mve):
            found.append(f"{name}: " + " ".join(f"{mnemonic} {operands}".split()))
    return found


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def _fits(board: Board, flash_bytes: int, ram_bytes: int) -> bool:
    return flash_bytes <= board.memory.flash.size and ram_bytes + STACK_BYTES <= board.memory.ram.size


def check_fits(board: Board, flash_bytes: int, ram_bytes: int) -> None:
    """A HyqError unless a model with `flash_bytes` of code and constants and `ram_bytes` of .data and .bss
    fits the board, whose RAM must also keep STACK_BYTES free for the stack and heap (as its linker script does)."""
    if min(flash_bytes, ram_bytes) < 0:
        raise HyqError(f"memory sizes cannot be negative, got flash {flash_bytes} and RAM {ram_bytes} bytes")
    if _fits(board, flash_bytes, ram_bytes):
        return
    others = [name for name in mcu_boards()
              if name != board.name and _fits(load_board(name), flash_bytes, ram_bytes)]
    flash, ram = board.memory.flash.size, board.memory.ram.size
    raise HyqError(f"the model does not fit {board.name}: it needs {_kib(flash_bytes)} of flash and "
                   f"{_kib(ram_bytes)} of RAM + {_kib(STACK_BYTES)} of stack, the board has {_kib(flash)} of flash "
                   f"and {_kib(ram)} of RAM; use a smaller model or a board it fits "
                   f"({', '.join(others) or 'none of the MCU boards'})")
