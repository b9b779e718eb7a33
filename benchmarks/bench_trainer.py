"""Benchmark: zooscan's training loop vs the paper's ``train_model`` (VGG-11, CIFAR-10 size).

The paper's loop (RheaChowers/CNNs-First-Layer, ``utils.train_model`` with
``get_dataloader``) is re-implemented faithfully and run in the same process on the same
model (same initial weights): a ``DataLoader`` (batch 256, ``shuffle=True``,
``drop_last=True``, 3 workers (at most the CPU count), ``pin_memory`` on CUDA) over a
CPU ``TensorDataset`` of normalised images, fp32, ``SGD(lr=0.01)`` without momentum,
``.to(device)`` per batch, ``loss.item()`` twice per step and a batch accuracy summed on
the device, a test pass every 5 epochs. (The original decodes CIFAR PNGs and applies
``ToTensor``/``Normalize`` per image in the workers; a ``TensorDataset`` is cheaper, so this
baseline is if anything flattered.)

zooscan's loop (``zooscan_builtins.trainer.loop.train``) trains the same model with the
same optimiser, batch size and epochs, with the data resident on the device, channels-last,
bf16 autocast on CUDA, no per-step host synchronisation, and optionally ``torch.compile``.

Data: CIFAR-10-sized (default 50 000 train + 10 000 test 32x32 RGB images, 10 classes):
the ``synthetic`` dataset's labelled splits when that plugin offers them, else random
32x32 crops of ten scikit-image photographs (the class is the photograph).

Printed: the training time of every epoch for both loops (evaluation excluded), the
steady-state ratio (mean over epochs after the first, which carries warm-up costs such as
cuDNN autotuning and compilation), images per second, and the accuracies reached: train
accuracy as each loop reports it, and the test accuracy of both final models measured the
same way (fp32, eval mode) — the paper's code never recorded it.

Run: ``.venv/bin/python benchmarks/bench_trainer.py`` (full scale on a GPU; a tiny scale on
a CPU-only machine), or e.g. ``--device cpu --n 1024 --epochs 1 --width 0.25``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from zooscan import plugins
from zooscan.errors import ZooscanError
from zooscan.records import LabelledImages
from zooscan_builtins.trainer.data import Prepared, prepare
from zooscan_builtins.trainer.loop import TrainConfig, TrainResult, resolve_device, train
from zooscan_builtins.trainer.models import build_model

PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "ihc", "motorcycle_left",
          "retina", "rocket", "brick", "grass")  # fmt: skip
BATCH = 256
LR = 0.01
PAPER_TEST_EVERY = 5


@dataclass
class LoopTimes:
    """What one loop measured."""

    epoch_seconds: list[float]
    eval_seconds: float
    train_acc: float
    test_acc: float
    images_per_epoch: int


# --------------------------------------------------------------------------- data


def photo_crops(count: int, seed: int, size: int = 32, side: int = 96) -> LabelledImages:
    """``count`` random ``size``-pixel crops (random horizontal flips) of ten photographs,
    each resized to a shorter side of ``side``; the label is the photograph."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(PHOTOS)
    rng.shuffle(labels)
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    for label, name in enumerate(PHOTOS):
        pil = Image.open(sorted(folder.glob(f"{name}.*"))[0]).convert("RGB")
        scale = side / min(pil.size)
        photo = np.asarray(pil.resize((round(pil.width * scale), round(pil.height * scale))))
        picked = np.flatnonzero(labels == label)
        tops = rng.integers(0, photo.shape[0] - size + 1, len(picked))
        lefts = rng.integers(0, photo.shape[1] - size + 1, len(picked))
        rows = tops[:, None] + np.arange(size)[None, :]
        cols = lefts[:, None] + np.arange(size)[None, :]
        crops = photo[rows[:, :, None], cols[:, None, :]]  # (k, size, size, 3)
        flip = rng.random(len(picked)) < 0.5
        crops[flip] = crops[flip, :, ::-1]
        images[picked] = crops.transpose(0, 3, 1, 2)
    return LabelledImages(images, labels, PHOTOS, f"bench-photo-crops-{count}-{seed}")


