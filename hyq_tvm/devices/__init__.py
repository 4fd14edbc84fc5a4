"""Emulated ARM devices: an arm64 Debian rootfs with the TVM runtime, RPC servers under qemu-user
registered with a tracker, and deterministic instruction counts from a QEMU TCG plugin."""
from .boards import BOARDS, Board, get_board, known_boards
from .fleet import start, status, stop
from .icount import build_plugin, count_instructions
from .rootfs import build_rootfs, cache_dir

__all__ = ["BOARDS", "Board", "get_board", "known_boards", "start", "status", "stop", "build_plugin",
           "count_instructions", "build_rootfs", "cache_dir"]
