"""The board benchmark against onnxruntime (hyq_tvm.devices.versus, macs): MACs per layer, the report row and
its files, and the refusal of boards that cannot count. The counts on emulated boards are in test_devices.py
(onnxruntime in the rootfs) and test_bench.py (python -m hyq_tvm.bench --compare-ort end to end)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hyq_tvm.devices import versus
from hyq_tvm.devices.macs import layer_macs
from hyq_tvm.errors import HyqError
from hyq_tvm.quant.plan import QuantPlan

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"name": "mobilevit_xxs", "img_size": 64, "input_shape": [1, 3, 64, 64]}


def test_layer_macs_of_mobilevit_xxs(proxy):
    rows = layer_macs(MODEL)
    assert {r["op"] for r in rows} == {"conv2d", "linear", "matmul"} and len(rows) == 90
    by_name = {r["layer"]: r["macs"] for r in rows}
    assert by_name["stem.conv"] == 32 * 32 * 16 * 3 * 3 * 3  # stride 2: 32x32 outputs, 16 channels, 3x3x3 each
    assert by_name["stages.2.1.transformer.0.attn.qkv"] == 4 * 16 * 3 * 64 * 64  # 4x16 tokens, 64 -> 192
    assert sum(by_name.values()) == 20_862_336
    bigger = layer_macs({**MODEL, "img_size": 128, "input_shape": [1, 3, 128, 128]})
    assert bigger[0]["macs"] == 4 * by_name["stem.conv"]


@pytest.fixture(scope="module")
def plan() -> QuantPlan:
    """A MinMax W8A8 plan of the mobilevit_xxs proxy (the row takes its model and calibration)."""
    from hyq_tvm.quant.calibrate import calibrate
    return calibrate("mobilevit_xxs", method="minmax", wbits=8, abits=8)[0]


BENCH_ROW = {"board": "rasp4b-9090", "instructions": 2_000_000, "bitexact": True, "bitexact_images": 8, "images": 8,
             "instructions_note": "instructions executed in model.so and libm (qemu TCG plugin): ...; exact: two "
                                  "equal sessions counted the same"}


def _counted(native: int, own: int, kernels=None) -> dict:
    def count(n):
        return {"process": {"instructions": n + 1000, "exact": False, "spread": 9.5},
                "code": {"instructions": n, "exact": True, "spread": 0.0}, "counts": {}, "kernels": kernels}
    return {"native": count(native), "own": count(own)}


def _row(plan, board="rasp4b", ort_int8=4_000_000):
    counted = {"hyq_int8": _counted(2_000_000, 900_000), "ort_fp32": _counted(8_000_000, 7_900_000),
               "ort_int8": _counted(ort_int8, 3_000_000, {"MatMulIntegerToFloat": 18})}
    layers = [{"layer": "stem.conv", "op": "conv2d", "macs": 600_000}, {"layer": "head.fc", "op": "linear",
                                                                         "macs": 400_000}]
    return versus.benchmark_row(BENCH_ROW, board, plan, counted, 1_000_000, layers,
                                {"onnxruntime": "1.32.0", "tvm": "0.27.0"})


def test_benchmark_row_has_the_fields_and_ratios(plan):
    row = _row(plan)
    assert {k: row[k] for k in ("model", "board", "img_size", "hyq_int8_instructions", "ort_fp32_instructions",
                                "ort_int8_instructions", "macs", "bitexact")} == {
        "model": "mobilevit_xxs", "board": "rasp4b", "img_size": 64, "hyq_int8_instructions": 2_000_000,
        "ort_fp32_instructions": 8_000_000, "ort_int8_instructions": 4_000_000, "macs": 1_000_000, "bitexact": True}
    assert row["hyq_over_ort_fp32"] == 0.25 and row["hyq_over_ort_int8"] == 0.5
    assert row["instructions_per_mac"] == {"hyq_int8": 2.0, "ort_fp32": 8.0, "ort_int8": 4.0}
    assert row["exact"] == {"hyq_int8": True, "ort_fp32": True, "ort_int8": True}
    assert row["own_instructions"] == {"hyq_int8": 900_000, "ort_fp32": 7_900_000, "ort_int8": 3_000_000}
    assert row["process_instructions"]["ort_fp32"] == 8_001_000
    assert row["ort_int8_kernels"] == {"MatMulIntegerToFloat": 18}
    assert row["hyq_int8_rpc_instructions"] == 2_000_000 and row["hyq_int8_runtime_instructions"] == 1_000_000
    assert row["emulated"] is True and "EMULATED" in row["note"] and row["qemu_cpu"] == "cortex-a72"


def test_reports_replace_the_row_of_the_same_model_board_and_size(tmp_path, plan):
    versus.write_reports(tmp_path, "rasp4b", _row(plan))
    other = QuantPlan.from_json({**plan.to_json(), "model": {**plan.model, "img_size": 128}})
    versus.write_reports(tmp_path, "rasp4b", _row(other))
    json_path, md_path = versus.write_reports(tmp_path, "rasp4b", _row(plan, ort_int8=5_000_000))
    report = json.loads(json_path.read_text())
    assert report["emulated"] is True and report["board"] == "rasp4b"
    assert [(r["img_size"], r["ort_int8_instructions"]) for r in report["rows"]] == [(64, 5_000_000), (128, 4_000_000)]
    md = md_path.read_text()
    assert md.startswith("# Board benchmark (EMULATED): rasp4b")
    assert ("| mobilevit_xxs | rasp4b (EMULATED, -cpu cortex-a72) | 64 | minmax W8A8 | 2,000,000 | 8,000,000 | "
            "5,000,000 |") in md
    assert "| stem.conv | conv2d | 600,000 | 60.00 |" in md
    assert not list(tmp_path.glob(".*.tmp"))


def test_compare_ort_needs_icount_boards(tmp_path):
    with pytest.raises(HyqError, match=r"--compare-ort needs emulated boards started with --icount under key 'rasp4b'"):
        versus.check_icount_key("127.0.0.1:9", "rasp4b", tmp_path / "none.json")
    state = {"tracker": None, "boards": []}
    (tmp_path / "s.json").write_text(json.dumps(state))
    r = subprocess.run([sys.executable, "-m", "hyq_tvm.bench", "--tracker", "127.0.0.1:9", "--key", "rasp4b",
                        "--artifact", str(tmp_path), "--devices-state", str(tmp_path / "s.json"), "--compare-ort"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--compare-ort needs emulated boards" in lines[0], r.stderr


def test_compare_ort_needs_a_hyq_count():
    with pytest.raises(HyqError, match="the bench counted no hyq-tvm instructions: board not started with --icount"):
        versus.compare_ort({**BENCH_ROW, "instructions": None,
                            "instructions_note": "board not started with --icount"}, ROOT / "artifacts" / "none")
