import json
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from hyq_tvm import zoo


def run(module, *args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", f"hyq_tvm.{module}", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)
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