def load_data(n_train: int, n_test: int) -> tuple[Prepared, str]:
    """The benchmark's training and test data, normalised, and a description of it."""
    try:
        train_set = plugins.open_labelled("synthetic", "train", count=n_train)
        test_set = plugins.open_labelled("synthetic", "test", count=n_test)
        source = "synthetic dataset"
    except ZooscanError:
        train_set, test_set = photo_crops(n_train, seed=0), photo_crops(n_test, seed=1)
        source = "random crops of 10 photographs"
    classes = len(train_set.classes)
    return prepare(train_set, test_set), f"{source}, {classes} classes"


# --------------------------------------------------------------------------- the paper's loop


def paper_train(
    model: torch.nn.Module, data: Prepared, epochs: int, device: torch.device, workers: int
) -> LoopTimes:
    """``utils.train_model`` of the paper's code, with its ``get_dataloader`` settings."""
    pin = device.type == "cuda"
    train_loader = DataLoader(
        TensorDataset(data.x_train, data.y_train), batch_size=BATCH, shuffle=True,
        drop_last=True, num_workers=workers, pin_memory=pin,
    )  # fmt: skip
    test_batch = min(10_000, len(data.y_test))  # the paper: 10 000 (its test set's size)
    test_loader = DataLoader(
        TensorDataset(data.x_test, data.y_test), batch_size=test_batch, shuffle=True,
        drop_last=True, num_workers=workers, pin_memory=pin,
    )  # fmt: skip
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss = torch.nn.CrossEntropyLoss()
    losses: list[float] = []
    epoch_seconds, eval_seconds, train_acc = [], 0.0, 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        epoch_loss, epochlen, avgacc = 0.0, 0, torch.zeros((), device=device)
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            outp = model(x)
            batch_loss = loss(outp, y)
            with torch.no_grad():
                avgacc += (outp.argmax(dim=1) == y).float().mean()  # torchmetrics Accuracy
            losses.append(batch_loss.item())
            epoch_loss += batch_loss.item()
            epochlen += 1
            batch_loss.backward()
            optimizer.step()
        _sync(device)
        epoch_seconds.append(time.perf_counter() - start)
        train_acc = avgacc.item() / epochlen
        if epoch % PAPER_TEST_EVERY == 0:
            start = time.perf_counter()
            _paper_test_pass(model, test_loader, loss, device)
            eval_seconds += time.perf_counter() - start
    test_acc = evaluate(model, data, device)
    return LoopTimes(epoch_seconds, eval_seconds, train_acc, test_acc, epochlen * BATCH)


def _paper_test_pass(model, test_loader, loss, device) -> None:
    model.eval()
    with torch.no_grad():
        for x, y in test_loader:
            x, y = x.to(device), y.to(device)
            outp = model(x)
            loss(outp, y).item()
            (outp.argmax(dim=1) == y).float().mean()
    model.train()


# --------------------------------------------------------------------------- zooscan's loop


def zooscan_train(
    model: torch.nn.Module, data: Prepared, epochs: int, device: torch.device, compile_: bool
) -> tuple[LoopTimes, TrainResult]:
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, optimizer="sgd", lr=LR, loss="ce",
                      eval_every=0, device=device.type, compile=compile_)  # fmt: skip
    result = train(model, data, cfg)
    times = LoopTimes(
        epoch_seconds=result.epoch_seconds.tolist(),
        eval_seconds=result.seconds - result.train_seconds,
        train_acc=float(result.metrics["train_acc"][-1]),
        test_acc=evaluate(model, data, device),
        images_per_epoch=result.total_steps * result.batch_size // epochs,
    )
    return times, result


def evaluate(model: torch.nn.Module, data: Prepared, device: torch.device) -> float:
    """Test accuracy of a final model, measured the same way for both loops (fp32)."""
    model.eval()
    correct = torch.zeros((), device=device)
    with torch.no_grad():
        for start in range(0, len(data.y_test), 1000):
            x = data.x_test[start : start + 1000].to(device)
            y = data.y_test[start : start + 1000].to(device)
            correct += (model(x).float().argmax(dim=1) == y).sum()
    model.train()
    return float(correct.item()) / len(data.y_test)


