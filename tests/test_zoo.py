import pytest
import torch
from safetensors.torch import save_file

from hyq_tvm import zoo
from hyq_tvm.errors import HyqError

BRIDGES_PER_FAMILY = {"mobilevit": 3, "mobilevitv2": 3, "efficientformer": 1, "efficientformerv2": 2}


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_bridge_block_count_matches_paper(name):
    spec = zoo.MODELS[name]
    model = zoo.build_model(name, num_classes=10, img_size=64 if spec.family != "efficientformerv2" else spec.input_size)
    bridges = zoo.find_bridge_blocks(model)
    assert len(bridges) == BRIDGES_PER_FAMILY[spec.family]
    modules = dict(model.named_modules())
    for bridge in bridges:
        assert all(m in modules for m in bridge.members)


def test_mobilevit_bridge_is_the_projection_into_the_transformer():
    model = zoo.build_model("mobilevit_xxs", 10, 64)
    first = zoo.find_bridge_blocks(model)[0]
    assert first.members == ("stages.2.1.conv_kxk", "stages.2.1.conv_1x1")
    assert first.contains("stages.2.1.conv_kxk.conv") and not first.contains("stages.2.1.conv_proj.conv")


def test_efficientformer_runs_at_proxy_resolution():
    model = zoo.build_model("efficientformer_l1", 10, 64).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_unknown_model_lists_supported():
    with pytest.raises(HyqError, match="unknown model 'resnet50'.*mobilevit_xxs.*efficientformerv2_l"):
        zoo.model_spec("resnet50")


def test_no_proxy_for_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(HyqError, match="--weights PATH or train one"):
        zoo.load_model("mobilevit_s")


def test_pth_checkpoint_in_timm_layout_loads(tmp_path):
    source = zoo.build_model("mobilevit_xxs", 1000, 256)
    path = tmp_path / "model.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model, info = zoo.load_model("mobilevit_xxs", path)
    assert info.num_classes == 1000 and info.img_size == 256
    x = torch.randn(1, 3, 256, 256)
    assert torch.allclose(model(x), source.eval()(x))


def test_checkpoint_of_another_model_names_first_bad_key(tmp_path):
    other = zoo.build_model("mobilevitv2_050", 10, 64)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(HyqError, match=r"does not fit mobilevit_xxs: (missing|unexpected) key '|has shape"):
        zoo.load_model("mobilevit_xxs", path)


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(HyqError, match="cannot read checkpoint"):
        zoo.load_model("mobilevit_xxs", path)


def test_a_checkpoint_loads_at_another_input_size():
    model, info = zoo.load_model("efficientformerv2_s0", img_size=128)
    assert info.img_size == 128 and model(torch.randn(1, 3, 128, 128)).shape == (1, 10)
    base, _ = zoo.load_model("efficientformerv2_s0")
    key = "stages.2.blocks.4.token_mixer.attention_biases"
    small, large = base.state_dict()[key], model.state_dict()[key]
    assert small.shape == (8, 4) and large.shape == (8, 16)
    # the 2x2 table of offsets (|dy|, |dx|) interpolated to 4x4: its mean is kept within the bicubic overshoot
    assert torch.allclose(large.mean(), small.mean(), atol=0.5 * small.std().item())
    with pytest.raises(HyqError, match="--img-size must be a multiple of 32"):
        zoo.load_model("mobilevit_xxs", img_size=100)
