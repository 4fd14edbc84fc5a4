"""QDQ ONNX export: the plan's quantization as QuantizeLinear / DequantizeLinear, run by onnxruntime."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

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


@pytest.mark.slow
def test_uint8_activations_compute_the_same_numbers(plan_w4, onnx_file, tmp_path):
    u8_file = export_onnx(plan_w4, tmp_path / "u8.onnx", activations="uint8")
    graph = onnx.load(str(u8_file)).graph
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: onnx.numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    bounds = Counter((str(constants[n.input[1]].dtype), constants[n.input[1]].item(), constants[n.input[2]].item())
                     for n in graph.node if n.op_type == "Clip")
    matmuls = sum(1 for entry in plan_w4.layers.values() if entry.op == "matmul")
    assert bounds == {("uint8", 120, 135): len(plan_w4.layers),  # every input0 (per tensor here): [-8, 7] + 128
                      ("int8", -8, 7): matmuls}  # matmuls' second operands stay int8
    assert qdq_census(u8_file) == qdq_census(onnx_file)
    info = plan_w4.model
    images = next(iter(data.test_loader(None, info["img_size"], info["mean"], info["std"], limit=8, batch_size=8)))[0]
    expected, got = (np.concatenate([onnx_session(f).run(None, {"input": x[None].numpy()})[0] for x in images])
                     for f in (onnx_file, u8_file))
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_an_unknown_activation_carrier_is_refused(tmp_path):
    with pytest.raises(HyqError, match="activations must be one of int8, uint8, not 'int4'"):
        export_onnx(None, tmp_path / "m.onnx", activations="int4")


def test_unknown_emit_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hyq_tvm.compile", "--emit", "tflite", "-o", str(tmp_path / "a")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'tflite'" in r.stderr
    with pytest.raises(HyqError, match="cannot emit nothing"):
        compile_plan(None, "host", tmp_path / "b", emit=())
