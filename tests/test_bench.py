"""python -m hyq_tvm.bench: board targets as data, cross-compiled artifacts, and a device benchmark through
the RPC tracker against an emulated rasp4b (qemu-user -cpu cortex-a72).

The end-to-end test needs root, qemu-user(-static), debootstrap, binfmt-support and g++-aarch64-linux-gnu
(scripts/setup.sh) and builds the arm64 rootfs into the cache on first use (a few minutes).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyq_tvm.devices import bench
from hyq_tvm.devices import BOARDS, fleet
from hyq_tvm.errors import HyqError
from hyq_tvm.fileio import sha256_file
from hyq_tvm.targets import elf_arch, emulated_targets, host_arch, load_target

ROOT = Path(__file__).resolve().parents[1]
BOARD_TARGETS = {"rasp4b": "cortex-a72", "rasp3b": "cortex-a53", "jetson-nano": "cortex-a57", "rk3399": "cortex-a72",
                 "rasp5": "cortex-a76"}


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "hyq_tvm.bench", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_host_artifact(path: Path) -> Path:
    """An artifact folder whose model.so is an x86-64 (host) ELF: enough for the checks before any upload."""
    path.mkdir()
    shutil.copy("/bin/true", path / "model.so")
    (path / "plan.json").write_text(json.dumps({"model": {"name": "fake", "img_size": 8, "mean": [0] * 3,
                                                          "std": [1] * 3}}))
    (path / "metadata.json").write_text(json.dumps({"model": "fake", "files": {"library": "model.so",
                                                                               "plan": "plan.json"}}))
    return path


def test_board_targets_are_data():
    assert {s.name: s.qemu_cpu for s in emulated_targets()} == BOARD_TARGETS
    for name, cpu in BOARD_TARGETS.items():
        spec = load_target(name)
        assert spec.llvm["mcpu"] == cpu and spec.llvm["mtriple"] == "aarch64-linux-gnu" and "+neon" in spec.llvm["mattr"]
        assert spec.cross_compiler == "aarch64-linux-gnu-g++" and spec.arch == "aarch64" and spec.rpc_key == name
        assert spec.threads == spec.llvm["num-cores"] == (2 if name == "rk3399" else 4)
        assert BOARDS[name].target() == {k: spec.llvm[k] for k in ("kind", "mtriple", "mcpu", "mattr", "num-cores")}
        assert spec.tvm_target().attrs["mtriple"] == "aarch64-linux-gnu"
    host = load_target("host")
    assert host.is_host and host.fcompile() is None and host.arch == host_arch() and host.qemu_cpu is None


def test_unknown_target_lists_the_board_targets():
    with pytest.raises(HyqError, match=r"unknown target 'rasp9'; known targets: host, jetson-nano, rasp3b, rasp4b, rasp5, rk3399"):
        load_target("rasp9")


def test_tracker_unreachable_is_one_line(tmp_path):
    port = closed_port()
    r = cli("--tracker", f"127.0.0.1:{port}", "--key", "nosuchboard", "--artifact", fake_host_artifact(tmp_path / "a"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: RPC tracker 127.0.0.1:") and "unreachable" in lines[0]


def test_architecture_mismatch_is_refused_before_upload(tmp_path, monkeypatch):
    def no_session(*a, **k):
        raise AssertionError("asked the tracker for a session")
    monkeypatch.setattr(bench, "request_session", no_session)
    monkeypatch.setattr(bench, "check_tracker", no_session)
    art = fake_host_artifact(tmp_path / "a")
    with pytest.raises(HyqError, match=rf"built for {host_arch()} \(model.so\) but key 'rasp4b' is aarch64: not uploaded"):
        bench.bench(f"127.0.0.1:{closed_port()}", "rasp4b", art, limit=1, reports=tmp_path / "r",
                    state_file=tmp_path / "s.json")
    assert not (tmp_path / "r").exists()


def test_limit_must_be_positive(tmp_path):
    with pytest.raises(HyqError, match=r"^--limit must be at least 1, got 0$"):
        bench.bench(f"127.0.0.1:{closed_port()}", "nosuchboard", fake_host_artifact(tmp_path / "a"), limit=0,
                    reports=tmp_path / "r", state_file=tmp_path / "s.json")


def test_lost_session_is_told_by_type():
    """A killed RPC server's session fails with TVM's InternalError (its socket) and counts as lost; an error raised
    on the device arrives as RPCError and does not."""
    from tvm import rpc

    port = closed_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        sess = rpc.connect("127.0.0.1", port, session_timeout=0)
        with pytest.raises(Exception) as on_device:
            sess.load_module("missing.so")
        workpath = sess.get_function("tvm.rpc.server.workpath")
        workpath("x")
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its session process
        server.wait()
    with pytest.raises(Exception) as lost:
        workpath("x")
    assert not bench.lost_session(on_device.value) and bench.lost_session(lost.value)
    assert not bench.lost_session(FileNotFoundError("x")) and bench.lost_session(ConnectionResetError())


def test_a_lost_session_is_called_again_in_a_new_one(monkeypatch):
    """Remote.call reconnects after a lost session and calls again, MAX_RECONNECTS times in all; other errors pass."""
    from tvm.error import InternalError, RPCError

    logs = []
    remote = bench.Remote(("127.0.0.1", 9), "rasp4b", None, 1.0, None, logs.append)
    monkeypatch.setattr(remote, "connect", lambda: setattr(remote, "vm", object()))
    errors = iter([InternalError("Socket SockChannel::Send Error:Broken pipe"), TimeoutError("read timed out")])

    def flaky():
        err = next(errors, None)
        if err is not None:
            raise err
        return 42

    assert remote.call("latency", flaky) == 42 and remote.lost == 2
    assert logs == ["latency: RPC session lost (InternalError: Socket SockChannel::Send Error:Broken pipe); "
                    "reconnecting", "latency: RPC session lost (TimeoutError: read timed out); reconnecting"]

    def device_error():
        raise RPCError("Error caught from RPC call")

    with pytest.raises(RPCError):
        remote.call("image 3", device_error)
    assert remote.lost == 2

    def lost():
        raise ConnectionResetError("reset by peer")

    with pytest.raises(HyqError, match=r"^the RPC session for 'rasp4b' was lost 4 times; last: ConnectionResetError: "
                                       r"reset by peer$"):
        remote.call("instruction count", lost, session=False)
    assert remote.vm is None


def test_no_free_device_times_out(tmp_path):
    from tvm.rpc.tracker import Tracker

    port = closed_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 1, silent=True)  # TVM's own, in a worker process
    try:
        r = cli("--tracker", f"127.0.0.1:{tracker.port}", "--key", "nosuchboard", "--timeout", "3",
                "--artifact", fake_host_artifact(tmp_path / "a"), "--reports", tmp_path / "r",
                "--devices-state", tmp_path / "s.json")
    finally:
        tracker.terminate()
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "no free device with key 'nosuchboard'" in lines[0] and "within 3 s" in lines[0]


# --- end to end on the emulated rasp4b ---------------------------------------------------------------------
def _need_emulation():
    for tool in ("qemu-aarch64-static", "debootstrap", "update-binfmts", "aarch64-linux-gnu-g++"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup.sh)")
    if os.geteuid() != 0:
        pytest.skip("emulated boards need root (chroot, binfmt_misc)")


def _minmax_rasp4b_artifact(tmp_path_factory, bits: int) -> Path:
    """mobilevit_xxs proxy, MinMax WbitsAbits plan from 8 images, compiled for rasp4b."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (scripts/setup.sh)")
    import torch

    from hyq_tvm.quant.calibrate import calibrate
    from hyq_tvm.build import compile_plan

    torch.set_num_threads(1)
    torch.manual_seed(0)
    plan = calibrate("mobilevit_xxs", method="minmax", wbits=bits, abits=bits, images=8, progress=False)[0]
    return compile_plan(plan, "rasp4b", tmp_path_factory.mktemp("artifact") / f"mobilevit_xxs-w{bits}a{bits}-rasp4b")