def warm_up(args: argparse.Namespace, data: Prepared, device: torch.device) -> None:
    """Pay the process's one-time costs (CUDA context, kernel libraries, the optimiser's
    first import) before timing, so neither loop is billed for them by running first."""
    model = build_model(args.arch, num_classes=data.num_classes, width=args.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data.x_train[:BATCH].to(device), data.y_train[:BATCH].to(device)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    _sync(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- report


def steady(seconds: list[float]) -> float:
    """Mean epoch time after the first (warm-up) epoch; the only epoch when there is one."""
    return statistics.fmean(seconds[1:] if len(seconds) > 1 else seconds)


def report(args, device: torch.device, described: str, paper: LoopTimes, ours: LoopTimes,
           result: TrainResult) -> None:  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\n{args.arch} (width {args.width:g}) on {args.n} train / {args.n_test} test 32x32 RGB "
        f"images ({described})\n{device.type} ({name}, {torch.get_num_threads()} CPU threads), "
        f"{args.epochs} epoch(s), batch {BATCH}, SGD lr {LR}, paper loader workers "
        f"{args.workers}; zooscan: amp={result.amp}, channels_last={result.channels_last}, "
        f"compile={result.compiled}\n"
    )
    print(f"{'epoch':>14} {'paper loop (s)':>15} {'zooscan (s)':>12} {'speed-up':>9}")
    for index, (p, z) in enumerate(zip(paper.epoch_seconds, ours.epoch_seconds, strict=True)):
        print(f"{index + 1:>14} {p:>15.3f} {z:>12.3f} {p / z:>8.2f}x")
    p_steady, z_steady = steady(paper.epoch_seconds), steady(ours.epoch_seconds)
    label = "steady mean" if args.epochs > 1 else "epoch"
    print(f"{label:>14} {p_steady:>15.3f} {z_steady:>12.3f} {p_steady / z_steady:>8.2f}x")
    p_ips, z_ips = paper.images_per_epoch / p_steady, ours.images_per_epoch / z_steady
    print(f"{'images/s':>14} {p_ips:>15.0f} {z_ips:>12.0f}")
    print(f"{'eval time (s)':>14} {paper.eval_seconds:>15.3f} {ours.eval_seconds:>12.3f}")
    print(f"{'train acc':>14} {paper.train_acc:>15.3f} {ours.train_acc:>12.3f}")
    print(f"{'test acc':>14} {paper.test_acc:>15.3f} {ours.test_acc:>12.3f}")
    print(
        "\ntrain acc: the paper's running mean over its last epoch; zooscan's on the whole "
        "training set in eval mode.\ntest acc: both final models, fp32, eval mode. "
        f"Steady-state speed-up: {p_steady / z_steady:.2f}x"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--n", type=int, help="training images (default 50 000 on CUDA, 1024 on CPU)"
    )
    parser.add_argument("--n-test", type=int, help="test images (default n/5)")
    parser.add_argument("--epochs", type=int, help="epochs (default 3 on CUDA, 1 on CPU)")
    parser.add_argument(
        "--width", type=float, help="width multiplier (default 1 on CUDA, 0.25 on CPU)"
    )
    parser.add_argument("--arch", default="vgg11", help="architecture (default vgg11)")
    parser.add_argument(
        "--workers", type=int, default=min(3, os.cpu_count() or 1),
        help="paper DataLoader workers (default 3 as the paper, at most the CPU count)",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile zooscan's model")
    parser.add_argument("--seed", type=int, default=0, help="initial weights (both loops)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.n = args.n or (50_000 if gpu else 1024)
    args.n_test = args.n_test or max(1, args.n // 5)
    args.epochs = args.epochs or (3 if gpu else 1)
    args.width = args.width or (1.0 if gpu else 0.25)
    started = time.perf_counter()
    data, described = load_data(args.n, args.n_test)
    print(f"data ready in {time.perf_counter() - started:.1f}s: {described}", flush=True)
    warm_up(args, data, device)
    models = [
        build_model(args.arch, num_classes=data.num_classes, width=args.width, seed=args.seed)
        for _ in range(2)
    ]
    paper = paper_train(models[0], data, args.epochs, device, args.workers)
    ours, result = zooscan_train(models[1], data, args.epochs, device, args.compile)
    report(args, device, described, paper, ours, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
