"""Deterministic instruction counts: run an aarch64 program under the dynamic qemu-aarch64 with our
TCG plugin (native/icount.c). QEMU is not cycle accurate; instruction counts are the one number from
emulation that is exact and repeatable (for a single-threaded program with the same inputs).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import HyqError
from ..fileio import sha256_file
from ..resources import data_dir
from .boards import get_board
from .rootfs import VENV, cache_dir, proc_mounted, require_tool

SOURCE = data_dir("native") / "icount.c"
DEFAULT_SYSROOT = "/usr/aarch64-linux-gnu"  # from libc6-arm64-cross (pulled in by gcc-aarch64-linux-gnu)


def build_plugin(cache: Path | None = None, source: Path = SOURCE) -> Path:
    """Compile native/icount.c with gcc -shared -fPIC into the cache (once per source version)."""
    if not source.is_file():
        raise HyqError(f"plugin source {source} not found (it ships with the package: native/ in the repository)")
    digest = sha256_file(source)[:12]
    out = (cache or cache_dir()) / "native" / f"icount-{digest}.so"
    if out.is_file():
        return out
    gcc = require_tool("gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    r = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(source)], capture_output=True, text=True)
    if r.returncode != 0:
        raise HyqError(f"building the QEMU plugin failed: {(r.stderr.strip().splitlines() or [''])[0]}")
    tmp.replace(out)
    return out


def parse_count(text: str, key: str = "icount") -> int:
    """The count on the plugin's "<key> N" line: "icount" (all instructions) or "icount_code"."""
    for line in text.splitlines():
        if line.startswith(f"{key} "):
            return int(line.split()[1])
    raise HyqError(f"the QEMU plugin wrote no {key} line")


def run_counted(program, args=(), board: str = "rasp4b", sysroot: str | Path | None = None,
                cache: Path | None = None, timeout: float | None = 600, **kw) -> tuple[int, subprocess.CompletedProcess]:
    """Run an aarch64 Linux program under `qemu-aarch64 -cpu <board cpu> -plugin icount.so`;
    return (instructions executed, the completed process). sysroot: where its dynamic loader and
    libraries live (default /usr/aarch64-linux-gnu; the board rootfs works too)."""
    qemu = require_tool("qemu-aarch64")  # the dynamic build: qemu-aarch64-static cannot load plugins
    b = get_board(board)
    plugin = build_plugin(cache)
    sysroot = Path(sysroot or DEFAULT_SYSROOT)
    with tempfile.TemporaryDirectory(prefix="hyq-icount-") as tmp:
        out = Path(tmp) / "count"
        cmd = [qemu, "-cpu", b.qemu_cpu, "-L", str(sysroot), "-plugin", f"{plugin},out={out}",
               str(program), *map(str, args)]
        env = dict(os.environ, **kw.pop("env", {}))
        env.pop("QEMU_CPU", None)
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, **kw)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
            raise HyqError(f"{program} exited with status {proc.returncode} under qemu-aarch64: "
                           f"{(err.strip().splitlines() or [''])[-1][:200]}")
        if not out.is_file():
            raise HyqError("the QEMU plugin wrote no instruction count")
        return parse_count(out.read_text()), proc


def count_instructions(program, args=(), board: str = "rasp4b", sysroot=None, cache: Path | None = None) -> int:
    """Executed aarch64 instructions of `program args` on the board's emulated CPU (deterministic)."""
    return run_counted(program, args, board, sysroot, cache)[0]


# --- counting inside the RPC server ---------------------------------------------------------------
# The server runs in the rootfs through binfmt's qemu-aarch64-static, which cannot load plugins. The
# RPC server's real work happens in its popen worker (started as `sys.executable -m
# tvm.exec.popen_worker`) and in the session processes that worker forks. With --icount we copy the
# dynamic qemu-aarch64 and its x86-64 libraries into the rootfs, and a .pth hook (Debian's own
# sitecustomize shadows one in the venv) makes
# sys.executable a wrapper that starts the worker under that qemu with the plugin (fork=reset): each
# session process then writes its own count to /tmp/hyq-icount/<board>.<pid> in the rootfs when it ends:
# all its instructions, and ("icount_code") those in the files named in COUNTED_CODE: the model library a
# benchmark loads and the math library it calls, deterministic while RPC and thread-pool code is not.
# The wrapper also runs a Python program in the rootfs counted (run_python_counted; HYQ_ICOUNT_CODE names
# the counted files instead of COUNTED_CODE).
QEMU_DIR = "/opt/hyq-qemu"
COUNTED_CODE = ("/model.so", "/libm.so.6")
WRAPPER = f"{QEMU_DIR}/python-icount"
HOOK = '''\
# hyq-tvm: with HYQ_ICOUNT_OUT set, start child Pythons (the RPC popen worker) under the dynamic
# qemu-aarch64 with the instruction-counting plugin. Imported by hyq_icount.pth.
import os as _os, sys as _sys
if _os.environ.get("HYQ_ICOUNT_OUT") and not _os.environ.get("HYQ_ICOUNT_CHILD"):
    _os.environ["HYQ_ICOUNT_CHILD"] = "1"
    _sys.executable = "{wrapper}"
'''


