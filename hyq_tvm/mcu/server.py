"""The host-side RPC server of a microcontroller board (python -m hyq_tvm.mcu.server): what the USB host of a
real board would run. TVM's RPC server (tvm.rpc.Server, in this machine's Python) registered with a tracker under
the board's key, whose sessions offer:

  hyq.mcu.info() -> str          JSON: {"board", "cpu", "qemu_machine", "emulated"}
  hyq.mcu.run(elf, inputs, n)    -> bytes: RESULT (the instructions one inference executed, -1 when not counted)
                                 followed by the n int8 outputs; elf: the name of a file uploaded into the session
                                 (session.upload), inputs: n int8 inputs back to back

The board is emulated (EmulatedBoard: the firmware runs on the board's QEMU machine). An attached board would be
another BoardRunner (flash the ELF, feed the inputs over its debug link) passed to register; none is implemented.
Errors come back to the client as one line (an RPCError whose message is that line).
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from ..devices.icount import build_plugin
from ..errors import HyqError, run_cli
from .boards import Board, load_board
from .firmware import QEMU, run_emulated

INFO = "hyq.mcu.info"
RUN = "hyq.mcu.run"
RESULT = struct.Struct("<q")  # the header of hyq.mcu.run's answer: instructions per inference, -1: not counted


class BoardRunner(Protocol):
    """What runs firmware for one board: describes the board and runs an ELF over int8 inputs."""

    board: Board

    def describe(self) -> dict[str, object]: ...

    def run(self, elf: Path, inputs: np.ndarray) -> tuple[np.ndarray, int | None]: ...


@dataclass(frozen=True)
class EmulatedBoard:
    """The board's QEMU machine: an ELF of firmware.build_emulated, instructions counted exactly (EMULATED)."""

    board: Board

    def describe(self) -> dict[str, object]:
        return {"board": self.board.name, "cpu": self.board.cpu, "qemu_machine": self.board.qemu_machine,
                "emulated": True}

    def run(self, elf: Path, inputs: np.ndarray) -> tuple[np.ndarray, int | None]:
        run = run_emulated(elf, self.board, inputs)
        return run.outputs, run.instructions_per_inference


def pack_result(outputs: np.ndarray, instructions: int | None) -> bytes:
    """hyq.mcu.run's answer."""
    return RESULT.pack(-1 if instructions is None else instructions) + np.ascontiguousarray(outputs).tobytes()


def unpack_result(raw: bytes, n: int) -> tuple[np.ndarray, int | None]:
    """(outputs (n, bytes per output) int8, instructions per inference or None) of hyq.mcu.run's answer."""
    if len(raw) <= RESULT.size or (len(raw) - RESULT.size) % n:
        raise HyqError(f"the MCU server answered {len(raw)} bytes for {n} inputs: not {RESULT.size} bytes of "
                       f"instructions and {n} outputs; restart it with the same hyq-tvm version as the client")
    (instructions,) = RESULT.unpack_from(raw)
    return np.frombuffer(raw, np.int8, offset=RESULT.size).reshape(n, -1).copy(), \
        None if instructions < 0 else instructions


def one_line(fn: Callable) -> Callable:
    """fn, raising every error as a HyqError of one line (what the client shows)."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except HyqError as err:
            raise HyqError(" ".join(str(err).split())) from None
        except Exception as err:  # noqa: BLE001 - any error reaches the client, on one line
            raise HyqError(" ".join(f"{type(err).__name__}: {err}".split())) from None
    return wrapper


def _session_file(name: str) -> Path:
    """The file `name` uploaded into this session's folder."""
    import tvm_ffi

    if not name or Path(name).name != name:
        raise HyqError(f"the firmware must be named by a file name in the session folder, not {name!r}")
    path = Path(tvm_ffi.get_global_func("tvm.rpc.server.workpath")(name))
    if not path.is_file():
        raise HyqError(f"{name} was not uploaded into this session: upload the ELF (session.upload) first")
    return path


def register(board_name: str, runner: Callable[[Board], BoardRunner] = EmulatedBoard) -> None:
    """Register hyq.mcu.info and hyq.mcu.run for the board (runner: what runs its firmware). Runs where TVM's server
    forks its session processes, which inherit the functions: it makes sure they are forked."""
    import tvm_ffi

    multiprocessing.set_start_method("fork", force=True)  # spawn or forkserver: sessions without the functions
    target = runner(load_board(board_name))

    @one_line
    def info() -> str:
        return json.dumps(target.describe())

    @one_line
    def run(elf: str, inputs: bytes, n: int) -> bytes:
        data = bytes(inputs)
        if n < 1 or not data or len(data) % n:
            raise HyqError(f"hyq.mcu.run got {len(data)} input bytes for {n} inputs: give n >= 1 inputs of equal size")
        outputs, instructions = target.run(_session_file(elf), np.frombuffer(data, np.int8).reshape(n, -1))
        return pack_result(outputs, instructions)

    tvm_ffi.register_global_func(INFO, info, override=True)
    tvm_ffi.register_global_func(RUN, run, override=True)


def serve(board: Board, host: str, port: int, tracker: tuple[str, int], key: str) -> None:
    """Serve the emulated board on host:port, registered with the tracker under `key`, until killed."""
    from tvm import rpc

    if shutil.which(QEMU) is None:
        raise HyqError(f"{QEMU} not found: install the Debian package {QEMU} (apt-get install {QEMU}, "
                       f"or run scripts/setup.sh)")
    build_plugin()  # once, before the first session needs it
    server = rpc.Server(host, port, port + 1, tracker_addr=tracker, key=key,
                        server_init_callback=functools.partial(register, board.name))
    print(f"{board.name}: RPC server on {host}:{server.port}, key {key!r}, tracker {tracker[0]}:{tracker[1]} "
          f"(EMULATED on qemu-system-arm -M {board.qemu_machine})", flush=True)
    server.proc.join()


def main(argv: Sequence[str] | None = None) -> None:
    from ..devices.fleet import parse_addr

    p = argparse.ArgumentParser(prog="python -m hyq_tvm.mcu.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--board", required=True, help="the MCU board (targets/BOARD.toml with an [mcu] table)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--tracker", required=True, help="HOST:PORT of the RPC tracker")
    p.add_argument("--key", default=None, help="tracker key (default: the board name)")
    args = p.parse_args(argv)
    board = load_board(args.board)
    serve(board, args.host, args.port, parse_addr(args.tracker), args.key or board.name)


if __name__ == "__main__":
    from hyq_tvm.mcu.server import main as server_main  # the module's own functions, not __main__'s copies

    run_cli(server_main)
