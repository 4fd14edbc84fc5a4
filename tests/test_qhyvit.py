import pytest
import torch

from hyq_tvm import data
from hyq_tvm.errors import HyqError
from hyq_tvm.quant import calibrate as calibration
from hyq_tvm.quant.calibrate import calibrate
from hyq_tvm.metrics import top1
from hyq_tvm.quant.qhyvit import _grid_search


def test_grid_search_finds_each_channels_minimum():
    size, targets = 100, torch.tensor([3, 50, 97, 0])
    calls = []

    def error_at(index):
        calls.append(index)
        return (index - targets).float().pow(2)

    index, error = _grid_search(size, error_at, channels=4)
    assert index.tolist() == targets.tolist() and error.tolist() == [0, 0, 0, 0]
    assert len(calls) == 21  # coarse every 10th point, then the 11 within 5 of each channel's best


def test_calibration_that_would_not_fit_in_memory_is_refused_before_loading_images(monkeypatch, proxy):
    from hyq_tvm.quant.prepare import prepared_model

    model, info = prepared_model(proxy, None)
    minmax, qhyvit = (calibration.calibration_bytes(model, info.img_size, m) for m in ("minmax", "qhyvit"))
    assert 3 * 64 * 64 * 4 < minmax < qhyvit
    monkeypatch.setattr(calibration, "available_bytes", lambda: 32 * qhyvit - 1)
    monkeypatch.setattr(calibration.data, "open_dataset", lambda *_: pytest.fail("images were loaded"))
    with pytest.raises(HyqError, match=r"^qhyvit calibration on 32 images of 64x64 needs about [\d.]+ GiB \([\d.]+ MiB"
                                       r" per image\), more than the [\d.]+ GiB of memory available: use fewer images"):
        calibrate(proxy, images=32)
    with pytest.raises(HyqError, match="--images must be at least 1, got -3"):
        calibrate(proxy, images=-3)


@pytest.mark.slow
def test_qhyvit_beats_minmax_at_w4a4(proxy):
    test = data.test_loader(None, 64, data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD, limit=1000)
    results = {}
    for method in ("minmax", "qhyvit"):
        plan, model = calibrate(proxy, method=method, wbits=4, abits=4, progress=False)
        results[method] = top1(model, test)
        assert plan.calibration["method"] == method and len(plan.layers) == 90
    choices = {(e.inputs[0].granularity, e.inputs[0].symmetric) for e in plan.layers.values()}
    assert len(choices) > 1  # the search really chooses per layer
    assert results["qhyvit"] > results["minmax"] + 5, results


@pytest.mark.slow
def test_full_mode_search_covers_norm_and_softmax_inputs():
    import copy
    from hyq_tvm import zoo
    from hyq_tvm.quant.modules import prepare, quant_layers
    from hyq_tvm.quant.plan import QuantPlan, apply_plan, plan_layers
    from hyq_tvm.quant.qhyvit import QHyViT, QHyViTConfig

    model = zoo.build_model("mobilevit_xxs", 10, 64).eval()
    twin = copy.deepcopy(model)
    images = torch.randn(2, 3, 64, 64)
    prepare(model, images[:1], mode="full")
    bridges = zoo.find_bridge_blocks(model)
    report = QHyViT(model, bridges, QHyViTConfig(candidates=4, rounds=1)).calibrate(images, progress=False)
    assert set(report.choices) == set(quant_layers(model))
    assert report.choices["stages.2.1.transformer.0.attn.softmax0"].granularity == "tensor"
    assert {c.bridge for c in report.choices.values()} == {None, 0, 1, 2}
    plan = QuantPlan(model={"name": "mobilevit_xxs", "num_classes": 10, "img_size": 64,
                            "input_shape": [1, 3, 64, 64], "weights_sha256": "0" * 64},
                     calibration={"mode": "full"}, layers=plan_layers(model, bridges))
    plan = QuantPlan.from_json(plan.to_json())
    assert plan.layers["stages.2.1.transformer.0.norm1"].op == "norm"
    prepare(twin, images[:1], mode="full")
    apply_plan(twin, plan, None)
    assert torch.equal(twin(images), model(images))
