"""The side-by-side host benchmark (python -m hyq_tvm.compare): its rows, its report, its cache, its errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from hyq_tvm import data, latency
from hyq_tvm.artifact import LIBRARY, ONNX
from hyq_tvm.cli import compare
from hyq_tvm.errors import HyqError
from hyq_tvm.onnx_qdq import export_onnx, onnx_session
from hyq_tvm.quant import calibrate as calibrate_module
from hyq_tvm.quant.plan import QuantPlan
from hyq_tvm.relax.tuning import database_dir

FIELDS = {"model", "img_size", "threads", "method", "mode", "wbits", "abits", "repeat", "hyq_int8_ms", "ort_qdq_ms",
          "ort_qdq_u8_ms", "ort_fp32_ms", "torch_fp32_ms", "peak_rss_mb", "ratio_to_fastest", "fastest",
          "artifact_bytes", "schedules", "cpu", "command"}
OTHERS = ("ort_qdq", "ort_qdq_u8", "ort_fp32", "torch_fp32")


def _old_row(model: str, threads: int) -> dict:
    """A row of an earlier run, every number 99."""
    return {**dict.fromkeys(FIELDS, 99), "model": model, "img_size": 64, "threads": threads, "mode": "partial",
            "fastest": "ort_fp32",
            "schedules": None, "cpu": "earlier CPU", "command": "python -m hyq_tvm.compare --earlier"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `compare --model mobilevit_xxs --img-size 64 --threads 1` into a reports folder holding a row of the
    same key and one of another, with Q-HyViT calibrated on 8 images instead of 32 (the cached plan and
    artifact in a work folder), and the calls to calibrate."""
    reports, work = tmp_path_factory.mktemp("reports"), tmp_path_factory.mktemp("work")
    (reports / "benchmark_host.json").write_text(json.dumps([_old_row("mobilevit_xxs", 1),
                                                             _old_row("efficientformer_l1", 2)]))
    real, calls = calibrate_module.calibrate, []

    def quick_calibrate(name, weights=None, **kwargs):
        calls.append(kwargs)
        torch.manual_seed(0)
        return real(name, weights, **{**kwargs, "images": 8, "progress": False})

    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibrate_module, "calibrate", quick_calibrate)
        compare.main(["--model", "mobilevit_xxs", "--img-size", "64", "--threads", "1", "--repeat", "3",
                      "--reports", str(reports), "--work-dir", str(work)])
    return reports, work, calls


def _rows(reports) -> dict:
    return {(r["model"], r["threads"]): r for r in json.loads((reports / "benchmark_host.json").read_text())}


@pytest.mark.slow
def test_a_row_has_every_field_and_positive_numbers(run):
    reports, work, _ = run
    row = _rows(reports)[("mobilevit_xxs", 1)]
    assert set(row) == FIELDS
    assert (row["img_size"], row["method"], row["wbits"], row["abits"], row["repeat"]) == (64, "qhyvit", 8, 8, 3)
    assert all(row[f"{e}_ms"] > 0 for e in latency.ENGINES) and row["peak_rss_mb"] > 0
    assert row["artifact_bytes"] == (work / "mobilevit_xxs-64-w8a8" / "artifact" / LIBRARY).stat().st_size
    tuned = database_dir("host", "mobilevit_xxs", 64, 8, 8)   # applied by compile when it exists
    assert row["schedules"] == (str(tuned) if tuned.is_dir() else None)
    assert row["fastest"] == min(OTHERS, key=lambda e: row[f"{e}_ms"])
    assert row["ratio_to_fastest"] == round(row["hyq_int8_ms"] / row[f"{row['fastest']}_ms"], 3)
    assert row["command"].startswith("python -m hyq_tvm.compare --model mobilevit_xxs --img-size 64")


