"""QDQ ONNX export: the plan's quantization as QuantizeLinear / DequantizeLinear, run by onnxruntime."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from hyq_tvm import data
from hyq_tvm.artifact import METADATA, ONNX, PLAN
from hyq_tvm.quant.calibrate import calibrate
from hyq_tvm.build import compile_plan
from hyq_tvm.errors import HyqError
from hyq_tvm.quant.prepare import quantized_model
from hyq_tvm.onnx_qdq import export_onnx, onnx_session, qdq_census
from hyq_tvm.quant.marks import roles


@pytest.fixture(scope="module")
def plan_w4():
    """mobilevit_xxs proxy, MinMax W4A4 from 8 calibration images: 4-bit values carried in int8."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return calibrate("mobilevit_xxs", method="minmax", wbits=4, abits=4, images=8, progress=False)[0]


@pytest.fixture(scope="module")
def onnx_file(plan_w4, tmp_path_factory):
    return export_onnx(plan_w4, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.mark.slow
def test_every_plan_tensor_becomes_a_qdq_pair(plan_w4, onnx_file):
    census = qdq_census(onnx_file)
    activations = sum(1 for entry in plan_w4.layers.values() for role in roles(entry.op) if role != "weight")
    weights = sum(1 for entry in plan_w4.layers.values() if "weight" in roles(entry.op))
    assert census["QuantizeLinear"] == activations
    assert census["DequantizeLinear"] == activations + weights
    assert census["Clip"] == activations  # 4-bit values kept in [-8, 7]
    graph = onnx.load(str(onnx_file)).graph
    clips = [n for n in graph.node if n.op_type == "Clip"]
    bounds = {n.name: (n.input[1], n.input[2]) for n in clips}
    assert len(bounds) == len(clips)
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == weights
    for w in int8_weights:
        values = onnx.numpy_helper.to_array(w)
        assert values.min() >= -8 and values.max() <= 7
    assert not [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4], \
        "a float conv weight is left in the QDQ model"
    tensors = sum(i.ByteSize() for i in graph.initializer)  # the file is its tensors plus a small graph
    assert onnx_file.stat().st_size < tensors + 250_000, (onnx_file.stat().st_size, tensors)


@pytest.mark.slow
def test_onnxruntime_computes_the_fake_quant_model(plan_w4, onnx_file):
    session = onnx_session(onnx_file)
    model = quantized_model(plan_w4).eval()
    info = plan_w4.model
    images = next(iter(data.test_loader(None, info["img_size"], info["mean"], info["std"], limit=8, batch_size=8)))[0]
    with torch.no_grad():
        expected = model(images).numpy()
    got = np.concatenate([session.run(None, {"input": x[None].numpy()})[0] for x in images])
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.slow
def test_compile_emits_onnx_beside_or_instead_of_the_library(plan_w4, tmp_path):
    out = compile_plan(plan_w4, "host", tmp_path / "onnx-only", emit=("onnx",))
    assert sorted(p.name for p in out.iterdir()) == sorted([ONNX, PLAN, METADATA])
    meta = json.loads((out / METADATA).read_text())
    assert meta["emit"] == ["onnx"] and meta["onnx"]["op_census"]["QuantizeLinear"] > 0
    assert set(meta["sha256"]) == {"onnx", "plan", "weights"}


def test_unknown_emit_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hyq_tvm.compile", "--emit", "tflite", "-o", str(tmp_path / "a")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'tflite'" in r.stderr
    with pytest.raises(HyqError, match="cannot emit nothing"):
        compile_plan(None, "host", tmp_path / "b", emit=())


@pytest.mark.slow
def test_compare_times_every_engine_against_the_tvm_graph(plan_w4, tmp_path):
    from hyq_tvm.cli import compare

    art = compile_plan(plan_w4, "host", tmp_path / "art", emit=("tvm", "onnx"))
    compare.main(["--artifact", str(art), "--repeat", "3", "--reports", str(tmp_path / "reports")])
    row = json.loads((tmp_path / "reports" / "host_latency.json").read_text())
    engines = {e["engine"]: e for e in row["engines"]}
    assert set(engines) == {"tvm_int8", "onnxruntime_qdq", "onnxruntime_fp32", "pytorch_fp32", "pytorch_fakequant"}
    assert engines["tvm_int8"]["ratio_to_tvm"] == 1.0
    assert all(e["latency_ms_median"] > 0 for e in engines.values())
    base = engines["tvm_int8"]["latency_ms_median"]
    assert all(abs(e["ratio_to_tvm"] - e["latency_ms_median"] / base) < 0.01 for e in engines.values())
    assert "| onnxruntime_qdq |" in (tmp_path / "reports" / "host_latency.md").read_text()


def test_compare_refuses_a_folder_that_is_not_an_artifact(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hyq_tvm.compare", "--artifact", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not an artifact folder" in r.stderr