@pytest.fixture(scope="module")
def rasp4b_artifact(tmp_path_factory):
    return _minmax_rasp4b_artifact(tmp_path_factory, 8)


@pytest.fixture(scope="module")
def rasp4b_w6a6_artifact(tmp_path_factory):
    """Another model.so for the same key: the W6A6 plan."""
    return _minmax_rasp4b_artifact(tmp_path_factory, 6)


@pytest.fixture(scope="module")
def rasp4b_fleet(tmp_path_factory):
    """A second private fleet (own state file and tracker) for the tests that need two boards; stopped at the end."""
    _need_emulation()
    state_file = tmp_path_factory.mktemp("fleet2") / "devices.json"
    try:
        yield state_file
    finally:
        fleet.stop(state_file=state_file)
        assert fleet.load_state(state_file)["boards"] == []


@pytest.fixture
def rasp4b_pair(rasp4b_fleet):
    """Two live emulated rasp4b under key rasp4b in rasp4b_fleet, starting what is missing (a test may kill one)."""
    alive = [b for b in fleet.load_state(rasp4b_fleet)["boards"] if fleet.alive(b["pgid"])]
    if len(alive) < 2:
        fleet.start("rasp4b", count=2 - len(alive), state_file=rasp4b_fleet)
    state = fleet.load_state(rasp4b_fleet)
    state["boards"] = [b for b in state["boards"] if fleet.alive(b["pgid"])]
    assert len(state["boards"]) == 2
    return state, rasp4b_fleet


