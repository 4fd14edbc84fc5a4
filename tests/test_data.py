import gzip
from pathlib import Path

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
    with pytest.raises(HyqError, match="the number of calibration images must be at least 1, got 0"):
        data.calibration_set(ds, 0)


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


def _tree(root, splits, classes=("cat", "dog", "fox")):
    from PIL import Image
    for split in splits:
        for i, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / cls / f"{split}.png")


@pytest.mark.parametrize("splits,test_folder", [(("train", "test"), "test"), (("train", "val"), "val"),
                                                (("train", "val", "test"), "val")])
def test_image_folder_takes_val_or_test_as_the_test_split(tmp_path, splits, test_folder):
    _tree(tmp_path, splits)
    for split, folder in (("train", "train"), ("test", test_folder)):
        ds = data.open_dataset(tmp_path, split, 32, (0.5,) * 3, (0.5,) * 3)
        assert ds.classes == ["cat", "dog", "fox"] and len(ds) == 3
        assert {Path(p).parent.parent.name for p, _ in ds.samples} == {folder}


def test_image_folder_whose_classes_look_like_splits_is_refused(tmp_path):
    _tree(tmp_path, ("train",))
    with pytest.raises(HyqError, match=r"has no val/ or test/ folder and its classes look like splits \(train\)"):
        data.open_dataset(tmp_path, "test", 32, (0.5,) * 3, (0.5,) * 3)
    _tree(tmp_path / "val", ("train", "test"))
    with pytest.raises(HyqError, match=r"val: classes look like splits \(test, train\)"):
        data.open_dataset(tmp_path, "test", 32, (0.5,) * 3, (0.5,) * 3)


def test_balanced_indices_spread_a_subset_over_the_classes():
    labels = np.repeat(np.arange(10), 100)  # sorted by class, like an ImageFolder tree
    chosen = data.balanced_indices(labels, 25, seed=0)
    assert len(chosen) == 25 and len(set(chosen)) == 25 and list(chosen) == sorted(chosen)
    assert sorted(np.bincount(labels[chosen], minlength=10)) == [2] * 5 + [3] * 5
    assert np.array_equal(chosen, data.balanced_indices(labels, 25, seed=0))
    assert not np.array_equal(chosen, data.balanced_indices(labels, 25, seed=1))
    assert np.bincount(labels[data.balanced_indices(labels, 200)]).tolist() == [20] * 10
    rare = np.array([0] * 2 + [1] * 100)  # a class with fewer items than its share gives all it has
    assert np.bincount(rare[data.balanced_indices(rare, 10)]).tolist() == [2, 8]


def test_test_loader_limit_is_a_balanced_subset(tiny_fmnist):
    ds = data.open_dataset(tiny_fmnist, "test", 32, data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD)
    ds.targets = torch.arange(10) // 5  # two classes, sorted
    sub = data.subset(ds, 4)
    assert len(sub) == 4 and sorted(int(ds.targets[i]) for i in sub.indices) == [0, 0, 1, 1]
    assert data.subset(ds, 10) is ds and data.subset(ds, None) is ds
    assert len(data.test_loader(tiny_fmnist, 32, data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD, 3).dataset) == 3
    with pytest.raises(HyqError, match="must be at least 1, got 0"):
        data.subset(ds, 0)
