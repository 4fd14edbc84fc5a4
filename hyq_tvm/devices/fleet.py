"""Start, list and stop emulated boards registered with an RPC tracker: Linux boards (TVM RPC servers under
qemu-user in the arm64 rootfs) and MCU boards (hyq_tvm.mcu.server in this machine's Python, which runs firmware
on the board's QEMU machine: no rootfs, no root). State (pids, process groups, ports, keys) lives in a JSON file.

Each process is started in its own session (setsid), so its process group holds it and every
child it forks (the popen worker and the per-session processes); stop kills that group.

TVM RPC has no authentication and a server runs any library a client sends it. So the tracker and the Linux
servers run in the rootfs as an unprivileged user (RPC_USER, through chroot --userspec), and everything listens
on the loopback interface unless the caller passes expose=True (the CLI's --expose) with another host. An MCU
server (and a tracker started for one) runs as the user who starts it, outside any rootfs: start MCU boards as an
unprivileged user (started as root, a warning says so).
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import HyqError
from ..mcu.boards import Board as McuBoard, is_mcu_target, load_board, mcu_boards
from .boards import BOARDS, Board, known_boards
from .rootfs import VENV, build_rootfs, cache_dir, ensure_binfmt, mount_proc, require_root, umount_proc

STATE_FILE = "devices.json"
DEFAULT_TRACKER_PORT = 9190
RPC_USER = "65534:65534"  # nobody:nogroup of the rootfs: no process of the fleet runs as root
SERVER_READY_TIMEOUT = float(os.environ.get("HYQ_TVM_SERVER_TIMEOUT", "240"))


def state_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / STATE_FILE


def load_state(path: Path) -> dict:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return {"tracker": None, "boards": []}


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = p.joinpath("stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(p.name))
    return pids


def alive(pgid: int | None) -> bool:
    """Whether any live process is left in the process group."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(group_members(pgid))


def _reap(pgid: int) -> None:
    try:
        os.waitpid(pgid, os.WNOHANG)  # the leader, if it is our child
    except ChildProcessError:
        pass


