"""Accuracy of a classifier over a data loader."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm


@torch.no_grad()
def predictions(model: nn.Module, batches: DataLoader, desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predicted classes and true labels over `batches`."""
    model.eval()
    preds, labels = [], []
    for images, target in tqdm(batches, desc=desc, leave=False, unit="batch"):
        preds.append(model(images).argmax(dim=1))
        labels.append(target)
    return torch.cat(preds), torch.cat(labels)


def top1(model: nn.Module, batches: DataLoader, desc: str = "eval") -> float:
    """Top-1 accuracy in percent."""
    pred, label = predictions(model, batches, desc)
    return 100.0 * (pred == label).float().mean().item()