@pytest.mark.slow
def test_a_rerun_replaces_its_rows_and_keeps_the_others(run):
    reports, _, _ = run
    rows = _rows(reports)
    assert set(rows) == {("mobilevit_xxs", 1), ("efficientformer_l1", 2)}
    assert rows[("efficientformer_l1", 2)] == _old_row("efficientformer_l1", 2)
    assert rows[("mobilevit_xxs", 1)]["cpu"] != "earlier CPU"
    md = (reports / "benchmark_host.md").read_text()
    assert "| mobilevit_xxs | 64 | qhyvit W8A8 partial | 1 |" in md and "| efficientformer_l1 | 64 | 99 W99A99 partial | 2 |" in md
    assert "`python -m hyq_tvm.compare --earlier`" in md and rows[("mobilevit_xxs", 1)]["command"] in md
    assert (reports / "benchmark_host.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_built_artifact_is_kept_and_reused(run, monkeypatch):
    _, work, calls = run
    assert len(calls) == 1 and calls[0]["method"] == "qhyvit"
    folder = work / "mobilevit_xxs-64-w8a8"
    assert {p.name for p in (folder / "artifact").iterdir()} >= {LIBRARY, ONNX, "plan.json", "metadata.json"}

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt a kept artifact")

    monkeypatch.setattr(calibrate_module, "calibrate", refuse)
    monkeypatch.setattr("hyq_tvm.build.compile_plan", refuse)
    plan_file = latency.calibrated_plan("mobilevit_xxs", None, 8, None, work)
    assert plan_file == folder / "plan.json"
    assert latency.compiled_artifact(plan_file, None) == folder / "artifact"


@pytest.mark.slow
def test_the_uint8_export_agrees_with_the_int8_one(run, tmp_path):
    """The Q-HyViT plan quantizes most activations per channel: those stay int8, the rest become uint8."""
    _, work, _ = run
    artifact = work / "mobilevit_xxs-64-w8a8" / "artifact"
    plan = QuantPlan.load(artifact / "plan.json")
    u8_file = export_onnx(plan, tmp_path / "u8.onnx", activations="uint8")
    info = plan.model
    images = next(iter(data.test_loader(None, info["img_size"], info["mean"], info["std"], limit=8, batch_size=8)))[0]
    expected, got = (np.concatenate([onnx_session(f).run(None, {"input": x[None].numpy()})[0] for x in images])
                     for f in (artifact / ONNX, u8_file))
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_rows_of_another_mode_are_kept_beside_each_other():
    partial, integer = _old_row("mobilevit_xxs", 1), {**_old_row("mobilevit_xxs", 1), "mode": "integer"}
    fresh = {**_old_row("mobilevit_xxs", 1), "mode": "partial", "hyq_int8_ms": 1}
    assert compare.merged([partial, integer], [fresh]) == [integer, fresh]
    assert "W99A99 integer" in compare.table([integer])


def test_bad_threads_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hyq_tvm.compare", "--threads", "1", "0", "--reports",
                           str(tmp_path / "reports")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == "error: --threads and --repeat must be at least 1\n", proc.stderr
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("args,message", [
    (("--model", "resnet50"), "unknown model 'resnet50'; supported: mobilevit_xxs"),
    (("--img-size", "50"), "--img-size must be a multiple of 32"),
    (("--bits", "9"), "--bits must be an integer from 2 to 8, got 9"),
    (("--artifact", "artifacts/x", "--model", "mobilevit_xxs"), "--artifact is timed as built"),
    (("--artifact", "."), "is not an artifact folder"),
])
def test_bad_input_is_refused_before_any_work(args, message, tmp_path):
    with pytest.raises(HyqError, match=re.escape(message)):
        compare.main([*args, "--work-dir", str(tmp_path / "work"), "--reports", str(tmp_path / "reports")])
    assert not (tmp_path / "work").exists() and not (tmp_path / "reports").exists()


def test_a_given_plan_is_kept_by_its_content(tmp_path):
    plan = calibrate_module.calibrate("mobilevit_xxs", method="minmax", images=8, progress=False)[0]
    plan.save(tmp_path / "plan.json")
    kept = latency.kept_plan(plan, None, tmp_path / "work")
    assert kept.parent.name.startswith("mobilevit_xxs-64-w8a8-plan-") and QuantPlan.load(kept) == plan
    assert latency.kept_plan(QuantPlan.load(kept), None, tmp_path / "work") == kept
    with pytest.raises(HyqError, match="the plan has model mobilevit_xxs, not mobilevitv2_050"):
        compare.main(["--plan", str(tmp_path / "plan.json"), "--model", "mobilevitv2_050",
                      "--work-dir", str(tmp_path / "work2")])
