"""Datasets: Fashion-MNIST (IDX files) for the proxies, ImageFolder trees (ImageNet layout), and the
seeded, class-balanced subsets that --limit style options take of them."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import HyqError, check_positive

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN = (0.2860,) * 3
FASHION_MNIST_STD = (0.3530,) * 3
CALIBRATION_IMAGES = 32
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}  # an ImageFolder tree's split folders, preferred first
_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


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
        self.targets = torch.from_numpy(read_idx(label_file).astype(np.int64))
        if len(self.images) != len(self.targets):
            raise HyqError(f"{root}: {len(self.images)} images but {len(self.targets)} labels")
        self.img_size = img_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div(255.0)[None, None]
        image = F.interpolate(image, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False, antialias=True)[0].expand(3, -1, -1)
        return (image - self.mean) / self.std, int(self.targets[index])


def _image_folder(root: Path, split: str, img_size: int, mean, std) -> Dataset:
    """The `split` of an ImageFolder tree: its train/ (test: val/, else test/) folder, else the tree itself.
    A folder whose classes are named like splits is refused: it is a tree without that split."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    folder = next((root / name for name in SPLIT_FOLDERS[split] if (root / name).is_dir()), root)
    splits = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.lower() in _SPLIT_NAMES)
    if splits:
        where = f"{root} has no {' or '.join(f'{n}/' for n in SPLIT_FOLDERS[split])} folder and its" \
            if folder == root else f"{folder}:"
        raise HyqError(f"{where} classes look like splits ({', '.join(splits)}): give a tree whose train/ and"
                       f" val/ (or test/) folders hold one folder of images per class")
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
        return _image_folder(root, split, img_size, mean, std)
    raise HyqError(f"dataset path {root} is not a folder")


def calibration_set(dataset: Dataset, count: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:
    """A deterministic batch of `count` images drawn from `dataset`."""
    check_positive(count, "the number of calibration images")
    if count > len(dataset):
        raise HyqError(f"asked for {count} calibration images but the dataset has {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([dataset[int(i)][0] for i in order])


def balanced_indices(labels, count: int, seed: int = 0) -> np.ndarray:
    """`count` indices into `labels`, ascending, drawn at random (seeded) one class after the other, so that
    each class gives count // classes of its items or one more (all of them if it has fewer)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    classes, cls = np.unique(labels[order], return_inverse=True)
    by_class = np.argsort(cls, kind="stable")
    rank = np.empty(len(order), np.int64)  # the place of each drawn item within its class
    rank[by_class] = np.arange(len(order)) - np.searchsorted(cls[by_class], cls[by_class])
    turn = rank * len(classes) + rng.permutation(len(classes))[cls]
    return np.sort(order[np.argsort(turn, kind="stable")[:count]])


def subset(dataset: Dataset, count: int | None, seed: int = 0) -> Dataset:
    """`dataset`, or `count` of its items balanced over its classes (balanced_indices) when it has more."""
    check_positive(count, "the number of images")
    if count is None or count >= len(dataset):
        return dataset
    return Subset(dataset, balanced_indices(dataset.targets, count, seed).tolist())


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of `dataset`."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


def test_loader(data: str | Path | None, img_size: int, mean, std, limit: int | None = None,
                batch_size: int = 250) -> DataLoader:
    """Batches of the test split (a class-balanced subset of `limit` images when given, see `subset`)."""
    return loader(subset(open_dataset(data, "test", img_size, mean, std), limit), batch_size)
