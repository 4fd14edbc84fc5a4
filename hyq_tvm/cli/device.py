"""Emulated ARM boards for TVM RPC (python -m hyq_tvm.device).

  start BOARD [--count N] [--tracker HOST:PORT] [--host H --expose] [--icount]   build the arm64 rootfs
        once, start N RPC servers under qemu-user (-cpu of the board) registered with a tracker; for an MCU
        board (stm32h743, ...: no root, no rootfs) N servers of hyq_tvm.mcu.server, which run firmware on the
        board's QEMU machine (qemu-system-arm -M)
  status (or list)                         the tracker and the boards (state file + the tracker's view)
  stop [BOARD|NAME|all]                    kill boards by process group (and our tracker when none is left)
  build                                    only build the rootfs
  boards                                   the known boards (Linux and MCU)
  icount PROGRAM [ARGS...] [--board B]     executed instructions of an aarch64 program (deterministic)

Emulated, not real hardware: wall-clock times from these boards say nothing about a real device.
TVM RPC has no authentication: a server runs any library a client sends. The tracker and the Linux servers run
as an unprivileged user in the rootfs, MCU servers as the user who starts them; all listen on 127.0.0.1;
another --host needs --expose.
Cache: $HYQ_TVM_CACHE, default ~/.cache/hyq-tvm.
"""
from __future__ import annotations

import argparse
import json
import sys



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.device", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start emulated boards (Linux or MCU)")
    s.add_argument("board")
    s.add_argument("--count", type=int, default=1, help="boards to start under the key (default 1)")
    s.add_argument("--tracker", default=None, help="HOST:PORT of a running tracker (default: start one)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address the servers and our tracker listen on (default 127.0.0.1; others need --expose)")
    s.add_argument("--expose", action="store_true",
                   help="allow a --host that is not loopback: whoever reaches it can run any code on the boards")
    s.add_argument("--key", default=None, help="tracker key (default: the board name)")
    s.add_argument("--icount", action="store_true",
                   help="count instructions of every RPC session process (QEMU plugin; slower)")
    st = sub.add_parser("status", aliases=["list"], help="list the tracker and the boards")
    st.add_argument("--json", action="store_true")
    sp = sub.add_parser("stop", help="stop boards")
    sp.add_argument("which", nargs="?", default=None, help="a board type, a board name or all (default all)")
    sub.add_parser("build", help="build the arm64 rootfs only")
    sub.add_parser("boards", help="list the known boards")
    ic = sub.add_parser("icount", help="count executed instructions of an aarch64 program")
    ic.add_argument("--board", default="rasp4b")
    ic.add_argument("--sysroot", default=None, help="aarch64 sysroot (default /usr/aarch64-linux-gnu)")
    ic.add_argument("program")
    ic.add_argument("args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def _print_status(st: dict) -> None:
    t = st["tracker"]
    if not t:
        print("tracker: none (no boards started)")
    else:
        own = "started by us, pgid %s, %s" % (t["pgid"], "alive" if t.get("alive") else "DEAD") if t.get("started") \
            else "external"
        print(f"tracker: {t['host']}:{t['port']} ({own})")
    for b in st["boards"]:
        qemu = f"qemu-system-arm -M {b['qemu_machine']}" if b.get("kind") == "mcu" else f"qemu -cpu {b['qemu_cpu']}"
        print(f"board {b['name']}: key {b['key']}, {b['host']}:{b['port']}, {qemu}, "
              f"pgid {b['pgid']}, {'alive' if b['alive'] else 'DEAD'}")
        if b.get("icount"):
            print(f"  instructions of ended sessions (pid: count): {b.get('icounts') or 'none yet'}")
    if st.get("tracker_summary"):
        print(st["tracker_summary"].rstrip())
    elif st.get("tracker_error"):
        print(f"tracker: {st['tracker_error']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    from .. import devices
    from ..devices import fleet
    from ..mcu.boards import load_board, mcu_boards

    if args.cmd == "boards":
        for b in devices.BOARDS.values():
            print(f"{b.name:15s} qemu -cpu {b.qemu_cpu:11s} {b.description}")
        for b in map(load_board, mcu_boards()):
            print(f"{b.name:15s} qemu -M {b.qemu_machine:12s} {b.description}")
    elif args.cmd == "build":
        print(devices.build_rootfs())
    elif args.cmd == "start":
        state = fleet.start(args.board, count=args.count, tracker=args.tracker, host=args.host, key=args.key,
                            icount=args.icount, expose=args.expose)
        t = state["tracker"]
        print(f"tracker {t['host']}:{t['port']}; boards: "
              + ", ".join(f"{b['name']} ({b['host']}:{b['port']}, key {b['key']})" for b in state["boards"]))
        print(f"use: tvm.rpc.connect_tracker({t['host']!r}, {t['port']}).request({(args.key or args.board)!r})")
    elif args.cmd in ("status", "list"):
        st = fleet.status()
        print(json.dumps(st, indent=2)) if args.json else _print_status(st)
    elif args.cmd == "stop":
        stopped = fleet.stop(args.which, out=sys.stdout)
        if not stopped:
            print("nothing to stop")
    elif args.cmd == "icount":
        n, proc = devices.icount.run_counted(args.program, args.args, board=args.board, sysroot=args.sysroot)
        sys.stdout.buffer.write(proc.stdout)
        print(f"icount {n}")

