"""python -m hyq_tvm.bench: board targets as data, cross-compiled artifacts, and a device benchmark through
the RPC tracker against an emulated rasp4b (qemu-user -cpu cortex-a72).

The end-to-end test needs root, qemu-user(-static), debootstrap, binfmt-support and g++-aarch64-linux-gnu
(scripts/setup.sh) and builds the arm64 rootfs into the cache on first use (a few minutes).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hyq_tvm import bench
from hyq_tvm.devices import BOARDS, fleet
from hyq_tvm.errors import HyqError
from hyq_tvm.targets import elf_arch, emulated_targets, host_arch, load_target

ROOT = Path(__file__).resolve().parents[1]
BOARD_TARGETS = {"rasp4b": "cortex-a72", "rasp3b": "cortex-a53", "jetson-nano": "cortex-a57", "rk3399": "cortex-a72"}


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
    with pytest.raises(HyqError, match=r"unknown target 'rasp5'; known targets: host, jetson-nano, rasp3b, rasp4b, rk3399"):
        load_target("rasp5")


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


def test_no_free_device_times_out(tmp_path):
    tracker = fleet.start_tracker("127.0.0.1", tmp_path, port=closed_port())
    try:
        r = cli("--tracker", f"127.0.0.1:{tracker['port']}", "--key", "nosuchboard", "--timeout", "3",
                "--artifact", fake_host_artifact(tmp_path / "a"), "--reports", tmp_path / "r",
                "--devices-state", tmp_path / "s.json")
    finally:
        fleet.kill_group(tracker["pgid"])
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


@pytest.fixture(scope="module")
def rasp4b_artifact(tmp_path_factory):
    """mobilevit_xxs proxy, MinMax W8A8 plan from 8 images, compiled for rasp4b."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (scripts/setup.sh)")
    import torch

    from hyq_tvm.calibrate import calibrate
    from hyq_tvm.compile import compile_plan

    torch.set_num_threads(1)
    torch.manual_seed(0)
    plan = calibrate("mobilevit_xxs", method="minmax", images=8, progress=False)[0]
    return compile_plan(plan, "rasp4b", tmp_path_factory.mktemp("artifact") / "mobilevit_xxs-rasp4b")


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
    assert "EMULATED" in r.stdout
    (row,) = json.loads((tmp_path / "device_rasp4b.json").read_text())["rows"]
    assert row["bitexact"] is True and row["bitexact_images"] == row["images"] == 8 and row["max_abs_diff"] == 0
    assert row["top1"] == row["top1_host"]
    assert row["emulated"] is True and row["board"] == state["boards"][0]["name"] and row["qemu_cpu"] == "cortex-a72"
    assert row["runs"] == 3 and 0 < row["latency_ms_median"] <= row["latency_ms_p90"]
    assert row["instructions"] is None and "--icount" in row["instructions_note"]
    md = (tmp_path / "device_rasp4b.md").read_text()
    assert "EMULATED" in md and "| mobilevit_xxs |" in md
    assert not list((tmp_path / ".work").glob("*.jsonl"))  # the work file goes once the report is written
