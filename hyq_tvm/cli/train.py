"""Train a proxy checkpoint of a zoo model on the CPU (python -m hyq_tvm.train).

Resumable: the training state is saved every few hundred steps and at each epoch end under
--work-dir; running the same command again continues where it stopped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import zoo
from ..training import TrainConfig, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=zoo.DEFAULT_MODEL, help="zoo model name")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder or ImageFolder tree (default: Fashion-MNIST)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--train-images", type=int, default=None,
                   help="train on N training images only, drawn by --seed and balanced over the classes")
    p.add_argument("--test-images", type=int, default=None,
                   help="evaluate on N test images only, drawn at random and balanced over the classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--save-every", type=int, default=200, help="steps between resumable snapshots")
    p.add_argument("--work-dir", type=Path, default=None, help="resumable state (default runs/train/MODEL)")
    p.add_argument("-o", "--output", type=Path, default=None, help="checkpoint (default: the embedded proxy)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    summary = train(TrainConfig(**vars(parse_args(argv))))
    print(f"{summary['model']}: trained on {summary['train_images']} images, top-1 {summary['top1']:.2f}% on"
          f" {summary['test_images']} test images -> {summary['checkpoint']}")
