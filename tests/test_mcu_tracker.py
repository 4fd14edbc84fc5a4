"""MCU boards reached the way a Cortex-A board is: hyq_tvm.mcu.server started by python -m hyq_tvm.device under the
board's key (no root, no rootfs), an MCU artifact benchmarked through the tracker by python -m hyq_tvm.bench (every
output bit-exact with host.so, resumable, instructions per inference), device list and stop, and the one-line
errors.

Needs qemu-system-arm, gcc-arm-none-eabi and libnewlib-arm-none-eabi (scripts/setup.sh); the tracker and the
servers run on free ports in a private cache (state file, logs).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hyq_tvm.devices import bench, fleet
from hyq_tvm.errors import HyqError
from hyq_tvm.mcu.boards import mcu_boards
from hyq_tvm.mcu.remote import bench_mcu, server_error

ROOT = Path(__file__).resolve().parents[1]
BOARD = "mps2-an500"  # the artifact's board
OTHER = "stm32h743"   # another MCU board (the same QEMU machine)


def run(module: str, *args, cache: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """python -m hyq_tvm.MODULE ARGS (with the private cache)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **({"HYQ_TVM_CACHE": str(cache)} if cache else {}))
    return subprocess.run([sys.executable, "-m", f"hyq_tvm.{module}", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a command that failed with status 2, which prints no other error line."""
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:") or "Traceback" in line]
    assert r.returncode == 2 and len(lines) == 1 and r.stderr.strip().endswith(lines[0]), r.stderr
    return lines[0]


def need_tools() -> None:
    for tool in ("qemu-system-arm", "arm-none-eabi-gcc", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup.sh)")


def fake_mcu_artifact(path: Path, board: str = BOARD) -> Path:
    """An MCU artifact folder with metadata, plan and a stand-in host.so: enough for the checks before any build."""
    path.mkdir()
    shutil.copy("/bin/true", path / "host.so")
    (path / "plan.json").write_text(json.dumps({"model": {"name": "fake", "img_size": 8, "mean": [0] * 3,
                                                          "std": [1] * 3}}))
    (path / "metadata.json").write_text(json.dumps({"format": "hyq-tvm/mcu", "model": "fake", "board": board,
                                                    "files": {"plan": "plan.json", "host_library": "host.so"}}))
    return path


def no_contact(*args, **kwargs):
    raise AssertionError("asked the tracker")


# --- without a server ----------------------------------------------------------------------------------------
def test_unknown_board_names_the_linux_and_the_mcu_boards(tmp_path):
    line = one_error_line(run("device", "start", "stm32h7", cache=tmp_path))
    assert line.startswith("error: unknown board 'stm32h7'; known boards: ") and "rasp4b (-cpu cortex-a72)" in line
    assert line.endswith(f"; MCU boards: {', '.join(mcu_boards())}") and OTHER in mcu_boards()
    with pytest.raises(HyqError, match=r"^unknown board 'stm32h7'; .*; MCU boards: "):
        fleet.stop("stm32h7", cache=tmp_path, state_file=tmp_path / "s.json")
    assert fleet.stop(OTHER, cache=tmp_path, state_file=tmp_path / "s.json") == []
    with pytest.raises(HyqError, match=r"^--icount is for Linux boards: stm32h743 \(an MCU board\) counts"):
        fleet.start(OTHER, icount=True, cache=tmp_path, state_file=tmp_path / "s.json")


def test_an_artifact_for_another_board_is_refused_before_any_contact(tmp_path, monkeypatch):
    """The fleet state names the key's board: an MCU artifact for another board, or for a key of a Linux board, and a
    Linux artifact for a key of an MCU board are refused before the tracker is asked for anything."""
    monkeypatch.setattr(bench, "check_tracker", no_contact)
    monkeypatch.setattr(bench, "request_session", no_contact)
    state_file = tmp_path / "devices.json"
    pgid = os.getpgid(0)  # a live process group stands in for the servers
    fleet.save_state(state_file, {"tracker": {"host": "127.0.0.1", "port": 9, "pgid": None, "started": False},
                                  "boards": [{"name": f"{OTHER}-9", "board": OTHER, "key": OTHER, "host": "127.0.0.1",
                                              "port": 9, "pgid": pgid, "kind": "mcu"},
                                             {"name": "rasp4b-8", "board": "rasp4b", "key": "rasp4b",
                                              "host": "127.0.0.1", "port": 8, "pgid": pgid}]})
    art = fake_mcu_artifact(tmp_path / "art")
    with pytest.raises(HyqError, match=rf"^artifact {art} is built for the MCU board {BOARD} but key '{OTHER}' is "
                                       rf"{OTHER}: not uploaded; compile the plan with --target {OTHER} or bench with "
                                       rf"the key of a {BOARD}$"):
        bench_mcu("127.0.0.1:9", OTHER, art, limit=1, reports=tmp_path / "r", state_file=state_file)
    with pytest.raises(HyqError, match=rf"^key 'rasp4b' is the Linux board rasp4b but artifact {art} is firmware for "
                                       rf"the MCU board {BOARD}: not uploaded; start that board"):
        bench_mcu("127.0.0.1:9", "rasp4b", art, limit=1, reports=tmp_path / "r", state_file=state_file)
    linux = tmp_path / "linux"
    linux.mkdir()
    shutil.copy("/bin/true", linux / "model.so")
    (linux / "plan.json").write_text((art / "plan.json").read_text())
    (linux / "metadata.json").write_text(json.dumps({"model": "fake", "files": {"library": "model.so",
                                                                                "plan": "plan.json"}}))
    for state in (state_file, tmp_path / "none.json"):  # told by the fleet state, or by the key's name
        with pytest.raises(HyqError, match=rf"^key '{OTHER}' is the MCU board {OTHER}, which runs firmware, not "
                                           rf"model.so: not uploaded; compile the plan for it"):
            bench.bench("127.0.0.1:9", OTHER, linux, limit=1, reports=tmp_path / "r", state_file=state)
    assert not (tmp_path / "r").exists()


# --- a private fleet: MCU servers for two boards behind one tracker -----------------------------------------------
@pytest.fixture(scope="module")
def mcu_fleet(tmp_path_factory):
    """A tracker and the servers of BOARD and OTHER, started without root or the rootfs; stopped at the end."""
    need_tools()
    cache = tmp_path_factory.mktemp("mcu-fleet")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("require_root", "ensure_binfmt", "build_rootfs", "mount_proc"):
                mp.setattr(fleet, name, lambda *a, _name=name, **k: pytest.fail(f"an MCU board called {_name}"))
            fleet.start(BOARD, cache=cache)
            state = fleet.start(OTHER, cache=cache)
        yield state, cache
    finally:
        fleet.stop(cache=cache)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _session(state: dict, key: str):
    from tvm import rpc

    t = state["tracker"]
    return rpc.connect_tracker(t["host"], t["port"]).request(key, session_timeout=300)


def test_mcu_servers_run_in_this_python_under_the_boards_keys(mcu_fleet):
    state, cache = mcu_fleet
    t, boards = state["tracker"], state["boards"]
    assert [(b["board"], b["key"], b["kind"], b["qemu_machine"]) for b in boards] == [
        (BOARD, BOARD, "mcu", "mps2-an500"), (OTHER, OTHER, "mcu", "mps2-an500")]
    assert not any("rootfs" in b for b in boards) and t["started"]
    for pgid, module in ((t["pgid"], "tvm.exec.rpc_tracker"), *((b["pgid"], "hyq_tvm.mcu.server") for b in boards)):
        cmd = _cmdline(pgid)
        assert cmd[:3] == [sys.executable, "-m", module] and "chroot" not in cmd
    listed = run("device", "list", cache=cache)
    assert listed.returncode == 0, listed.stderr
    for b in boards:
        assert (f"board {b['name']}: key {b['key']}, 127.0.0.1:{b['port']}, qemu-system-arm -M mps2-an500, "
                f"pgid {b['pgid']}, alive") in listed.stdout
    assert f"server:{BOARD}" in listed.stdout and f"server:{OTHER}" in listed.stdout
    sess = _session(state, OTHER)
    assert json.loads(sess.get_function("hyq.mcu.info")()) == {"board": OTHER, "cpu": "cortex-m7",
                                                                 "qemu_machine": "mps2-an500", "emulated": True}


def test_server_errors_come_back_as_one_line(mcu_fleet):
    from tvm.error import RPCError

    state, _ = mcu_fleet
    run_fn = _session(state, OTHER).get_function("hyq.mcu.run")
    for args, message in (
            (("missing.elf", b"\0" * 8, 1), "missing.elf was not uploaded into this session: upload the ELF "
                                            "(session.upload) first"),
            (("../etc/passwd", b"\0" * 8, 1), "the firmware must be named by a file name in the session folder, "
                                              "not '../etc/passwd'"),
            (("missing.elf", b"\0" * 7, 2), "hyq.mcu.run got 7 input bytes for 2 inputs: give n >= 1 inputs of "
                                            "equal size")):
        with pytest.raises(RPCError) as err:
            run_fn(*args)
        assert str(server_error(err.value, OTHER)) == f"the MCU server for key '{OTHER}': {message}"


# --- an MCU artifact benchmarked through the tracker --------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """mobilevit_xxs, MinMax W8A8 integer-mode plan from 8 images, compiled for BOARD."""
    need_tools()
    import torch

    from hyq_tvm.mcu.build import compile_mcu
    from hyq_tvm.quant.calibrate import calibrate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    plan = calibrate("mobilevit_xxs", method="minmax", mode="integer", images=8, progress=False)[0]
    out = tmp_path_factory.mktemp("artifact") / f"mobilevit_xxs-{BOARD}"
    compile_mcu(plan, BOARD, out)
    return out


def bench_args(state_file: Path, artifact: Path, reports: Path, *args) -> list:
    t = fleet.load_state(state_file)["tracker"]
    return ["--tracker", f"{t['host']}:{t['port']}", "--artifact", artifact, "--reports", reports,
            "--devices-state", state_file, *args]


@pytest.mark.slow
def test_bench_runs_the_artifact_bit_exact_with_instruction_counts(mcu_fleet, artifact, tmp_path):
    import tvm

    from hyq_tvm.mcu.boards import load_board
    from hyq_tvm.mcu.build import quantize_input
    from hyq_tvm.mcu.firmware import build_emulated
    from hyq_tvm.mcu.remote import load_mcu_artifact
    from hyq_tvm.mcu.server import unpack_result

    state, cache = mcu_fleet
    state_file = fleet.state_path(cache)
    r = run("bench", "--key", BOARD, "--limit", 8, "--chunk", 4, *bench_args(state_file, artifact, tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"mobilevit_xxs on {BOARD} EMULATED ({BOARD}, qemu-system-arm -M mps2-an500): bitexact True (8/8)" \
        in r.stdout
    (row,) = json.loads((tmp_path / f"device_{BOARD}.json").read_text())["rows"]
    board = next(b for b in state["boards"] if b["board"] == BOARD)
    assert {k: row[k] for k in ("kind", "emulated", "bitexact", "images", "bitexact_images", "max_abs_diff",
                                "not_bitexact", "board", "qemu_machine", "cpu", "target", "sessions", "chunk")} == {
        "kind": "mcu", "emulated": True, "bitexact": True, "images": 8, "bitexact_images": 8, "max_abs_diff": 0.0,
        "not_bitexact": [], "board": board["name"], "qemu_machine": "mps2-an500", "cpu": "cortex-m7", "target": BOARD,
        "sessions": 1, "chunk": 4}
    assert row["top1"] == row["top1_host"] and row["calibration"]["mode"] == "integer"
    assert 10_000_000 < row["instructions"] < 1_000_000_000 and "latency_ms_median" not in row
    note = row["instructions_note"]
    assert note.startswith("EMULATED: instructions one hyq_model_run call executes on qemu-system-arm -M mps2-an500")
    assert "exact counts, not cycles" in note
    md = (tmp_path / f"device_{BOARD}.md").read_text()
    assert f"| EMULATED ({board['name']}, {BOARD} on qemu-system-arm -M mps2-an500) | n/a | n/a | n/a | yes (8/8) |" \
        in md
    assert f"| {row['instructions']} |" in md
    assert len(re.findall(r"\n4 images on \S+: \d+ instructions per inference", r.stderr)) == 2
    assert not list((tmp_path / ".work").glob("*"))  # the work file goes once the report is written
    # the same firmware through the session by hand: the server's outputs are host.so's, bit for bit
    art = load_mcu_artifact(artifact)
    elf = build_emulated(artifact, load_board(BOARD), tmp_path / "model.elf")
    x = np.random.default_rng(0).standard_normal((3, *art.shape("input")[1:])).astype(np.float32)
    q = quantize_input(x, art.grid("input"))
    sess = _session(state, BOARD)
    sess.upload(str(elf), "model.elf")
    outputs, instructions = unpack_result(bytes(sess.get_function("hyq.mcu.run")("model.elf", q.tobytes(), 3)), 3)
    host = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(artifact / "host.so")), tvm.cpu())
    want = np.stack([host["main"](tvm.runtime.tensor(image[None])).numpy().reshape(-1) for image in q])
    assert outputs.dtype == np.int8 and outputs.tobytes() == want.tobytes()
    assert abs(instructions - row["instructions"]) < 0.01 * row["instructions"]


def _work_rows(reports: Path) -> list[int]:
    rows = []
    for work in (reports / ".work").glob("*.jsonl"):
        for line in work.read_text().splitlines()[1:]:
            try:
                rows.append(json.loads(line)["i"])
            except json.JSONDecodeError:
                pass  # a line being written
    return rows


@pytest.mark.slow
def test_a_killed_bench_continues_with_a_larger_limit(mcu_fleet, artifact, tmp_path):
    """The bench is killed once 2 images are done (chunks of 2); a rerun with --limit 16 runs only the images not done,
    4 at a time."""
    from hyq_tvm import data

    _, cache = mcu_fleet
    state_file = fleet.state_path(cache)
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "hyq_tvm.bench", "--key", BOARD, "--limit", "8", "--chunk", "2",
                                 *map(str, bench_args(state_file, artifact, tmp_path))], stdout=subprocess.DEVNULL,
                                stderr=f, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 300
        while len(_work_rows(tmp_path)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _work_rows(tmp_path)
    assert 2 <= len(done) < 8, log.read_text()
    labels = data.open_dataset(None, "test", 64, [0.0] * 3, [1.0] * 3).targets
    assert set(done) <= set(data.balanced_indices(labels, 16).tolist())  # the subsets grow with the limit
    r = run("bench", "--key", BOARD, "--limit", 16, "--chunk", 4, *bench_args(state_file, artifact, tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(done)} of 16 images already done" in r.stderr
    runs = re.findall(r"\n(\d) images on \S+: \d+ instructions per inference", r.stderr)
    assert sum(map(int, runs)) == 16 - len(done) and len(runs) == -(-(16 - len(done)) // 4)
    (row,) = json.loads((tmp_path / f"device_{BOARD}.json").read_text())["rows"]
    assert row["images"] == row["bitexact_images"] == 16 and row["bitexact"] is True and row["max_abs_diff"] == 0
    assert not list((tmp_path / ".work").glob("*.jsonl"))


@pytest.mark.slow
def test_bench_errors_are_one_line(mcu_fleet, artifact, tmp_path):
    """A key whose server is another board (told by the server when the fleet state does not know the key) and a
    key no server has: one error line each, nothing uploaded, no work file."""
    state, cache = mcu_fleet
    args = bench_args(fleet.state_path(cache), artifact, tmp_path)
    args[args.index("--devices-state") + 1] = tmp_path / "empty.json"
    other = next(b for b in state["boards"] if b["board"] == OTHER)
    line = one_error_line(run("bench", "--key", OTHER, "--limit", 2, *args))
    assert line == (f"error: artifact {artifact} is built for the MCU board {BOARD} but the server of key '{OTHER}' "
                    f"(127.0.0.1:{other['port']}) is {OTHER}: not uploaded; compile the plan with --target {OTHER} or "
                    f"bench with the key of a {BOARD}")
    line = one_error_line(run("bench", "--key", "nosuchboard", "--timeout", 2, "--limit", 2, *args))
    assert line.startswith("error: no free device with key 'nosuchboard' on tracker ") and "within 2 s" in line
    assert not (tmp_path / ".work").exists() or not list((tmp_path / ".work").glob("*"))


def test_device_stop_ends_the_servers_and_the_tracker(mcu_fleet):
    """Last in the module: python -m hyq_tvm.device stop BOARD stops that board's server, stop (all) the rest and the
    tracker, whole process groups (the servers' TVM workers too)."""
    state, cache = mcu_fleet
    t, boards = state["tracker"], {b["board"]: b for b in state["boards"]}
    r = run("device", "stop", BOARD, cache=cache)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        f"stopped {boards[BOARD]['name']} (process group {boards[BOARD]['pgid']})"], r.stderr
    assert not fleet.alive(boards[BOARD]["pgid"]) and fleet.alive(boards[OTHER]["pgid"]) and fleet.alive(t["pgid"])
    r = run("device", "stop", cache=cache)
    assert r.returncode == 0 and r.stdout.splitlines() == [
        f"stopped {boards[OTHER]['name']} (process group {boards[OTHER]['pgid']})",
        f"stopped tracker {t['host']}:{t['port']} (process group {t['pgid']})"], r.stderr
    for pgid in (t["pgid"], *(b["pgid"] for b in boards.values())):
        assert fleet.group_members(pgid) == []
    assert fleet.load_state(fleet.state_path(cache)) == {"tracker": None, "boards": []}
    assert "nothing to stop" in run("device", "stop", cache=cache).stdout
