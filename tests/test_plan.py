import copy
import dataclasses
import json

import pytest
import torch

from hyq_tvm import zoo
from hyq_tvm.errors import HyqError
from hyq_tvm.quant.baselines.minmax import calibrate_minmax
from hyq_tvm.quant.modules import prepare
from hyq_tvm.quant.plan import QuantPlan, TensorQuant, apply_plan, plan_layers


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = zoo.build_model("mobilevit_xxs", 10, 64).eval()
    images = torch.randn(4, 3, 64, 64)
    prepare(model, images[:1])
    fresh = copy.deepcopy(model)
    calibrate_minmax(model, images, wbits=6, abits=8)
    bridges = zoo.find_bridge_blocks(model)
    plan = QuantPlan(model={"name": "mobilevit_xxs", "num_classes": 10, "img_size": 64,
                            "input_shape": [1, 3, 64, 64], "weights_sha256": "ab" * 32},
                     calibration={"method": "minmax", "wbits": 6, "abits": 8},
                     layers=plan_layers(model, bridges), bridge_blocks=[list(b.members) for b in bridges])
    return model, fresh, plan, images


def test_round_trip_reproduces_the_quantized_model(calibrated, tmp_path):
    model, fresh, plan, images = calibrated
    plan.save(tmp_path / "plan.json")
    loaded = QuantPlan.load(tmp_path / "plan.json")
    assert loaded.layers == plan.layers
    target = copy.deepcopy(fresh)
    apply_plan(target, loaded, "ab" * 32)
    assert torch.equal(target(images), model(images))
    entry = loaded.layers["stages.2.1.conv_1x1"]
    assert entry.bridge == 0 and entry.weight.bits == 6 and entry.inputs[0].bits == 8
    assert loaded.layers["stages.2.1.transformer.0.attn.matmul1"].op == "matmul"


def _broken(plan, edit):
    obj = json.loads(json.dumps(plan.to_json()))
    edit(obj)
    return obj


@pytest.mark.parametrize("edit,message", [
    (lambda o: o.update(format="onnx"), "not a hyq-tvm QuantPlan"),
    (lambda o: o.update(version=99), "plan version 99"),
    (lambda o: o["model"].pop("weights_sha256"), "model.weights_sha256 is missing"),
    (lambda o: o["layers"]["stem.conv"]["weight"].update(bits=9), "bits must be 2 to 8"),
    (lambda o: o["layers"]["stem.conv"]["inputs"][0].update(zero_point=[300]), r"zero points must be integers in \[-128, 127\]"),
    (lambda o: o["layers"]["stem.conv"]["inputs"][0].update(scale=[-1.0]), "positive finite"),
    (lambda o: o["layers"]["stem.conv"].update(op="pool"), "op must be one of"),
    (lambda o: o["layers"]["stem.conv"]["inputs"][0].pop("axis"), r"layers.stem.conv.inputs\[0\]: field 'axis' is missing"),
    (lambda o: o["layers"]["stem.conv"]["weight"].update(scales=[1.0]), r"layers.stem.conv.weight: unknown field 'scales'"),
    (lambda o: o["layers"]["stem.conv"].update(weight=None), r"layers.stem.conv: a conv2d layer needs weight quantizer"),
])
def test_invalid_plans_are_refused(calibrated, edit, message):
    with pytest.raises(HyqError, match=message):
        QuantPlan.from_json(_broken(calibrated[2], edit))


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=1), "bits must be 2 to 8"),
    (dict(granularity="channel", axis=None, scale=(1.0, 2.0), zero_point=(0, 0)), "needs an integer axis"),
    (dict(scale=(0.5, 0.5), zero_point=(3, 3)), "exactly one scale"),
    (dict(symmetric=True, zero_point=(3,)), "symmetric quantizer has zero points of 0"),
])
def test_a_tensor_quantizer_validates_itself_on_construction(kwargs, message):
    good = dict(bits=8, symmetric=False, granularity="tensor", axis=1, scale=(0.5,), zero_point=(3,))
    assert TensorQuant(**good).params().zero_point.item() == 3
    with pytest.raises(HyqError, match=message):
        TensorQuant(**{**good, **kwargs})
    with pytest.raises(dataclasses.FrozenInstanceError):
        TensorQuant(**good).bits = 4


def test_plan_for_other_weights_or_model_is_refused(calibrated):
    _, fresh, plan, _ = calibrated
    with pytest.raises(HyqError, match="calibrated for other weights"):
        apply_plan(copy.deepcopy(fresh), plan, "cd" * 32)
    partial = QuantPlan.from_json(_broken(plan, lambda o: o["layers"].pop("stem.conv")))
    with pytest.raises(HyqError, match="has no entry for layer 'stem.conv'"):
        apply_plan(copy.deepcopy(fresh), partial, None)


def test_corrupt_plan_file(tmp_path):
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(HyqError, match="is not valid JSON"):
        QuantPlan.load(tmp_path / "plan.json")