def kill_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace` s, wait until none is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            _reap(pgid)
            if not alive(pgid):
                return
            time.sleep(0.1)


def free_port(host: str, start: int | None = None) -> int:
    """start if it is free on host, else any free port."""
    for port in ([start] if start else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise HyqError(f"no free port on {host}")


def parse_addr(addr: str) -> tuple[str, int]:
    """(host, port) of a tracker address HOST:PORT; HyqError unless the port is from 1 to 65535."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise HyqError(f"--tracker {addr!r} is not HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict:
    """The tracker's summary dict; HyqError when it cannot be reached."""
    from tvm import rpc
    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise HyqError(f"RPC tracker {host}:{port} unreachable ({err.strerror or err})") from None
    sock.close()
    try:
        return rpc.connect_tracker(host, port).summary()
    except (OSError, RuntimeError, base.TVMError) as err:  # type: ignore[attr-defined]
        raise HyqError(f"RPC tracker {host}:{port} unreachable or not a TVM tracker ({err})") from None


def tracker_text(host: str, port: int) -> str:
    from tvm import rpc

    return rpc.connect_tracker(host, port).text_summary()


def _spawn(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, close_fds=True)


def _log_tail(log: Path, n: int = 1) -> str:
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    return " | ".join(lines[-n:])[:300]


def rootfs_python(root: Path, args: list[str], env: dict[str, str]) -> list[str]:
    """The command line that runs the rootfs's venv python with `args` as RPC_USER in exactly `env`."""
    return ["chroot", f"--userspec={RPC_USER}", str(root), "env", "-i", *(f"{k}={v}" for k, v in env.items()),
            f"{VENV}/bin/python", *args]


def start_tracker(host: str, cache: Path, root: Path | None, port: int | None = None) -> dict:
    """An RPC tracker on host:port (default: a free port from 9190): in the rootfs (under qemu-user, as RPC_USER),
    or in this machine's Python as the current user when root is None (MCU boards only)."""
    port = free_port(host, port or DEFAULT_TRACKER_PORT)
    log = cache / "logs" / f"tracker-{port}.log"
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    args = ["-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port), "--port-end", str(port + 1)]
    proc = _spawn(rootfs_python(root, args, env) if root else [sys.executable, *args], log)
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HyqError(f"the RPC tracker exited with status {proc.returncode}: {_log_tail(log)} (log {log})")
        try:
            socket.create_connection((host, port), timeout=1).close()
            tracker_summary(host, port)
            return {"host": host, "port": port, "pid": proc.pid, "pgid": proc.pid, "started": True,
                    "log": str(log)}
        except (OSError, HyqError):
            time.sleep(0.3)
    kill_group(proc.pid)
    raise HyqError(f"the RPC tracker did not answer on {host}:{port} within {SERVER_READY_TIMEOUT:.0f} s (log {log})")


def _server_registered(summary: dict, key: str, port: int) -> bool:
    for info in summary.get("server_info", []):
        if info.get("key", "").split(":", 1)[-1] == key and int(info["addr"][1]) == port:
            return True
    return False


def server_command(root: Path, board, host: str, port: int, tracker: tuple[str, int], key: str,
                   icount_out: str | None = None) -> tuple[list[str], dict]:
    """The command line and environment of one RPC server in the rootfs under qemu-user -cpu board.qemu_cpu, as
    RPC_USER, with board.threads TVM runtime threads."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "QEMU_CPU": board.qemu_cpu}
    if board.threads:
        env["TVM_NUM_THREADS"] = str(board.threads)
    args = ["-m", "tvm.exec.rpc_server", "--host", host, "--port", str(port), "--port-end", str(port + 1),
            "--tracker", f"{tracker[0]}:{tracker[1]}", "--key", key]
    return rootfs_python(root, args, dict(env, HYQ_ICOUNT_OUT=icount_out) if icount_out else env), env


def mcu_server_command(board: McuBoard, host: str, port: int, tracker: tuple[str, int], key: str) -> list[str]:
    """The command line of an MCU board's RPC server (hyq_tvm.mcu.server) in this machine's Python."""
    return [sys.executable, "-m", "hyq_tvm.mcu.server", "--board", board.name, "--host", host, "--port", str(port),
            "--tracker", f"{tracker[0]}:{tracker[1]}", "--key", key]


def lookup_board(name: str) -> Board | McuBoard:
    """The Linux board or the MCU board called `name`; a HyqError listing both kinds."""
    if name in BOARDS:
        return BOARDS[name]
    if is_mcu_target(name):
        return load_board(name)
    raise HyqError(f"unknown board {name!r}; known boards: {known_boards()}; MCU boards: {', '.join(mcu_boards())}")


def emulator(board: Board | McuBoard) -> str:
    """The QEMU that stands in for the board, in words."""
    if isinstance(board, McuBoard):
        return f"qemu-system-arm -M {board.qemu_machine}"
    return f"qemu-user -cpu {board.qemu_cpu}"


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address of this machine."""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as err:
        raise HyqError(f"--host {host} is not an address ({err.strerror})") from None
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def start(board_name: str, count: int = 1, tracker: str | None = None, host: str = "127.0.0.1",
          key: str | None = None, cache: Path | None = None, state_file: Path | None = None,
          icount: bool = False, expose: bool = False, out=sys.stderr) -> dict:
    """Start `count` emulated boards under one key (default: the board name); return the new state.
    A Linux board needs root and builds the arm64 rootfs once; an MCU board needs neither.
    A `host` that is not a loopback address needs expose=True."""
    board = lookup_board(board_name)
    mcu = isinstance(board, McuBoard)
    if count < 1:
        raise HyqError(f"--count must be at least 1, not {count}")
    if icount and mcu:
        raise HyqError(f"--icount is for Linux boards: {board.name} (an MCU board) counts the instructions of every "
                       f"run exactly; leave out --icount")
    if not expose and not is_loopback(host):
        raise HyqError(f"--host {host} is not a loopback address: anyone who reaches it could run any code on the "
                       f"boards (TVM RPC has no authentication); pass --expose to do so on a private network")
    cache = cache or cache_dir()
    spath = state_file or state_path(cache)
    key = key or (board.name if mcu else board.key or board.name)
    state = load_state(spath)
    state["boards"] = [b for b in state["boards"] if alive(b.get("pgid"))]  # forget boards that died
    old = state.get("tracker")
    if old and old.get("started") and not alive(old.get("pgid")):
        old = state["tracker"] = None
    # check everything before starting anything
    if tracker:
        thost, tport = parse_addr(tracker)
        if old and state["boards"] and (old["host"], old["port"]) != (thost, tport):
            raise HyqError(f"boards are running with the tracker {old['host']}:{old['port']}; "
                           f"stop them first or leave out --tracker")
        tracker_summary(thost, tport)
    elif old:
        thost, tport = old["host"], old["port"]
        tracker_summary(thost, tport)
    root = None
    if not mcu:
        require_root("starting an emulated board")
        ensure_binfmt()
        root = build_rootfs(cache)
        if icount:
            from .icount import install_in_rootfs
            install_in_rootfs(root, cache)
    # the tracker: given, or ours from the state file if still running, or a new one
    if tracker:
        if not (old and (old["host"], old["port"]) == (thost, tport)):
            state["tracker"] = {"host": thost, "port": tport, "pid": None, "pgid": None, "started": False}
    elif not old:
        t0 = time.monotonic()
        state["tracker"] = start_tracker(host, cache, root)
        thost, tport = state["tracker"]["host"], state["tracker"]["port"]
        print(f"tracker listening on {thost}:{tport} ({time.monotonic() - t0:.1f} s)", file=out, flush=True)
    save_state(spath, state)
    if root:
        mount_proc(root)
    t0 = time.monotonic()
    pending = []
    used = {b["port"] for b in state["boards"] if alive(b.get("pgid"))}
    for i in range(count):
        port = free_port(host, max(used | {9090}) + 1 if used else 9090)
        used.add(port)
        name = f"{board.name}-{port}"
        log = cache / "logs" / f"{name}.log"
        entry = {"name": name, "board": board.name, "key": key, "host": host, "port": port}
        if mcu:
            proc = _spawn(mcu_server_command(board, host, port, (thost, tport), key), log)
            entry.update(kind="mcu", qemu_machine=board.qemu_machine, cpu=board.cpu)
        else:
            ic_out = f"/tmp/hyq-icount/{name}.%p" if icount else None
            proc = _spawn(server_command(root, board, host, port, (thost, tport), key, ic_out)[0], log)
            entry.update(qemu_cpu=board.qemu_cpu, rootfs=str(root), icount=bool(icount))
        entry.update(pid=proc.pid, pgid=proc.pid, log=str(log), started_at=time.time())
        state["boards"].append(entry)
        pending.append((entry, proc))
    save_state(spath, state)
    print(f"starting {count} x {board.name} ({emulator(board)}) under key {key!r} ...", file=out, flush=True)
    _warn_exposure(state["tracker"], host, [e["port"] for e, _ in pending], mcu, out)
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    while pending:
        summary = tracker_summary(thost, tport)
        for entry, proc in list(pending):
            if _server_registered(summary, key, entry["port"]):
                entry["ready_s"] = round(time.monotonic() - t0, 1)
                print(f"  {entry['name']}: RPC server on {host}:{entry['port']} registered as {key!r} "
                      f"after {entry['ready_s']} s", file=out, flush=True)
                pending.remove((entry, proc))
            elif proc.poll() is not None:
                _stop_quietly([e["name"] for e, _ in pending], cache, spath)
                raise HyqError(f"the RPC server {entry['name']} exited with status {proc.returncode}: "
                               f"{_log_tail(Path(entry['log']))} (log {entry['log']})")
        if pending and time.monotonic() > deadline:
            _stop_quietly([e["name"] for e, _ in pending], cache, spath)
            raise HyqError(f"RPC server(s) did not register with the tracker within {SERVER_READY_TIMEOUT:.0f} s "
                           f"(logs in {cache / 'logs'})")
        time.sleep(0.5)
    save_state(spath, state)
    return state


def _warn_exposure(tracker: dict, host: str, ports: list[int], mcu: bool, out) -> None:
    """Warn when servers or our tracker listen beyond loopback, and when an MCU server runs as root."""
    where = "as an unprivileged user in the rootfs" if not mcu else \
        f"as {'root' if os.geteuid() == 0 else 'the user who started them'} on this machine, not in a rootfs"
    listed = ", ".join(map(str, ports))
    exposed = [] if is_loopback(host) else [f"RPC servers on {host} ports {listed}"]
    if tracker["started"] and not is_loopback(tracker["host"]):
        exposed.insert(0, f"the RPC tracker on {tracker['host']}:{tracker['port']}")
    if exposed:
        print(f"warning: exposing {' and '.join(exposed)} without authentication: whoever reaches them can run any "
              f"code on the boards ({where}) and take or feed the tracker's sessions", file=out, flush=True)
    if mcu and os.geteuid() == 0:
        print(f"warning: the MCU RPC server(s) on {host} ports {listed} run as root outside any rootfs: whoever "
              f"reaches them can run code as root (TVM RPC loads any library; the firmware's semihosting reads and "
              f"writes files); start MCU boards as an unprivileged user", file=out, flush=True)


def _stop_quietly(names: list[str], cache: Path, spath: Path) -> None:
    with open(os.devnull, "w") as devnull:
        for name in names:
            stop(name, cache=cache, state_file=spath, out=devnull)


def status(cache: Path | None = None, state_file: Path | None = None) -> dict:
    """The state file's tracker and boards with liveness, plus the tracker's own summary."""
    spath = state_file or state_path(cache)
    state = load_state(spath)
    result = {"state_file": str(spath), "tracker": state.get("tracker"), "boards": [], "tracker_summary": None}
    for b in state.get("boards", []):
        entry = dict(b, alive=alive(b.get("pgid")))
        if b.get("icount"):
            from .icount import server_counts
            entry["icounts"] = server_counts(b)
        result["boards"].append(entry)
    t = state.get("tracker")
    if t:
        t = dict(t, alive=alive(t["pgid"]) if t.get("started") else None)
        result["tracker"] = t
        try:
            tracker_summary(t["host"], t["port"], timeout=2)
            result["tracker_summary"] = tracker_text(t["host"], t["port"])
        except HyqError as err:
            result["tracker_error"] = str(err)
    return result


def stop(which: str | None = None, cache: Path | None = None, state_file: Path | None = None,
         out=sys.stderr) -> list[str]:
    """Kill boards by process group: all (which=None), a board type (rasp4b, stm32h743) or one board (rasp4b-9090).
    The tracker we started goes too once no board is left. Returns what was stopped."""
    cache = cache or cache_dir()
    spath = state_file or state_path(cache)
    state = load_state(spath)
    if which is not None and which != "all":
        matches = [b for b in state["boards"] if which in (b["name"], b["board"], b["key"])]
        if not matches:
            names = [*BOARDS, *mcu_boards()]
            if which not in names and not any(which.startswith(n + "-") for n in names):
                lookup_board(which)  # unknown board: the error lists the known ones
            return []
    else:
        matches = list(state["boards"])
    stopped = []
    for b in matches:
        kill_group(b["pgid"])
        state["boards"].remove(b)
        stopped.append(b["name"])
        print(f"stopped {b['name']} (process group {b['pgid']})", file=out)
        if b.get("icount"):
            from .icount import clear_server_counts, server_counts
            counts = server_counts(b)
            if counts:
                print(f"  instructions per process (pid: count): {counts}", file=out)
            clear_server_counts(b)
    roots = {b["rootfs"] for b in matches if b.get("rootfs")}
    for r in roots:
        if not any(b.get("rootfs") == r and alive(b["pgid"]) for b in state["boards"]):
            umount_proc(Path(r))
    t = state.get("tracker")
    if t and not state["boards"]:
        if t.get("started") and alive(t["pgid"]):
            kill_group(t["pgid"])
            stopped.append(f"tracker {t['host']}:{t['port']}")
            print(f"stopped tracker {t['host']}:{t['port']} (process group {t['pgid']})", file=out)
        state["tracker"] = None
    save_state(spath, state)
    return stopped
