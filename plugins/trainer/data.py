"""Turn labelled images into the float tensors the trainer trains on.

Pixels are normalised per channel with the **training set's** mean and standard deviation
on the ``[0, 1]`` scale, ``x = (pixel - mean[c]) / std[c]``; the constants are kept so
the analysis can map the trained filters back to pixel space (DESIGN §1).

Labels: ``"true"`` keeps them; ``"random"`` applies one fixed permutation of the training
labels, seeded (so every class keeps exactly its count, as the paper's
``random.shuffle(dataset.targets)``); test labels always stay true.

Targets: ``"class"`` gives int64 class indices; ``"binary"`` gives float32 ``+1`` for the
classes ``c < num_classes / 2`` and ``-1`` for the others: the scalar-output regression
task of the paper's linear theory (MSE on one number per image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zooscan.errors import UserError
from zooscan.records import LabelledImages

LABEL_MODES = ("true", "random")
TARGETS = ("class", "binary")
_CHUNK = 4096
"""Images normalised per chunk (bounds the float64 temporaries)."""


@dataclass
class Prepared:
    """Training and test tensors (CPU, float32 NCHW, normalised) with their labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    """int64 class indices (``target="class"``) or float32 ``±1`` (``target="binary"``);
    permuted when ``labels="random"``."""
    x_test: torch.Tensor
    y_test: torch.Tensor
    """Always the true labels, in the same encoding as ``y_train``."""
    num_classes: int
    """Classes of the dataset (also for the binary target, which merges them in two)."""
    mean: tuple[float, ...]
    """Per-channel mean of the training pixels, ``[0, 1]`` scale, dataset channel order (RGB)."""
    std: tuple[float, ...]
    """Per-channel standard deviation of the training pixels, ``[0, 1]`` scale."""
    classes: tuple[str, ...]
    permutation: np.ndarray | None
    """``labels="random"``: the permutation ``p`` with ``y_train = true_labels[p]``;
    ``None`` otherwise."""
    labels: str = "true"
    target: str = "class"
    train_key: str = ""
    """The training set's :attr:`LabelledImages.key` (identifies its patch basis)."""

    @property
    def output_dim(self) -> int:
        """The model output size this target needs: 1 (binary) or ``num_classes``."""
        return 1 if self.target == "binary" else self.num_classes

    @property
    def channels(self) -> int:
        """Input channels ``C``."""
        return int(self.x_train.shape[1])


def prepare(
    train: LabelledImages,
    test: LabelledImages,
    *,
    labels: str = "true",
    seed: int = 0,
    target: str = "class",
) -> Prepared:
    """Normalise ``train`` and ``test`` with the training statistics and encode the labels.

    ``labels="random"`` permutes the training labels once with
    ``numpy.random.default_rng(seed)``; ``target="binary"`` maps class ``c`` to ``+1`` if
    ``c < num_classes / 2`` else ``-1``. A channel with zero spread is scaled by 1.
    Raises :class:`UserError` for unknown modes or mismatched splits.
    """
    _check(train, test, labels, target)
    mean, std = channel_stats(train.images)
    permutation = None
    y_train = train.labels
    if labels == "random":
        permutation = np.random.default_rng(seed).permutation(len(train))
        y_train = y_train[permutation]
    num_classes = len(train.classes)
    return Prepared(
        x_train=normalise(train.images, mean, std),
        y_train=encode_labels(y_train, num_classes, target),
        x_test=normalise(test.images, mean, std),
        y_test=encode_labels(test.labels, num_classes, target),
        num_classes=num_classes,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        classes=tuple(train.classes),
        permutation=permutation,
        labels=labels,
        target=target,
        train_key=train.key,
    )


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (float64, ``[0, 1]`` scale) of uint8 NCHW
    images; a zero standard deviation is replaced by 1."""
    channels = images.shape[1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.clip(squares / count - mean**2, 0.0, None))
    return mean, np.where(std > 0, std, 1.0)


def normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """``(pixel/255 - mean[c]) / std[c]`` as a float32 CPU tensor of the images' shape."""
    out = np.empty(images.shape, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)[None, :, None, None]
    shift = (mean / std).astype(np.float32)[None, :, None, None]
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].astype(np.float32)
        out[start : start + _CHUNK] = chunk * scale - shift
    return torch.from_numpy(out)


def encode_labels(labels: np.ndarray, num_classes: int, target: str) -> torch.Tensor:
    """Class indices as int64 (``class``) or float32 ``±1`` (``binary``: ``+1`` for
    ``c < num_classes / 2``)."""
    if target == "binary":
        signs = np.where(labels < num_classes / 2, 1.0, -1.0).astype(np.float32)
        return torch.from_numpy(signs)
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))


def _check(train: LabelledImages, test: LabelledImages, labels: str, target: str) -> None:
    if labels not in LABEL_MODES:
        raise UserError(f"unknown labels {labels!r} (known: {', '.join(LABEL_MODES)})")
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"empty split: {len(train)} training and {len(test)} test images")
    if tuple(train.classes) != tuple(test.classes):
        raise UserError("the training and test splits have different classes")
    if train.images.shape[1] != test.images.shape[1]:
        raise UserError(
            f"the training images have {train.images.shape[1]} channels, "
            f"the test images {test.images.shape[1]}"
        )
    if target == "binary" and len(train.classes) < 2:
        raise UserError("the binary target needs at least 2 classes")