def _shared_libs(binary: str) -> list[Path]:
    r = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
    libs = []
    for line in r.stdout.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def _replace(src: Path, dst: Path) -> None:
    """Copy src over dst by renaming a full copy onto it, so that a board running dst keeps its old inode
    (copying into a running executable fails with 'Text file busy')."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def install_in_rootfs(root: Path, cache: Path | None = None) -> None:
    """Copy the dynamic qemu-aarch64 (+ libs), the plugin, a wrapper and the .pth hook into the rootfs."""
    qemu = require_tool("qemu-aarch64")
    plugin = build_plugin(cache)
    d = root / QEMU_DIR.lstrip("/")
    (d / "lib").mkdir(parents=True, exist_ok=True)
    _replace(Path(qemu), d / "qemu-aarch64")
    loader = None
    for lib in _shared_libs(qemu):
        _replace(lib.resolve(), d / "lib" / lib.name)
        if "ld-linux" in lib.name:
            loader = lib.name
    if loader is None:
        raise HyqError("could not find the x86-64 dynamic loader of qemu-aarch64")
    _replace(plugin, d / "icount.so")
    wrapper = root / WRAPPER.lstrip("/")
    script = wrapper.with_name(f".{wrapper.name}.tmp")
    script.write_text(
        "#!/bin/sh\n"
        f'exec {QEMU_DIR}/lib/{loader} --library-path {QEMU_DIR}/lib {QEMU_DIR}/qemu-aarch64 '
        f'-cpu "${{QEMU_CPU:-cortex-a72}}" -plugin "{QEMU_DIR}/icount.so,out=$HYQ_ICOUNT_OUT,fork=reset,'
        f'code=${{HYQ_ICOUNT_CODE:-{":".join(COUNTED_CODE)}}}" '
        f'{VENV}/bin/python "$@"\n')
    script.chmod(0o755)
    os.replace(script, wrapper)
    (root / "tmp" / "hyq-icount").mkdir(parents=True, exist_ok=True)
    (root / "tmp" / "hyq-icount").chmod(0o1777)
    site = next((root / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
    for name, text in (("hyq_icount_hook.py", HOOK.format(wrapper=WRAPPER)),
                       ("hyq_icount.pth", "import hyq_icount_hook\n")):
        tmp = site / f".{name}.tmp"  # replaced whole: a Python starting on a running board reads it meanwhile
        tmp.write_text(text)
        os.replace(tmp, site / name)


def server_counts(board_entry: dict, key: str = "icount") -> dict[int, int]:
    """Instruction counts ("icount": all, "icount_code": in COUNTED_CODE) written so far by an --icount
    board's processes: {pid: count}."""
    d = Path(board_entry["rootfs"]) / "tmp" / "hyq-icount"
    counts = {}
    for f in d.glob(f"{board_entry['name']}.*"):
        try:
            counts[int(f.name.rsplit(".", 1)[1])] = parse_count(f.read_text(), key)
        except (ValueError, HyqError):
            pass
    return counts


def clear_server_counts(board_entry: dict) -> None:
    for f in (Path(board_entry["rootfs"]) / "tmp" / "hyq-icount").glob(f"{board_entry['name']}.*"):
        f.unlink(missing_ok=True)


def run_python_counted(root: Path, board: str, args, code, env: dict | None = None,
                       timeout: float = 1800) -> tuple[dict[int, tuple[int, int]], str]:
    """Run `python ARGS` of the rootfs's venv in the rootfs under the counting qemu as the board's CPU (fixed hash
    seed, `env` added); return ({pid: (all instructions, those in files whose path contains one of `code`)} of
    the process and of each process it forked (counted from the fork on), its stdout)."""
    out_dir = root / "tmp" / "hyq-icount"
    tag = f"run-{os.getpid()}-{time.monotonic_ns()}"
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", **(env or {}),
           "QEMU_CPU": get_board(board).qemu_cpu, "HYQ_ICOUNT_OUT": f"/tmp/hyq-icount/{tag}.%p",
           "HYQ_ICOUNT_CHILD": "1", "HYQ_ICOUNT_CODE": ":".join(code)}
    cmd = ["chroot", str(root), "env", "-i", *(f"{k}={v}" for k, v in env.items()), WRAPPER, *map(str, args)]
    try:
        with proc_mounted(root):
            proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
        if proc.returncode != 0:
            raise HyqError(f"python {' '.join(map(str, args))} exited with status {proc.returncode} in the rootfs: "
                           f"{(proc.stderr.decode(errors='replace').strip().splitlines() or [''])[-1][:200]}")
        counts = {int(f.name.rsplit(".", 1)[1]): (parse_count(f.read_text()), parse_count(f.read_text(), "icount_code"))
                  for f in out_dir.glob(f"{tag}.*")}
    except subprocess.TimeoutExpired:
        raise HyqError(f"python {' '.join(map(str, args))} ran longer than {timeout:g} s in the rootfs") from None
    finally:
        for f in out_dir.glob(f"{tag}.*"):
            f.unlink()
    if not counts:
        raise HyqError("the QEMU plugin wrote no instruction count")
    return counts, proc.stdout.decode(errors="replace")
