"""The arm64 Debian bookworm rootfs with Python, the aarch64 TVM runtime and onnxruntime wheels (onnxruntime: the
engine the board benchmark counts against hyq-tvm), built once and cached.

Layout under the cache dir (HYQ_TVM_CACHE, default ~/.cache/hyq-tvm):
  rootfs/bookworm-arm64/   the rootfs (complete when .hyq-rootfs-ready matches the spec below)
  wheels/aarch64-cp311/    aarch64 wheels downloaded on the host with pip
  logs/                    build and server logs
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import HyqError

SUITE = "bookworm"
PYTHON_VERSION = "3.11"  # bookworm's python3
MIRROR_ENV = "HYQ_TVM_DEBIAN_MIRROR"  # overrides the archive taken from this machine's apt sources
DEFAULT_MIRROR = "http://deb.debian.org/debian"
WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "tornado", "psutil", "cloudpickle",
          "numpy", "onnxruntime==1.32.0")
VENV = "/opt/venv"
READY = ".hyq-rootfs-ready"
# Debian package that provides each tool we call.
APT_PACKAGE = {"debootstrap": "debootstrap", "qemu-aarch64-static": "qemu-user-static",
               "qemu-aarch64": "qemu-user", "update-binfmts": "binfmt-support", "chroot": "coreutils",
               "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "gcc": "gcc"}


def cache_dir() -> Path:
    return Path(os.environ.get("HYQ_TVM_CACHE") or Path.home() / ".cache" / "hyq-tvm").expanduser()


def rootfs_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "rootfs" / f"{SUITE}-arm64"


def _spec() -> str:
    return hashlib.sha256(json.dumps([SUITE, PYTHON_VERSION, WHEELS, VENV]).encode()).hexdigest()[:16]


def _one_line_sources(text: str) -> list[tuple[list[str], list[str], list[str]]]:
    """(types, URIs, suites) of each entry of a sources.list file: `deb [options] URI SUITE COMPONENTS...`."""
    entries = []
    for line in text.splitlines():
        m = re.match(r"\s*(deb|deb-src)\s+(?:\[[^\]]*\]\s*)?(\S+)\s+(\S+)", line.split("#", 1)[0])
        if m:
            entries.append(([m[1]], [m[2]], [m[3]]))
    return entries


def _deb822_sources(text: str) -> list[tuple[list[str], list[str], list[str]]]:
    """(types, URIs, suites) of each enabled stanza of a deb822 .sources file."""
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields, name = {}, None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and name:  # a continuation line
                fields[name] += " " + line.strip()
            elif ":" in line:
                name, value = line.split(":", 1)
                name = name.strip().lower()
                fields[name] = value.strip()
        if fields.get("enabled", "yes").lower() != "no":
            entries.append(tuple(fields.get(k, "").split() for k in ("types", "uris", "suites")))
    return entries


def apt_mirror(etc: Path = Path("/etc/apt")) -> str | None:
    """The Debian archive this machine's apt sources use: the first deb entry for SUITE, else the first whose URI
    ends in /debian; None if there is none. Read as apt does: sources.list, then sources.list.d/*.list and
    *.sources in name order."""
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*"))]
    entries = []
    for f in files:
        if f.is_file() and f.suffix in (".list", ".sources"):
            text = f.read_text(errors="replace")
            entries += _deb822_sources(text) if f.suffix == ".sources" else _one_line_sources(text)
    uris = [(uri.rstrip("/"), suites) for types, found, suites in entries if "deb" in types for uri in found
            if uri.split(":", 1)[0] in ("http", "https", "ftp", "file")]
    return next((u for u, suites in uris if SUITE in suites), None) or \
        next((u for u, _ in uris if u.endswith("/debian")), None)


def debian_mirror() -> str:
    """The archive debootstrap fetches from: $HYQ_TVM_DEBIAN_MIRROR, else this machine's (apt_mirror), else
    deb.debian.org."""
    return os.environ.get(MIRROR_ENV) or apt_mirror() or DEFAULT_MIRROR


def rootfs_ready(cache: Path | None = None) -> bool:
    stamp = rootfs_dir(cache) / READY
    return stamp.is_file() and stamp.read_text().strip() == _spec()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HyqError(f"{name} not found: install the Debian package {APT_PACKAGE.get(name, name)} "
                       f"(apt-get install {APT_PACKAGE.get(name, name)}, or run scripts/setup.sh)")
    return path


def ensure_binfmt() -> None:
    """Make the kernel run aarch64 ELF files through qemu-aarch64-static (needed inside the chroot)."""
    require_tool("qemu-aarch64-static")
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if entry.is_file() and entry.read_text().startswith("enabled"):
        return
    if os.geteuid() != 0:
        raise HyqError("aarch64 binaries are not registered with binfmt_misc; as root run: "
                       "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-aarch64")
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"],
                       capture_output=True)
    require_tool("update-binfmts")
    subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not (entry.is_file() and entry.read_text().startswith("enabled")):
        raise HyqError("could not register qemu-aarch64 with binfmt_misc "
                       "(mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-aarch64)")


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HyqError(f"{what} needs root (debootstrap and chroot); run it as root")


class _Progress:
    def __init__(self, total: int, out=sys.stderr):
        self.t0, self.total, self.step, self.out = time.monotonic(), total, 0, out

    def __call__(self, msg: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total} {time.monotonic() - self.t0:5.0f}s] {msg}", file=self.out, flush=True)


def _run(cmd, log: Path, what: str, heartbeat: float = 30.0, **kw) -> None:
    """Run cmd with its output appended to log; every `heartbeat` s print the log's last line."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **kw)
        t0 = last = time.monotonic()
        while proc.poll() is None:
            time.sleep(0.5)
            if time.monotonic() - last >= heartbeat:
                last = time.monotonic()
                tail = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
                print(f"      ... {last - t0:4.0f}s {tail[:100]}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise HyqError(f"{what} failed (exit {proc.returncode}): {tail[0][:200]} (full log: {log})")


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def mount_proc(root: Path) -> None:
    proc = root / "proc"
    if not is_mounted(proc):
        subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True, capture_output=True)


def umount_proc(root: Path) -> None:
    proc = root / "proc"
    if is_mounted(proc):
        subprocess.run(["umount", "-l", str(proc)], capture_output=True)


@contextlib.contextmanager
def proc_mounted(root: Path):
    """/proc mounted in the rootfs for the block; unmounted after it unless it was mounted before."""
    before = is_mounted(root / "proc")
    mount_proc(root)
    try:
        yield
    finally:
        if not before:
            umount_proc(root)


def download_wheels(cache: Path, log: Path) -> Path:
    """aarch64 cp311 wheels for WHEELS, downloaded on the host (cached; pip skips files it has)."""
    dest = cache / "wheels" / f"aarch64-cp{PYTHON_VERSION.replace('.', '')}"
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + PYTHON_VERSION.replace(".", "")
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
          "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
          "--platform", "manylinux_2_17_aarch64", "--python-version", PYTHON_VERSION, "--implementation", "cp",
          "--abi", abi, "--abi", "abi3", "--abi", "none", *WHEELS, "-d", dest], log, "pip download of aarch64 wheels")
    return dest


def build_rootfs(cache: Path | None = None, force: bool = False, progress=None) -> Path:
    """Build (once) the arm64 rootfs with a venv holding the aarch64 TVM runtime; return its path."""
    cache = cache or cache_dir()
    root = rootfs_dir(cache)
    if rootfs_ready(cache) and not force:
        return root
    require_root("building the arm64 rootfs")
    require_tool("debootstrap")
    require_tool("chroot")
    ensure_binfmt()
    progress = progress or _Progress(5)
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "rootfs-build.log"
    log.write_text("")
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        umount_proc(partial)
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    mirror = debian_mirror()
    progress(f"debootstrap {SUITE} arm64 minbase (python3, python3-venv) from {mirror} (2-4 min; log {log})")
    _run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv",
          SUITE, partial, mirror], log, "debootstrap")
    progress("pip download of the aarch64 wheels: " + " ".join(WHEELS))
    wheels = download_wheels(cache, log)
    progress(f"python3 -m venv {VENV} inside the rootfs, pip install from the downloaded wheels (about 1 min)")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    shutil.copytree(wheels, partial / "tmp" / "wheels")
    mount_proc(partial)
    try:
        _run(["chroot", partial, "python3", "-m", "venv", VENV], log, "venv creation in the rootfs", env=env)
        _run(["chroot", partial, f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--no-index",
              "--find-links", "/tmp/wheels", *WHEELS], log, "pip install in the rootfs", env=env)
        progress("check: import tvm and onnxruntime inside the rootfs")
        _run(["chroot", partial, f"{VENV}/bin/python", "-c",
              "import tvm, tvm.rpc, tornado, psutil, cloudpickle, numpy, onnxruntime; "
              "print('tvm', tvm.__version__, 'onnxruntime', onnxruntime.__version__)"],
             log, "import tvm and onnxruntime in the rootfs", env=env)
    finally:
        umount_proc(partial)
        shutil.rmtree(partial / "tmp" / "wheels", ignore_errors=True)
    for d in ("var/cache/apt/archives",):
        for p in (partial / d).glob("*.deb"):
            p.unlink()
    (partial / READY).write_text(_spec() + "\n")
    if root.exists():
        umount_proc(root)
        shutil.rmtree(root)
    partial.rename(root)
    progress(f"rootfs ready at {root} ({time.monotonic() - t0:.0f} s)")
    return root
