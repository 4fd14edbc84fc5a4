"""The built wheel works on its own: installed into a fresh virtual environment, its commands find the board
targets (targets/) and the QEMU plugin source (native/) from any directory, because both ship inside it.

The fresh environment borrows the dependencies (torch, tvm, ...) of the one running the tests through a .pth
file instead of downloading them again.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hyq_tvm.devices import BOARDS
from hyq_tvm.mcu.boards import mcu_boards
from hyq_tvm.targets import known_targets

ROOT = Path(__file__).resolve().parents[1]
NOT_BUILT = ("tests", ".venv", ".git", "__pycache__", "build", "*.egg-info", "runs", "artifacts", "reports",
             ".cache", ".pytest_cache")


def run(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed: {r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv with the wheel built from this checkout installed (no editable link)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the checkout would leave build/ behind
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_BUILT))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], tmp)
    (wheel,) = (tmp / "dist").glob("hyq_tvm-*.whl")
    run([sys.executable, "-m", "venv", tmp / "venv"], tmp)
    python = tmp / "venv" / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).stdout.strip()
    Path(site, "borrowed-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp)
    return python


@pytest.mark.slow
def test_the_installed_wheel_compiles_and_runs_device_commands_from_another_folder(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HYQ_TVM_CACHE"] = str(tmp_path / "cache")
    where = run([installed, "-c", "import hyq_tvm; print(hyq_tvm.__file__)"], tmp_path, env).stdout
    assert where.startswith(str(installed.parents[2])), where  # the installed copy, not the checkout

    r = subprocess.run([installed, "-m", "hyq_tvm.compile", "--target", "nope"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().endswith(f"known targets: {', '.join(known_targets())}"), r.stderr
    run([installed, "-m", "hyq_tvm.calibrate", "--method", "minmax", "-o", "plan.json"], tmp_path, env)
    out = run([installed, "-m", "hyq_tvm.compile", "--plan", "plan.json", "--target", "host", "-o", "art"],
              tmp_path, env).stdout
    assert out.strip().endswith("for host -> art") and (tmp_path / "art" / "model.so").is_file()
    schedules = json.loads((tmp_path / "art" / "metadata.json").read_text())["schedules"]
    assert schedules.endswith("_data/schedules/host/mobilevit_xxs-64-w8a8")   # the database the wheel ships

    boards = run([installed, "-m", "hyq_tvm.device", "boards"], tmp_path, env).stdout
    assert [line.split()[0] for line in boards.splitlines()] == [*BOARDS, *mcu_boards()]   # Linux, then MCU
    loader = Path("/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1")  # an aarch64 program (libc6-arm64-cross)
    if shutil.which("qemu-aarch64") is None or shutil.which("gcc") is None or not loader.is_file():
        pytest.skip("qemu-user, gcc or libc6-arm64-cross is not installed (run scripts/setup.sh as root)")
    out = run([installed, "-m", "hyq_tvm.device", "icount", loader, "--version"], tmp_path, env).stdout
    assert out.splitlines()[-1].startswith("icount ")  # the plugin was built from the installed native/icount.c
    assert list((tmp_path / "cache" / "native").glob("icount-*.so"))
