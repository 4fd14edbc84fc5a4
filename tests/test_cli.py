import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from hyq_tvm import zoo


def run(module, *args, cwd=None, env=None):
    proc = subprocess.run([sys.executable, "-m", f"hyq_tvm.{module}", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(rc, stderr, pattern):
    import re
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A mobilevit_xxs checkpoint with random weights, in the proxy format."""
    path = tmp_path_factory.mktemp("ckpt") / "random.safetensors"
    model = zoo.build_model("mobilevit_xxs", 10, 64)
    meta = {"hyq_tvm.model": "mobilevit_xxs", "hyq_tvm.num_classes": "10", "hyq_tvm.img_size": "64",
            "hyq_tvm.mean": "[0.286, 0.286, 0.286]", "hyq_tvm.std": "[0.353, 0.353, 0.353]"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "bias_idxs" not in k}, str(path), meta)
    return path


def test_unknown_model(tmp_path):
    rc, _, err = run("calibrate", "--model", "resnet50", "-o", tmp_path / "p.json")
    assert_one_line_error(rc, err, r"unknown model 'resnet50'; supported: mobilevit_xxs, .*efficientformerv2_l")


@pytest.mark.parametrize("flag,value", [("--wbits", 9), ("--abits", 1)])
def test_bits_out_of_range(tmp_path, flag, value):
    rc, _, err = run("calibrate", flag, value, "-o", tmp_path / "p.json")
    assert_one_line_error(rc, err, f"{flag} must be an integer from 2 to 8, got {value}")
    assert not (tmp_path / "p.json").exists()


def test_missing_dataset(tmp_path, random_checkpoint):
    rc, _, err = run("calibrate", "--weights", random_checkpoint, "--data", tmp_path / "nowhere", "-o", tmp_path / "p.json")
    assert_one_line_error(rc, err, "dataset path .*nowhere does not exist")


def test_checkpoint_of_another_model(tmp_path, random_checkpoint):
    rc, _, err = run("calibrate", "--model", "mobilevitv2_050", "--weights", random_checkpoint, "-o", tmp_path / "p.json")
    assert_one_line_error(rc, err, "trained for mobilevit_xxs, not mobilevitv2_050")


PORT = "is not HOST:PORT with a port from 1 to 65535"


@pytest.mark.parametrize("args,pattern", [
    (("calibrate", "--images", 0), "--images must be at least 1, got 0"),
    (("calibrate", "--images", -3), "--images must be at least 1, got -3"),
    (("calibrate", "--method", "minmax", "--images", 10 ** 8), r"minmax calibration on 100000000 images of 64x64"
                                                                r" needs about [\d.]+ GiB \([\d.]+ MiB per image\),"
                                                                r" more than the [\d.]+ GiB of memory available"),
    (("evaluate", "--limit", 0), "--limit must be at least 1, got 0"),
    (("evaluate", "--plan", "/dev/null"), "plan /dev/null is not a regular file"),
    (("train", "--epochs", 0), "--epochs must be at least 1, got 0"),
    (("bench", "--tracker", "127.0.0.1:99999", "--key", "rasp4b", "--artifact", "nowhere"), f"'127.0.0.1:99999' {PORT}"),
    (("tune", "--target", "host", "--tracker", "localhost:0", "--key", "rasp4b"), f"'localhost:0' {PORT}"),
    (("device", "start", "rasp4b", "--tracker", "localhost:65536"), f"'localhost:65536' {PORT}"),
])
def test_bad_counts_paths_and_ports_are_one_line_errors(tmp_path, args, pattern):
    module, *rest = args
    rc, _, err = run(module, *rest, *(("-o", tmp_path / "p.json") if module == "calibrate" else ()))
    assert_one_line_error(rc, err, pattern)
    assert not (tmp_path / "p.json").exists()


def test_compile_checks_the_target_and_schedules_before_calibrating(tmp_path):
    """Without --plan, compile calibrates first; a missing cross compiler or tuning database is found before
    (a calibration would have put its progress bar on stderr)."""
    rc, _, err = run("compile", "--target", "rasp4b", "-o", tmp_path / "out", env={**os.environ, "PATH": str(tmp_path)})
    assert_one_line_error(rc, err, "cross compiler aarch64-linux-gnu-g\\+\\+ for target rasp4b not found")
    rc, _, err = run("compile", "--schedules", tmp_path / "none", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "no tuning database in .*none")
    assert not (tmp_path / "out").exists()


def test_corrupt_plan(tmp_path):
    (tmp_path / "plan.json").write_text('{"format": "hyq-tvm/quantplan", "version": 1, "model": 3}')
    rc, _, err = run("evaluate", "--plan", tmp_path / "plan.json")
    assert_one_line_error(rc, err, "'model' is missing or not a dict")


def test_calibrate_then_evaluate(tmp_path, random_checkpoint, proxy):
    plan = tmp_path / "plan.json"
    rc, out, err = run("calibrate", "--method", "minmax", "--weights", random_checkpoint, "--images", 8, "-o", plan)
    assert rc == 0, err
    assert json.loads(plan.read_text())["calibration"]["method"] == "minmax"
    rc, out, err = run("evaluate", "--plan", plan, "--weights", random_checkpoint, "--limit", 100)
    assert rc == 0, err
    result = json.loads(out)
    assert result["images"] == 100 and 0 <= result["top1_quant"] <= 100
    # the same plan on other weights (the embedded proxy) is refused
    rc, _, err = run("evaluate", "--plan", plan, "--limit", 100)
    assert_one_line_error(rc, err, "calibrated for other weights")
    rc, _, err = run("compile", "--plan", plan, "--target", "host", "-o", tmp_path / "artifact")
    assert_one_line_error(rc, err, "calibrated for other weights")
    assert not (tmp_path / "artifact").exists()
