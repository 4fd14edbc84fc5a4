"""Proxy training: a zoo model trained on the CPU into a checkpoint (safetensors with the model's metadata).

Resumable: the training state is saved every few hundred steps and at each epoch end under the work
folder; training again with the same settings continues where it stopped.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from . import data, zoo
from .errors import HyqError, check_positive
from .fileio import atomic_path, write_json
from .metrics import top1

PROXY_SUMMARY = zoo.CHECKPOINT_DIR / "proxies.json"


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how (the options of python -m hyq_tvm.train)."""

    model: str = zoo.DEFAULT_MODEL
    data: str | None = None
    img_size: int = 64
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    train_images: int | None = None
    test_images: int | None = None
    seed: int = 0
    threads: int = 0
    save_every: int = 200
    work_dir: Path | None = None
    output: Path | None = None


def _save_state(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(args: "TrainConfig") -> dict:
    """Train, evaluate on the test split and write the checkpoint; returns its summary."""
    zoo.model_spec(args.model)
    zoo.check_img_size(args.img_size)
    for flag in ("epochs", "batch_size", "train_images", "test_images", "save_every"):
        check_positive(getattr(args, flag), f"--{flag.replace('_', '-')}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    is_fmnist = args.data is None or data._find_idx(Path(args.data), "t10k-images-idx3-ubyte") is not None
    mean, std = (data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD) if is_fmnist else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_set = data.open_dataset(args.data, "train", args.img_size, mean, std)
    num_classes = len(getattr(train_set, "classes", None) or torch.unique(train_set.targets))
    dataset_name = getattr(train_set, "name", str(args.data))
    train_set = data.subset(train_set, args.train_images, args.seed)
    test_set = data.subset(data.open_dataset(args.data, "test", args.img_size, mean, std), args.test_images)
    model = zoo.build_model(args.model, num_classes, args.img_size)

    steps_per_epoch = -(-len(train_set) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    work_dir = args.work_dir or Path("runs/train") / args.model
    state_path = work_dir / "state.pt"
    step, seconds = 0, 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["config"] != _config(args):
            raise HyqError(f"{state_path} holds a run with other settings; remove it or pass another --work-dir")
        model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"]); step, seconds = state["step"], state["seconds"]
        tqdm.write(f"resuming {args.model} at step {step} of {args.epochs * steps_per_epoch}")

    def snapshot():
        _save_state(state_path, config=_config(args), model=model.state_dict(), optimizer=optimizer.state_dict(),
                    schedule=schedule.state_dict(), step=step, seconds=seconds)

    model.train()
    bar = tqdm(total=args.epochs * steps_per_epoch, initial=step, desc=f"train {args.model}", unit="step")
    while step < args.epochs * steps_per_epoch:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = data.loader(train_set, args.batch_size, shuffle=True, seed=args.seed * 1000 + epoch)
        for i, (images, labels) in enumerate(batches):
            if i < skip:
                continue
            start = time.perf_counter()
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step(); schedule.step()
            step += 1
            seconds += time.perf_counter() - start
            bar.update(1); bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            if step % args.save_every == 0 or step % steps_per_epoch == 0:
                snapshot()
    bar.close()

    accuracy = top1(model, data.loader(test_set, 256), desc="test")
    output = args.output or zoo.proxy_checkpoint(args.model)
    metadata = {"hyq_tvm.model": args.model, "hyq_tvm.num_classes": str(num_classes),
                "hyq_tvm.img_size": str(args.img_size), "hyq_tvm.mean": json.dumps(list(mean)),
                "hyq_tvm.std": json.dumps(list(std)), "hyq_tvm.dataset": dataset_name,
                "hyq_tvm.top1": f"{accuracy:.2f}", "hyq_tvm.epochs": str(args.epochs)}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("attention_bias_idxs")}
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    summary = {"model": args.model, "dataset": metadata["hyq_tvm.dataset"], "img_size": args.img_size,
               "epochs": args.epochs, "top1": round(accuracy, 2), "train_seconds": round(seconds, 1),
               "train_images": len(train_set), "test_images": len(test_set), "checkpoint": str(output)}
    if args.output is None:
        proxies = json.loads(PROXY_SUMMARY.read_text()) if PROXY_SUMMARY.is_file() else {}
        proxies[args.model] = {k: v for k, v in summary.items() if k != "checkpoint"}
        write_json(PROXY_SUMMARY, dict(sorted(proxies.items())))
    return summary


def _config(args: "TrainConfig") -> dict:
    return {k: v for k, v in asdict(args).items() if k in ("model", "data", "img_size", "epochs", "batch_size", "lr", "seed", "train_images")}
