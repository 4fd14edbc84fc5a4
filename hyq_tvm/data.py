"""Datasets: Fashion-MNIST (IDX files) for the proxies, ImageFolder trees (ImageNet val layout)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import HyqError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN = (0.2860,) * 3
FASHION_MNIST_STD = (0.3530,) * 3
CALIBRATION_IMAGES = 32
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (gzipped or not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise HyqError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise HyqError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST as normalised 3-channel images at `img_size` x `img_size`."""

    name = "fashion-mnist"

    def __init__(self, root: Path, split: str, img_size: int,
                 mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD):
        image_file, label_file = (_find_idx(root, stem) for stem in _IDX_FILES[split])
        if image_file is None or label_file is None:
            raise HyqError(f"Fashion-MNIST not found in {root}: install it with `apt-get install"
                           f" dataset-fashion-mnist` or pass --data DIR holding the IDX files")
        self.images = torch.from_numpy(read_idx(image_file).copy())
        self.labels = torch.from_numpy(read_idx(label_file).astype(np.int64))
        if len(self.images) != len(self.labels):
            raise HyqError(f"{root}: {len(self.images)} images but {len(self.labels)} labels")
        self.img_size = img_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div(255.0)[None, None]
        image = F.interpolate(image, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False, antialias=True)[0].expand(3, -1, -1)
        return (image - self.mean) / self.std, int(self.labels[index])


def _image_folder(root: Path, split: str, img_size: int, mean, std) -> Dataset:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    folder = root / split if (root / split).is_dir() else root
    transform = create_transform(input_size=(3, img_size, img_size), is_training=False,
                                 mean=tuple(mean), std=tuple(std), interpolation="bicubic", crop_pct=0.875)
    try:
        dataset = ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise HyqError(f"{folder} is not an image folder (one sub-folder of images per class): {err}") from None
    dataset.name = f"imagefolder:{folder}"
    return dataset


def open_dataset(data: str | Path | None, split: str, img_size: int, mean, std) -> Dataset:
    """Fashion-MNIST (default, or a folder of IDX files) or an ImageFolder tree, for `split`."""
    root = Path(data) if data is not None else FASHION_MNIST_DIR
    if not root.exists():
        if data is None:
            raise HyqError(f"Fashion-MNIST not found in {root}: install it with `apt-get install"
                           f" dataset-fashion-mnist` or pass --data DIR")
        raise HyqError(f"dataset path {root} does not exist")
    if root.is_dir() and _find_idx(root, _IDX_FILES["test"][0]) is not None:
        return FashionMNIST(root, split, img_size, mean, std)
    if root.is_dir():
        return _image_folder(root, "val" if split == "test" else split, img_size, mean, std)
    raise HyqError(f"dataset path {root} is not a folder")


def calibration_set(dataset: Dataset, count: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:
    """A deterministic batch of `count` images drawn from `dataset`."""
    if count > len(dataset):
        raise HyqError(f"asked for {count} calibration images but the dataset has {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([dataset[int(i)][0] for i in order])


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
           limit: int | None = None) -> DataLoader:
    """Batches of `dataset` (its first `limit` items when given)."""
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


def test_loader(data: str | Path | None, img_size: int, mean, std, limit: int | None = None,
                batch_size: int = 250) -> DataLoader:
    """Batches of the test split (its first `limit` images when given)."""
    return loader(open_dataset(data, "test", img_size, mean, std), batch_size, limit=limit)