def bench_popen(state_file: Path, artifact: Path, reports: Path, *args) -> tuple[subprocess.Popen, Path]:
    """python -m hyq_tvm.bench in the background against the fleet of state_file; (process, its stderr log)."""
    t = fleet.load_state(state_file)["tracker"]
    reports.mkdir(parents=True)
    log = reports / "bench.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "hyq_tvm.bench", "--tracker", f"{t['host']}:{t['port']}",
                                 "--key", "rasp4b", "--artifact", str(artifact), "--reports", str(reports),
                                 "--devices-state", str(state_file), *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=f, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    """Wait for a bench_popen process; its report row."""
    try:
        rc = proc.wait(timeout)
    finally:
        proc.kill()
    assert rc == 0, log.read_text()
    (row,) = json.loads((log.parent / "device_rasp4b.json").read_text())["rows"]
    return row


def still_running(proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """Fail (killing the bench) once it has exited or the deadline has passed."""
    if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f"the bench exited or timed out:\n{log.read_text()}")


def logged(pattern: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[str, ...]:
    """The groups of the first match of `pattern` in a running bench's log, once it is there."""
    deadline = time.monotonic() + timeout
    while (m := re.search(pattern, log.read_text())) is None:
        still_running(proc, log, deadline)
        time.sleep(0.05)
    return m.groups()


def crash(state: dict, name: str, proc: subprocess.Popen) -> None:
    """Kill board `name` like a crash: SIGKILL to its whole process group (qemu, the RPC server, its session)."""
    try:
        board = next(b for b in state["boards"] if b["name"] == name)
        os.killpg(board["pgid"], signal.SIGKILL)
        fleet.kill_group(board["pgid"])  # reaps the group's leader, our child
        assert not fleet.alive(board["pgid"])
    except BaseException:
        proc.kill()
        raise


def session_dirs(state: dict, library: str) -> set[Path]:
    """The files named `library` in the session folders of the boards' rootfs (a killed session leaves its folder)."""
    return set((Path(state["boards"][0]["rootfs"]) / "tmp").glob(f"tmp*/{library}"))


def finished_images(reports: Path, n: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> list[int]:
    """The image indices in a running bench's work file, once it holds at least n."""
    deadline = time.monotonic() + timeout
    while True:
        for work in (reports / ".work").glob("*.jsonl"):
            done = [json.loads(line)["i"] for line in work.read_text().splitlines()[1:]]
            if len(done) >= n:
                return done
        still_running(proc, log, deadline)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def emulated_rasp4b(tmp_path_factory):
    """A private fleet (own state file): one emulated rasp4b behind its own tracker; stopped at the end."""
    _need_emulation()
    state_file = tmp_path_factory.mktemp("fleet") / "devices.json"
    try:
        state = fleet.start("rasp4b", count=1, state_file=state_file)
        yield state, state_file
    finally:
        fleet.stop(state_file=state_file)
        assert fleet.load_state(state_file)["boards"] == []


@pytest.mark.slow
def test_cross_compiled_artifact(rasp4b_artifact):
    meta = json.loads((rasp4b_artifact / "metadata.json").read_text())
    assert meta["target"]["name"] == "rasp4b" and meta["target"]["triple"] == "aarch64-linux-gnu"
    assert meta["target"]["arch"] == "aarch64" and meta["target"]["mcpu"] == "cortex-a72"
    assert elf_arch(rasp4b_artifact / "model.so") == "aarch64"
    assert elf_arch(rasp4b_artifact / meta["files"]["host_library"]) == host_arch()


@pytest.mark.slow
def test_bench_end_to_end_on_emulated_rasp4b(rasp4b_artifact, emulated_rasp4b, tmp_path):
    state, state_file = emulated_rasp4b
    t = state["tracker"]
    r = cli("--tracker", f"{t['host']}:{t['port']}", "--key", "rasp4b", "--artifact", rasp4b_artifact,
            "--limit", 8, "--repeat", 3, "--reports", tmp_path, "--devices-state", state_file)
    assert r.returncode == 0, r.stderr
    assert "EMULATED" in r.stdout and " on 8 test images;" in r.stdout
    (row,) = json.loads((tmp_path / "device_rasp4b.json").read_text())["rows"]
    assert row["bitexact"] is True and row["bitexact_images"] == row["images"] == 8 and row["max_abs_diff"] == 0
    assert row["top1"] == row["top1_host"]
    assert row["emulated"] is True and row["board"] == state["boards"][0]["name"] and row["qemu_cpu"] == "cortex-a72"
    assert row["runs"] == 3 and 0 < row["latency_ms_median"] <= row["latency_ms_p90"]
    assert row["instructions"] is None and "--icount" in row["instructions_note"]
    md = (tmp_path / "device_rasp4b.md").read_text()
    assert "EMULATED" in md and "| mobilevit_xxs |" in md
    assert not list((tmp_path / ".work").glob("*.jsonl"))  # the work file goes once the report is written


@pytest.mark.slow
def test_two_boards_serve_two_benchmarks_at_once(rasp4b_artifact, rasp4b_w6a6_artifact, rasp4b_pair, tmp_path):
    """Two benchmarks of different artifacts at once under one key: the tracker gives each its own board."""
    state, state_file = rasp4b_pair
    runs = [bench_popen(state_file, art, tmp_path / name, "--limit", 12, "--repeat", 2, "--timeout", 120)
            for name, art in (("w8a8", rasp4b_artifact), ("w6a6", rasp4b_w6a6_artifact))]
    rows = [finish(*run) for run in runs]
    for row, bits in zip(rows, (8, 6)):
        assert row["calibration"]["wbits"] == row["calibration"]["abits"] == bits
        assert row["bitexact"] is True and row["bitexact_images"] == row["images"] == 12 and row["max_abs_diff"] == 0
        assert row["top1"] == row["top1_host"] and row["sessions"] == 1 and row["emulated"] is True
    assert rows[0]["library_sha256"] != rows[1]["library_sha256"]
    assert {r["board"] for r in rows} == {b["name"] for b in state["boards"]}


@pytest.mark.slow
def test_bench_resumes_after_the_rpc_server_is_killed(rasp4b_artifact, rasp4b_pair, tmp_path):
    """The board serving the benchmark is killed (its whole process group) once 3 images are done: the bench
    reconnects through the tracker to the other board and continues with the next image, none counted twice."""
    from hyq_tvm import data

    state, state_file = rasp4b_pair
    library = f"hyq-{sha256_file(rasp4b_artifact / 'model.so')[:12]}.so"
    before = session_dirs(state, library)
    proc, log = bench_popen(state_file, rasp4b_artifact, tmp_path / "r", "--limit", 12, "--repeat", 1)
    done = finished_images(tmp_path / "r", 3, proc, log)
    (served,) = re.findall(r"session 1 on (\S+):", log.read_text())
    crash(state, served, proc)
    row = finish(proc, log)
    for lib in session_dirs(state, library) - before:
        shutil.rmtree(lib.parent)  # the killed session's folder, left in the shared rootfs
    labels = data.open_dataset(None, "test", 64, [0.0] * 3, [1.0] * 3).targets
    assert done[:3] == data.balanced_indices(labels, 12)[:3].tolist()  # the seeded class-balanced subset, in order
    text = log.read_text()
    assert "12 of 10000 test images (seeded, balanced over the classes)" in text
    (lost,) = re.findall(r"image (\d+): RPC session lost \((?:InternalError|ConnectionResetError|BrokenPipeError)"
                         r": .*\); reconnecting", text)
    assert int(lost) not in done, text
    (other,) = {b["name"] for b in state["boards"]} - {served}
    assert f"session 2 on {other}:" in text and row["sessions"] == 2 and row["board"] == other
    assert row["images"] == row["bitexact_images"] == 12 and row["bitexact"] is True and row["max_abs_diff"] == 0
    assert row["top1"] == row["top1_host"]
    assert not list((tmp_path / "r" / ".work").glob("*.jsonl"))


@pytest.mark.slow
def test_bench_measures_latency_again_after_the_rpc_server_is_killed(rasp4b_artifact, rasp4b_pair, tmp_path):
    """The board is killed while time_evaluator runs: the bench reconnects to the other board and measures the
    latency there from the start, in one piece."""
    state, state_file = rasp4b_pair
    library = f"hyq-{sha256_file(rasp4b_artifact / 'model.so')[:12]}.so"
    before = session_dirs(state, library)
    proc, log = bench_popen(state_file, rasp4b_artifact, tmp_path / "r", "--limit", 2, "--repeat", 100)
    (served,) = logged(r"measuring latency on (\S+): 100 runs", proc, log)
    crash(state, served, proc)
    row = finish(proc, log)
    for lib in session_dirs(state, library) - before:
        shutil.rmtree(lib.parent)
    text = log.read_text()
    assert re.search(r"\nlatency: RPC session lost \((InternalError|ConnectionResetError|BrokenPipeError): .*\); "
                     r"reconnecting\n", text), text
    (other,) = {b["name"] for b in state["boards"]} - {served}
    assert f"session 2 on {other}:" in text and f"measuring latency on {other}: 100 runs" in text
    assert row["sessions"] == 2 and row["board"] == other and row["runs"] == 100
    assert row["images"] == row["bitexact_images"] == 2 and row["bitexact"] is True


@pytest.mark.slow
def test_four_benchmarks_share_two_boards(rasp4b_artifact, rasp4b_w6a6_artifact, rasp4b_pair, tmp_path):
    """A load test: four benchmarks at once under one key with two boards; the tracker queues the requests it cannot
    serve yet; every benchmark gets a board within the time bound, in one session, and runs each image once."""
    state, state_file = rasp4b_pair
    deadline = time.monotonic() + 600
    runs = [bench_popen(state_file, art, tmp_path / f"c{n}", "--limit", 2, "--repeat", 1, "--timeout", 600)
            for n, art in enumerate([rasp4b_artifact, rasp4b_w6a6_artifact] * 2)]
    try:
        rows = [finish(*run, timeout=max(deadline - time.monotonic(), 1)) for run in runs]
    finally:
        for proc, _ in runs:
            proc.kill()
    for (_, log), row in zip(runs, rows):
        text = log.read_text()
        assert "RPC session lost" not in text and "resuming" not in text, text
        assert row["sessions"] == 1 and row["images"] == row["bitexact_images"] == 2 and row["bitexact"] is True
        assert len(row["not_bitexact"]) == 0 and row["top1"] == row["top1_host"]
    assert {r["board"] for r in rows} == {b["name"] for b in state["boards"]}
    assert [r["calibration"]["wbits"] for r in rows] == [8, 6, 8, 6]


@pytest.mark.slow
def test_bench_instruction_counts_on_icount_board(rasp4b_artifact, tmp_path):
    """On a board started with --icount the row carries the instructions one inference executes in model.so and
    libm: the difference of two session counts (qemu plugin) over 8 runs of main, exact: a third session equal
    to the first counts the same, and two benchmarks give the same number."""
    _need_emulation()
    state_file = tmp_path / "devices.json"
    try:
        state = fleet.start("rasp4b", count=1, state_file=state_file, icount=True)
        rows = [finish(*bench_popen(state_file, rasp4b_artifact, tmp_path / f"r{i}", "--limit", 2, "--repeat", 1))
                for i in range(2)]
    finally:
        fleet.stop(state_file=state_file)
    for row in rows:
        assert row["board"] == state["boards"][0]["name"] and row["bitexact"] is True
        assert isinstance(row["instructions"], int) and 10_000_000 < row["instructions"] < 1_000_000_000
        assert "qemu TCG plugin" in row["instructions_note"] and "; exact:" in row["instructions_note"]
    a, b = (r["instructions"] for r in rows)
    assert a == b
    ((c1, again, cn),) = re.findall(r"instructions in model.so and libm: (\d+) and (\d+) \(sessions running main "
                                    r"twice\), (\d+) \(8 more times\)", (tmp_path / "r0" / "bench.log").read_text())
    assert c1 == again and int(cn) - int(c1) == 8 * a and int(c1) >= 2 * a  # c1 also counts loading model.so
    assert f"| {a} |" in (tmp_path / "r0" / "device_rasp4b.md").read_text()


@pytest.mark.slow
def test_bench_counts_instructions_again_after_the_rpc_server_is_killed(rasp4b_artifact, tmp_path):
    """Two --icount boards; the one running the first counted session is killed: the bench starts the counts again
    on the other board, and they are exact."""
    _need_emulation()
    state_file = tmp_path / "devices.json"
    try:
        state = fleet.start("rasp4b", count=2, state_file=state_file, icount=True)
        before = session_dirs(state, "model.so")
        proc, log = bench_popen(state_file, rasp4b_artifact, tmp_path / "r", "--limit", 1, "--repeat", 1)
        (served,) = logged(r"counting instructions on (\S+): main runs 2 times", proc, log)
        crash(state, served, proc)
        row = finish(proc, log)
    finally:
        fleet.stop(state_file=state_file)
    for lib in session_dirs(state, "model.so") - before:
        if sha256_file(lib) == sha256_file(rasp4b_artifact / "model.so"):
            shutil.rmtree(lib.parent)
    text = log.read_text()
    assert re.search(r"\ninstruction count: RPC session lost \(\w+: .*\); reconnecting\n", text), text
    (other,) = {b["name"] for b in state["boards"]} - {served}
    after = text.split("instruction count: RPC session lost")[1]
    assert re.findall(r"counting instructions on (\S+):", after) == [other] * 3
    assert isinstance(row["instructions"], int) and 10_000_000 < row["instructions"] < 1_000_000_000
    assert "; exact:" in row["instructions_note"] and row["bitexact"] is True


@pytest.mark.slow
def test_compare_ort_on_icount_board(rasp4b_artifact, tmp_path):
    """--compare-ort: after the bench, hyq-tvm's model.so and onnxruntime on the FP32 and QDQ models are counted in
    the board's rootfs; the row of reports/benchmark_rasp4b.json has the fields, positive counts, the MACs, and
    hyq-tvm's model.so count in one thread matches the bench's through RPC in four."""
    _need_emulation()
    state_file = tmp_path / "devices.json"
    try:
        fleet.start("rasp4b", count=1, state_file=state_file, icount=True)
        proc, log = bench_popen(state_file, rasp4b_artifact, tmp_path / "r", "--limit", 2, "--repeat", 1,
                                "--compare-ort")
        bench_row = finish(proc, log, timeout=1500)
    finally:
        fleet.stop(state_file=state_file)
    (row,) = json.loads((tmp_path / "r" / "benchmark_rasp4b.json").read_text())["rows"]
    assert {k: row[k] for k in ("model", "board", "img_size", "macs", "bitexact", "emulated")} == {
        "model": "mobilevit_xxs", "board": "rasp4b", "img_size": 64, "macs": 20_862_336, "bitexact": True,
        "emulated": True}
    for engine in ("hyq_int8", "ort_fp32", "ort_int8"):
        assert row[f"{engine}_instructions"] > row["own_instructions"][engine] > 1_000_000, engine
        assert row["instructions_per_mac"][engine] == round(row[f"{engine}_instructions"] / row["macs"], 3)
    assert row["hyq_over_ort_int8"] == round(row["hyq_int8_instructions"] / row["ort_int8_instructions"], 3)
    assert row["hyq_int8_rpc_instructions"] == bench_row["instructions"]
    assert abs(row["own_instructions"]["hyq_int8"] - bench_row["instructions"]) < 1e-3 * bench_row["instructions"]
    assert row["exact"]["hyq_int8"] and row["ort_int8_kernels"]["MatMulIntegerToFloat"] >= 18
    md = (tmp_path / "r" / "benchmark_rasp4b.md").read_text()
    assert md.startswith("# Board benchmark (EMULATED): rasp4b") and "| mobilevit_xxs | rasp4b (EMULATED" in md
