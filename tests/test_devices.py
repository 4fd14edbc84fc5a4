"""Emulated ARM boards (hyq_tvm.devices): the board table, CLI errors, instruction counting and a real
TVM RPC round trip to an aarch64 RPC server running under qemu-user -cpu cortex-a72.

The qemu tests need root (chroot, binfmt) and the Debian packages scripts/setup.sh installs; the first
run builds the arm64 rootfs into the cache (HYQ_TVM_CACHE, default ~/.cache/hyq-tvm; a few minutes).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hyq_tvm.devices import BOARDS, get_board
from hyq_tvm.devices import fleet, icount, rootfs
from hyq_tvm.errors import HyqError

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hyq_tvm.device", *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, **(env or {})), timeout=600)


def need_tools(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {rootfs.APT_PACKAGE.get(tool, tool)}; "
                        "run scripts/setup.sh as root)")


def need_root():
    if os.geteuid() != 0:
        pytest.skip("emulated boards need root (debootstrap, chroot, binfmt_misc)")


def test_board_table():
    assert {b: BOARDS[b].qemu_cpu for b in BOARDS} == {
        "rasp4b": "cortex-a72", "rasp3b": "cortex-a53", "jetson-nano": "cortex-a57", "rk3399": "cortex-a72",
        "rasp5": "cortex-a76"}
    assert get_board("rasp4b").target() == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                                             "mattr": ["+neon"], "num-cores": 4}


def test_unknown_board(tmp_path):
    r = cli("start", "rasp9", env={"HYQ_TVM_CACHE": str(tmp_path)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown board 'rasp9'")
    for name, cpu in (("rasp4b", "cortex-a72"), ("rasp3b", "cortex-a53"), ("jetson-nano", "cortex-a57"),
                      ("rk3399", "cortex-a72")):
        assert f"{name} (-cpu {cpu})" in lines[0]


def test_tracker_unreachable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    r = cli("start", "rasp4b", "--tracker", f"127.0.0.1:{port}", env={"HYQ_TVM_CACHE": str(tmp_path)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and f"127.0.0.1:{port}" in lines[0], r.stderr


@pytest.mark.parametrize("addr", ["127.0.0.1", ":9190", "127.0.0.1:x", "127.0.0.1:0", "localhost:65536"])
def test_tracker_address_needs_a_port_from_1_to_65535(addr):
    with pytest.raises(HyqError, match=rf"^--tracker '{addr}' is not HOST:PORT with a port from 1 to 65535$"):
        fleet.parse_addr(addr)
    assert fleet.parse_addr("localhost:65535") == ("localhost", 65535)


def test_missing_qemu_names_the_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(HyqError, match="qemu-user-static"):
        rootfs.require_tool("qemu-aarch64-static")
    with pytest.raises(HyqError, match=r"Debian package qemu-user \("):
        icount.run_counted("/bin/true")


def test_stop_with_nothing_running(tmp_path):
    assert fleet.stop(cache=tmp_path, state_file=tmp_path / "s.json") == []
    with pytest.raises(HyqError, match="unknown board"):
        fleet.stop("rasp9", cache=tmp_path, state_file=tmp_path / "s.json")


def test_boards_listen_on_loopback_unless_exposed(tmp_path):
    assert fleet.is_loopback("127.0.0.1") and fleet.is_loopback("localhost") and fleet.is_loopback("::1")
    assert not fleet.is_loopback("0.0.0.0")
    r = cli("start", "rasp4b", "--host", "0.0.0.0", env={"HYQ_TVM_CACHE": str(tmp_path)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--expose" in lines[0] and "no authentication" in lines[0]


def test_servers_run_unprivileged_with_the_targets_threads():
    for name, threads in (("rasp4b", "4"), ("rk3399", "2")):
        cmd, env = fleet.server_command(Path("/r"), get_board(name), "127.0.0.1", 9090, ("127.0.0.1", 9190), name)
        assert cmd[:3] == ["chroot", f"--userspec={fleet.RPC_USER}", "/r"] and fleet.RPC_USER == "65534:65534"
        assert env["TVM_NUM_THREADS"] == threads and f"TVM_NUM_THREADS={threads}" in cmd


def test_debian_mirror_comes_from_the_apt_sources(tmp_path, monkeypatch):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    assert rootfs.apt_mirror(etc) is None
    (etc / "sources.list.d" / "a.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "# the proxy\nTypes: deb-src deb\nURIs: http://proxy.example:3142/debian/\n"
        "Suites: bookworm-updates\n bookworm\nComponents: main\n")
    (etc / "sources.list.d" / "b.list.disabled").write_text("deb http://ignored.example/debian bookworm main\n")
    assert rootfs.apt_mirror(etc) == "http://proxy.example:3142/debian"
    (etc / "sources.list").write_text("# deb http://commented.example/debian bookworm main\n"
                                      "deb [arch=amd64 signed-by=/k.gpg] http://trixie.example/debian trixie main\n")
    assert rootfs.apt_mirror(etc) == "http://proxy.example:3142/debian"  # the one for bookworm comes first
    (etc / "sources.list.d" / "a.sources").unlink()
    assert rootfs.apt_mirror(etc) == "http://trixie.example/debian"  # else any Debian archive
    monkeypatch.setattr(rootfs, "apt_mirror", lambda: None)
    monkeypatch.delenv(rootfs.MIRROR_ENV, raising=False)
    assert rootfs.debian_mirror() == rootfs.DEFAULT_MIRROR
    monkeypatch.setenv(rootfs.MIRROR_ENV, "http://override.example/debian")
    assert rootfs.debian_mirror() == "http://override.example/debian"


@pytest.mark.slow
def test_instruction_count_is_deterministic(tmp_path):
    need_tools("aarch64-linux-gnu-gcc", "qemu-aarch64", "gcc")
    src = tmp_path / "dot.c"
    src.write_text("#include <stdio.h>\nint main(void){int a[256],b[256];long s=0;"
                   "for(int i=0;i<256;i++){a[i]=i*3-100;b[i]=7-i;}"
                   "for(int r=0;r<100;r++)for(int i=0;i<256;i++)s+=a[i]*b[i];printf(\"%ld\\n\",s);return 0;}\n")
    exe = tmp_path / "dot"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-mcpu=cortex-a72", str(src), "-o", str(exe)], check=True)
    n1, p1 = icount.run_counted(exe)
    n2 = icount.count_instructions(exe)
    assert n1 == n2 > 25600  # at least the 100 x 256 multiply-accumulates
    expected = 100 * sum((i * 3 - 100) * (7 - i) for i in range(256))
    assert p1.stdout.decode().strip() == str(expected)
    r = cli("icount", str(exe))
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == f"icount {n1}"


def _released(host: str, port: int, wait: float = 15.0) -> bool:
    """Whether no socket listens on host:port (from /proc/net/tcp) within `wait` s."""
    local = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    deadline = time.monotonic() + wait
    while True:
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        if not any(r[1] in (local, f"00000000:{port:04X}") and r[3] == "0A" for r in rows):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _uid(pid: int) -> int:
    """The effective user id of a process."""
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("Uid:"))
    return int(line.split()[2])


def _tiny_module(path: Path) -> None:
    import tvm
    from tvm import relax
    from tvm.support import cc

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((4, 8), "int32"))
    b = relax.Var("b", relax.TensorType((8, 3), "int32"))
    c = relax.Var("c", relax.TensorType((4, 3), "int32"))
    with bb.function("main", [a, b, c]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(relax.op.matmul(a, b), c))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=tvm.target.Target(get_board("rasp4b").target()))
    ex.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))


def _float_islands():
    """A module of the float islands of a partial-mode graph, one function each (LayerNorm, GELU, SiLU,
    softmax, dequantize -> SiLU -> quantize), and an input on which x86-64 and aarch64 differ unless
    compiled portably."""
    from tvm import relax

    shape = (4, 64, 96)
    rng = np.random.default_rng(1)
    gamma, beta = (relax.const(rng.standard_normal(96).astype("float32")) for _ in range(2))
    islands = {
        "layer_norm": lambda x: relax.op.nn.layer_norm(x, gamma, beta, axes=[-1]),
        "gelu": relax.op.nn.gelu,
        "silu": relax.op.nn.silu,
        "softmax": lambda x: relax.op.nn.softmax(x, axis=-1),
        "quantize": lambda x: relax.op.quantize(
            relax.op.nn.silu(relax.op.add(relax.op.multiply(x, relax.const(0.0137, "float32")), beta)),
            relax.const(0.021, "float32"), relax.const(3, "int8"), out_dtype="int8"),
    }
    bb = relax.BlockBuilder()
    for name, island in islands.items():
        x = relax.Var("x", relax.TensorType(shape, "float32"))
        with bb.function(name, [x]):
            with bb.dataflow():
                out = bb.emit_output(island(x))
            bb.emit_func_output(out)
    return bb.get(), list(islands), (rng.standard_normal(shape) * 4).astype("float32")


@pytest.mark.slow
@pytest.mark.parametrize("board_name", ["rasp4b", "rasp5"])
def test_rpc_round_trip_on_emulated_board(tmp_path, board_name):
    need_tools("qemu-aarch64-static", "debootstrap", "update-binfmts", "aarch64-linux-gnu-g++")
    need_root()
    import tvm
    from tvm import relax, rpc
    from tvm.support import cc

    from hyq_tvm.relax.pipeline import build
    from hyq_tvm.targets import load_target

    state_file = tmp_path / "devices.json"  # private state: leaves boards started by hand alone
    state = fleet.start(board_name, count=1, state_file=state_file)
    try:
        t, (board,) = state["tracker"], state["boards"]
        assert board["key"] == board_name and board["host"] == "127.0.0.1"
        assert board["qemu_cpu"] == get_board(board_name).qemu_cpu
        st = fleet.status(state_file=state_file)
        assert st["boards"][0]["alive"] and board_name in st["tracker_summary"]
        for pgid in (board["pgid"], t["pgid"]):  # tracker and server: every process runs as nobody
            assert {_uid(pid) for pid in fleet.group_members(pgid)} == {65534}
        lib = tmp_path / "tiny.so"
        _tiny_module(lib)
        remote = rpc.connect_tracker(t["host"], t["port"]).request(board_name, session_timeout=300)
        threads = get_board(board_name).threads  # [rpc] threads; TVM runs at most one thread per core
        assert f"TVM_NUM_THREADS={threads}".encode() in Path(f"/proc/{board['pid']}/environ").read_bytes().split(b"\0")
        assert remote.get_function("runtime.NumThreads")() == min(threads, len(os.sched_getaffinity(0)))
        remote.upload(str(lib))
        vm = relax.VirtualMachine(remote.load_module("tiny.so"), remote.cpu())
        rng = np.random.default_rng(0)
        a = rng.integers(-1000, 1000, (4, 8), dtype=np.int32)
        b = rng.integers(-1000, 1000, (8, 3), dtype=np.int32)
        c = rng.integers(-1000, 1000, (4, 3), dtype=np.int32)
        out = vm["main"](*(tvm.runtime.tensor(x, remote.cpu()) for x in (a, b, c)))
        np.testing.assert_array_equal(out.numpy(), a @ b + c)
        # float islands compiled portably give the host's bits on the board
        mod, names, x = _float_islands()
        build(mod, tvm.target.Target(get_board(board_name).target())).export_library(
            str(tmp_path / "islands.so"), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
        remote.upload(str(tmp_path / "islands.so"))
        board_vm = relax.VirtualMachine(remote.load_module("islands.so"), remote.cpu())
        host_vm = relax.VirtualMachine(build(mod, load_target("host").tvm_target()), tvm.cpu())
        for name in names:
            got = board_vm[name](tvm.runtime.tensor(x, remote.cpu())).numpy()
            want = host_vm[name](tvm.runtime.tensor(x)).numpy()
            assert got.tobytes() == want.tobytes(), f"{name}: board and host differ"
        del vm, out, board_vm, remote
    finally:
        stopped = fleet.stop(cache=None, state_file=state_file)
    assert board["name"] in stopped and any(s.startswith("tracker") for s in stopped)
    assert not fleet.alive(board["pgid"]) and not fleet.alive(t["pgid"])
    assert fleet.group_members(board["pgid"]) == [] and fleet.group_members(t["pgid"]) == []
    assert _released(t["host"], t["port"]), f"something still listens on {t['host']}:{t['port']}"
    assert fleet.load_state(state_file) == {"tracker": None, "boards": []}


@pytest.mark.slow
def test_rpc_server_instruction_counts(tmp_path):
    """--icount: the RPC popen worker runs under the dynamic qemu-aarch64 with the plugin, and each
    session process writes its own instruction count when the session ends."""
    need_tools("qemu-aarch64", "qemu-aarch64-static", "debootstrap", "update-binfmts", "aarch64-linux-gnu-g++",
               "gcc")
    need_root()
    import tvm
    from tvm import relax, rpc

    state_file = tmp_path / "devices.json"
    state = fleet.start("rasp4b", count=1, state_file=state_file, icount=True)
    try:
        t, (board,) = state["tracker"], state["boards"]
        lib = tmp_path / "tiny.so"
        _tiny_module(lib)
        remote = rpc.connect_tracker(t["host"], t["port"]).request("rasp4b", session_timeout=300)
        remote.upload(str(lib), "model.so")  # the name whose code icount_code counts
        vm = relax.VirtualMachine(remote.load_module("model.so"), remote.cpu())
        a, b, c = np.ones((4, 8), "int32"), np.full((8, 3), 2, "int32"), np.arange(12, dtype="int32").reshape(4, 3)
        out = vm["main"](*(tvm.runtime.tensor(x, remote.cpu()) for x in (a, b, c))).numpy()
        np.testing.assert_array_equal(out, a @ b + c)
        del vm, remote  # ends the session: its process exits and writes its count
        deadline = time.monotonic() + 60
        while not icount.server_counts(board) and time.monotonic() < deadline:
            time.sleep(0.5)
        counts = icount.server_counts(board)
        assert len(counts) == 1 and list(counts.values())[0] > 100_000
        (code,) = icount.server_counts(board, "icount_code").values()
        assert 0 < code < list(counts.values())[0] / 100  # the module's own code: a small part of the session
    finally:
        fleet.stop(state_file=state_file)
    assert icount.server_counts(board) == {}


@pytest.mark.slow
def test_board_cpu_is_enforced_in_the_rootfs(tmp_path):
    """The rootfs runs programs as the board's CPU: dotprod (ARMv8.2) is an illegal instruction on a
    Cortex-A72 (rasp4b), as on the real chip, and runs under qemu's default `max` CPU."""
    need_tools("aarch64-linux-gnu-gcc", "qemu-aarch64-static", "debootstrap", "update-binfmts")
    need_root()
    import resource

    src = tmp_path / "sdot.c"
    src.write_text("#include <arm_neon.h>\n#include <stdio.h>\nint main(void){int32x4_t acc=vdupq_n_s32(0);"
                   "acc=vdotq_s32(acc,vdupq_n_s8(2),vdupq_n_s8(3));printf(\"%d\\n\",vgetq_lane_s32(acc,0));return 0;}\n")
    root = rootfs.build_rootfs()
    exe = root / "tmp" / f"hyq-sdot-{os.getpid()}"
    subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-march=armv8.2-a+dotprod", "-static", str(src), "-o", str(exe)],
                   check=True)
    try:
        def run(cpu=None):  # with the RPC server's environment (QEMU_CPU from the board table)
            _, env = fleet.server_command(root, get_board("rasp4b"), "127.0.0.1", 9090, ("127.0.0.1", 9190), "k")
            env = dict(env, QEMU_CPU=cpu or env["QEMU_CPU"])
            return subprocess.run(["chroot", str(root), "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                                   f"/tmp/{exe.name}"], capture_output=True, text=True, timeout=120,
                                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
        a72 = run()
        assert a72.returncode in (-4, 132), a72  # SIGILL
        assert run("max").stdout.strip() == "24"
    finally:
        exe.unlink(missing_ok=True)


def _one_input_models(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """relu(x @ w), x 1x64, w 64x32: as model.so for rasp4b and as an ONNX model; and an input."""
    import onnx
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax
    from tvm.support import cc

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, relax.const(w))))
        bb.emit_func_output(out)
    lib = tmp_path / "model.so"
    tvm.compile(bb.get(), target=tvm.target.Target(get_board("rasp4b").target())).export_library(
        str(lib), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    nodes = [helper.make_node("MatMul", ["input", "w"], ["y"]), helper.make_node("Relu", ["y"], ["out"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(w, "w")])
    model = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    return lib, model, rng.standard_normal((1, 64)).astype("float32")


@pytest.mark.slow
def test_engine_instruction_counts_are_repeatable(tmp_path):
    """hyq-tvm's model.so and onnxruntime, each in the rootfs under the counting qemu: the same files count the
    same per inference again; the engine's own code is a part of the engine with its system libraries, which is a
    part of the process."""
    need_tools("qemu-aarch64", "qemu-aarch64-static", "debootstrap", "update-binfmts", "aarch64-linux-gnu-g++",
               "gcc")
    need_root()
    from hyq_tvm.devices import engines

    lib, model, x = _one_input_models(tmp_path)
    for engine, path in (("tvm", lib), ("ort", model)):
        first = engines.engine_instructions(engine, path, x, "rasp4b", engines.NATIVE[engine])
        assert engines.engine_instructions(engine, path, x, "rasp4b", engines.NATIVE[engine]) == first, engine
        own = engines.engine_instructions(engine, path, x, "rasp4b", engines.OWN[engine])["code"]
        assert 64 * 32 / 16 < own["instructions"] < first["code"]["instructions"] < first["process"]["instructions"]
        assert own["exact"] and first["counts"]["runs"] == [2, 10, 2, 10]
    assert first["kernels"] == {"MatMul": 1, "Relu": 1}
