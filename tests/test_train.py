import json

from safetensors import safe_open

from hyq_tvm import training, zoo
from hyq_tvm.cli.train import parse_args


def test_training_resumes_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    args = ["--model", "mobilevit_xxs", "--epochs", "1", "--batch-size", "32", "--train-images", "64",
            "--test-images", "64", "--save-every", "1", "--work-dir", str(tmp_path / "run"),
            "-o", str(tmp_path / "proxy.safetensors")]
    first = training.train(training.TrainConfig(**vars(parse_args(args))))
    assert first["train_images"] == first["test_images"] == 64 and 0 <= first["top1"] <= 100
    state = tmp_path / "run" / "state.pt"
    assert state.is_file()
    second = training.train(training.TrainConfig(**vars(parse_args(args))))  # every step is done: nothing is trained twice
    assert "resuming mobilevit_xxs at step 2 of 2" in capsys.readouterr().out
    assert second["top1"] == first["top1"]
    with safe_open(str(tmp_path / "proxy.safetensors"), framework="pt") as f:
        assert f.metadata()["hyq_tvm.num_classes"] == "10" and f.metadata()["hyq_tvm.img_size"] == "64"
    model, info = zoo.load_model("mobilevit_xxs", tmp_path / "proxy.safetensors")
    assert info.num_classes == 10 and info.dataset == "fashion-mnist"


def test_embedded_proxies_are_recorded():
    proxies = json.loads(training.PROXY_SUMMARY.read_text())
    for name in ("mobilevit_xxs", "mobilevitv2_050", "efficientformer_l1", "efficientformerv2_s0"):
        assert zoo.proxy_checkpoint(name).is_file()
        assert proxies[name]["dataset"] == "fashion-mnist" and proxies[name]["top1"] > 85
