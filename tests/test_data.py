import gzip

import numpy as np
import pytest
import torch

from hyq_tvm import data
from hyq_tvm.errors import HyqError


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


def test_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    assert (data.read_idx(tmp_path / "a.gz") == array).all()


def test_truncated_idx(tmp_path):
    _write_idx(tmp_path / "a.gz", np.zeros((4, 4)))
    with gzip.open(tmp_path / "a.gz", "rb") as f:
        raw = f.read()
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(raw[:-3])
    with pytest.raises(HyqError, match="truncated"):
        data.read_idx(tmp_path / "b.gz")


def test_fashion_mnist_images_are_normalised_rgb(tiny_fmnist):
    ds = data.open_dataset(tiny_fmnist, "test", 64, data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD)
    image, label = ds[0]
    assert image.shape == (3, 64, 64) and 0 <= label < 10
    assert torch.equal(image[0], image[2])


def test_calibration_set_is_deterministic(tiny_fmnist):
    ds = data.open_dataset(tiny_fmnist, "train", 32, data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD)
    a, b = data.calibration_set(ds, 8, seed=3), data.calibration_set(ds, 8, seed=3)
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, data.calibration_set(ds, 8, seed=4))
    with pytest.raises(HyqError, match="asked for 41 calibration images"):
        data.calibration_set(ds, 41)


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(HyqError, match="apt-get install dataset-fashion-mnist"):
        data.open_dataset(None, "test", 64, data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD)


def test_image_folder_with_timm_preprocessing(tmp_path):
    from PIL import Image
    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / "val" / cls / "a.jpg")
    ds = data.open_dataset(tmp_path, "test", 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    image, label = ds[1]
    assert image.shape == (3, 32, 32) and label == 1
