"""What one training run is: :class:`RunSpec`, its defaults per architecture, its id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from zooscan.errors import UserError

OPTIMIZERS = ("sgd", "momentum", "adam")
LOSSES = ("ce", "mse")
LABELS = ("true", "random")
DEVICES = ("auto", "cpu", "cuda")
_NOT_IN_ID = ("device", "compile")
"""Fields that change how fast a run goes, not what it computes."""


@dataclass(frozen=True)
class RunSpec:
    """The full configuration of one training run.

    ``None`` fields take the architecture's default (:meth:`resolved`): the paper's
    setting for the linear CNN (fixed-sum head, MSE, full-batch gradient descent) and
    the paper's code's setting for the standard CNNs (cross-entropy, plain SGD,
    lr 0.01, batch 256).
    """

    arch: str = "vgg11"
    dataset: str = "synthetic"
    labels: str = "true"
    seed: int = 0
    width: float = 1.0
    first_kernel: int | None = None
    head: str | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int | None = -1
    """``None`` is full-batch gradient descent; ``-1`` the architecture's default."""
    epochs: int | None = None
    steps: int | None = None
    loss: str | None = None
    snapshot_every: int = 0
    freeze_first: bool = False
    image_size: int = 32
    n_train: int | None = None
    n_test: int | None = None
    device: str = "auto"
    compile: bool = False

    @property
    def is_linear(self) -> bool:
        """Whether this is the paper's linear CNN."""
        return self.arch == "linear"

    @property
    def scalar_output(self) -> bool:
        """The linear CNN with the fixed sum: one scalar output, ±1 targets (paper §4)."""
        return self.is_linear and self.head in (None, "sum")

    def resolved(self) -> RunSpec:
        """This spec with every default filled in and every value checked."""
        spec = self
        if spec.is_linear:
            spec = replace(
                spec,
                head=spec.head or "sum",
                loss=spec.loss or "mse",
                batch_size=None if spec.batch_size == -1 else spec.batch_size,
            )
        else:
            if spec.head is not None:
                raise UserError("--head applies to the linear CNN only")
            spec = replace(
                spec,
                loss=spec.loss or "ce",
                batch_size=256 if spec.batch_size == -1 else spec.batch_size,
                lr=0.01 if spec.lr is None else spec.lr,
            )
        if spec.epochs is None and spec.steps is None:
            spec = replace(spec, steps=300) if spec.is_linear else replace(spec, epochs=10)
        spec._check()
        return spec

    def _check(self) -> None:
        choices = {
            "optimizer": OPTIMIZERS,
            "loss": LOSSES,
            "labels": LABELS,
            "device": DEVICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}")
        if self.scalar_output and self.loss != "mse":
            raise UserError("the fixed-sum linear CNN has one scalar output: use --loss mse")
        if (self.epochs is None) == (self.steps is None):
            raise UserError("give exactly one of --epochs and --steps")
        for name in ("epochs", "steps", "batch_size", "n_train", "n_test", "first_kernel"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.width <= 0 or self.image_size < 8 or self.snapshot_every < 0:
            raise UserError("--width must be > 0, --image-size >= 8, --snapshot-every >= 0")
        if self.lr is not None and not self.lr > 0:
            raise UserError("--lr must be > 0")

    @property
    def exact_theory_applies(self) -> bool:
        """Whether the run is the setting of the exact dynamics (paper §4, App. A):
        the fixed-sum linear CNN, MSE, full-batch plain gradient descent."""
        return (
            self.scalar_output
            and self.batch_size is None
            and self.optimizer == "sgd"
            and self.weight_decay == 0
            and not self.freeze_first
        )

    def as_config(self) -> dict[str, Any]:
        """JSON-ready configuration (what the store keeps)."""
        return asdict(self)

    def run_id(self) -> str:
        """A readable id that is the same for the same computation:
        ``<arch>-w<width>-<labels>-s<seed>-<hash of the whole config>``."""
        config = {k: v for k, v in self.as_config().items() if k not in _NOT_IN_ID}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        frozen = "-frozen" if self.freeze_first else ""
        return f"{self.arch}-w{self.width:g}-{self.labels}{frozen}-s{self.seed}-{digest}"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The configuration's field names."""
        return tuple(f.name for f in fields(cls))
