"""The training loop: fast on a GPU, exact for the linear theory, deterministic on the CPU.

What :func:`train` does, and why:

- **Data resident on the device**, moved once. Each epoch draws one permutation with
  ``torch.randperm`` on the device (a seeded :class:`torch.Generator`) and gathers the
  batches with ``index_select``; no DataLoader. Mini-batch epochs drop the last partial
  batch (as the paper's ``drop_last`` loader), so every step has the same shape.
- **Full batch** (``batch_size=None``, or at least the training-set size): every
  optimiser step is one exact gradient-descent step on the whole training set, without
  shuffling. The step's gradient may be accumulated over chunks of ``micro_batch``
  images (default 2048 for full-batch steps), each loss weighted by its share, which is
  the same step for models without batch statistics (the linear CNN, VGG without BN).
- **No per-step host synchronisation**: no ``.item()``, no copies to the CPU during
  training. Snapshots of the first layer are cloned on the device and copied once at
  the end; losses and accuracies are summed in device tensors during evaluation and
  read once per evaluation; epochs are timed with CUDA events read at the end. The loop
  synchronises only at evaluations.
- **Standard CNNs**: ``channels_last`` (the resident images are kept NHWC, so a gathered
  batch is channels-last without a copy); on CUDA also bf16 autocast (``amp=None``), cuDNN
  autotuning, fused optimisers; optional ``torch.compile``. **The linear CNN** is never
  autocast by default and runs in exact fp32 (TF32 off) so it can be compared with the
  exact gradient-descent prediction.

Losses (mean over the images of the batch, so the update matches the paper's
``L = (1/N) sum_x (y(x) - ŷ(x))^2``):

- ``ce``: cross-entropy on class targets;
- ``mse`` on a scalar (binary ``±1``) target: ``mean_x (ŷ(x) - y(x))^2``;
- ``mse`` on class targets: ``mean_x sum_c (ŷ_c(x) - onehot_c(x))^2``.

Accuracy is the argmax for class targets and the sign (``ŷ >= 0`` means ``+1``) for the
binary one. Training-set metrics are computed on the whole training set (with the labels
it is trained on, so random for random-label runs) in eval mode; test metrics on the whole
test set, at every evaluation (unlike the paper's code, which never recorded them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zooscan.errors import UserError
from zooscan_builtins.trainer.data import Prepared
from zooscan_builtins.trainer.models import first_conv, is_linear

OPTIMIZERS = ("sgd", "momentum", "adam")
LOSSES = ("ce", "mse")
DEVICES = ("auto", "cpu", "cuda")
FULL_BATCH_CHUNK = 2048
"""Default ``micro_batch`` of full-batch steps: images per forward/backward chunk."""
METRIC_NAMES = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")


@dataclass
class TrainConfig:
    """How to train. Exactly one of ``epochs`` and ``steps`` is set.

    ``batch_size=None`` is full-batch gradient descent. ``optimizer``: ``sgd`` (plain,
    no momentum: the paper's), ``momentum`` (SGD with ``momentum``) or ``adam``.
    ``snapshot_every``: keep the first layer every that many optimiser steps (0: only
    the initial and final weights; the initial weights are always snapshot 0 and the
    final weights always the last). ``eval_every``: evaluate every that many epochs (0:
    only at the start and the end; there is always a row at step 0 and one at the final
    step; ``None``: every epoch for mini-batch runs, and every ``max(1, total_steps // 20)``
    steps for full-batch runs, where an epoch is one step). ``amp=None`` means bf16
    autocast on CUDA for the standard CNNs and never for the linear CNN. ``freeze_first``
    keeps the first convolution at its random initialisation (``requires_grad=False``).
    ``seed`` drives the batch order and dropout (the weights are initialised when the
    model is built). ``micro_batch`` splits each step's batch into chunks whose gradients
    are accumulated (``None``: :data:`FULL_BATCH_CHUNK` for full-batch steps, no split
    otherwise).
    ``eval_batch``: images per evaluation forward (``None``: 4096 on CUDA, 1024 on CPU).
    """

    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = 256
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    loss: str = "ce"
    snapshot_every: int = 0
    eval_every: int | None = None
    device: str = "auto"
    compile: bool = False
    amp: bool | None = None
    freeze_first: bool = False
    seed: int = 0
    micro_batch: int | None = None
    eval_batch: int | None = None

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise UserError("give exactly one of epochs and steps")
        for name in ("epochs", "steps", "batch_size", "micro_batch", "eval_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        for name in ("snapshot_every", "eval_every"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"{name} must be 0 or more, got {getattr(self, name)}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("loss", self.loss, LOSSES)
        _choice("device", self.device, DEVICES)
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UserError("weight_decay must be >= 0 and momentum in [0, 1)")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the run record)."""
        return asdict(self)


@dataclass
class TrainResult:
    """What a training run produced. Arrays are CPU numpy."""

    steps: np.ndarray
    """``(S,)`` int64 optimiser steps of the snapshots: ``0, N, 2N, ..., final``."""
    snapshots: np.ndarray
    """``(S, K, C, kh, kw)`` float32 first-layer weights; ``snapshots[0]`` is the init."""
    metrics: dict[str, np.ndarray]
    """One entry per evaluation (:data:`METRIC_NAMES`): ``epoch`` (float: fractional for
    a partial last epoch), ``step``, ``train_loss``, ``train_acc``, ``test_loss``,
    ``test_acc``, ``seconds`` (wall time since the start, evaluations included)."""
    seconds: float
    """Wall time of the whole run (set-up, training, evaluations)."""
    train_seconds: float
    """Time spent in optimiser steps only (evaluations excluded)."""
    device: str
    images_per_second: float
    """Training images per second of ``train_seconds`` (steps x batch / time)."""
    epoch_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Training time of each epoch (the last one partial when ``steps`` ends mid-epoch)."""
    amp: bool = False
    channels_last: bool = False
    compiled: bool = False
    total_steps: int = 0
    batch_size: int = 0
    """Images per optimiser step (the training-set size for full batch)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``; :class:`UserError`
    when CUDA is asked for and absent."""
    _choice("device", name, DEVICES)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def train(
    model: nn.Module,
    data: Prepared,
    cfg: TrainConfig,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (moved to the device) and return its first-layer
    snapshots and metrics. ``progress`` is called with each metrics row (plus
    ``total_steps``) after every evaluation. Deterministic on the CPU for a given seed.

    Raises :class:`UserError` for a model/target mismatch (e.g. ``ce`` on the binary
    target, a wrong output size) or when the loss becomes non-finite.
    """
    device = resolve_device(cfg.device)
    linear = is_linear(model)
    amp = cfg.amp if cfg.amp is not None else (device.type == "cuda" and not linear)
    channels_last = not linear
    _check_task(model, data, cfg)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with _numerics(device, exact=linear and not amp), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)
        run = _Run(model, data, cfg, device, amp=amp, channels_last=channels_last)
        return run.execute(progress)


# --------------------------------------------------------------------------- the run


class _Run:
    """One training run's state on the device."""

    def __init__(
        self,
        model: nn.Module,
        data: Prepared,
        cfg: TrainConfig,
        device: torch.device,
        *,
        amp: bool,
        channels_last: bool,
    ) -> None:
        self.cfg, self.device, self.amp, self.channels_last = cfg, device, amp, channels_last
        self.binary = data.target == "binary"
        self.num_classes = data.num_classes
        self.model = model.to(device=device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.conv = first_conv(model)
        if cfg.freeze_first:
            for parameter in self.conv.parameters():
                parameter.requires_grad_(False)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = _optimizer(self.model, cfg, device)
        self.x_train, self.y_train = self._resident(data.x_train, data.y_train)
        self.x_test, self.y_test = self._resident(data.x_test, data.y_test)
        self.n = int(data.x_train.shape[0])
        self.full_batch = cfg.batch_size is None or cfg.batch_size >= self.n
        self.batch = self.n if self.full_batch else int(cfg.batch_size or self.n)
        self.steps_per_epoch = 1 if self.full_batch else self.n // self.batch
        self.total = (
            cfg.steps if cfg.steps is not None else (cfg.epochs or 0) * self.steps_per_epoch
        )
        chunk = cfg.micro_batch or (FULL_BATCH_CHUNK if self.full_batch else self.batch)
        self.chunk = min(chunk, self.batch)
        self.eval_batch = cfg.eval_batch or (4096 if device.type == "cuda" else 1024)
        self.eval_every = _eval_period(cfg.eval_every, self.full_batch, self.total)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.seed)
        self.snap_steps: list[int] = []
        self.snaps: list[torch.Tensor] = []
        self.rows: list[dict[str, float]] = []

    def _resident(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a split to the device once; NHWC storage for channels-last models."""
        x = x.to(self.device, dtype=torch.float32)
        if self.channels_last:
            x = x.permute(0, 2, 3, 1).contiguous()
        return x, y.to(self.device)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """The NCHW view of resident images (channels-last strides when stored NHWC)."""
        return x.permute(0, 3, 1, 2) if self.channels_last else x

    # ----------------------------------------------------------------- main loop

    def execute(self, progress: Callable[[dict[str, Any]], None] | None) -> TrainResult:
        start = time.perf_counter()
        clock = _EpochClock(self.device)
        self.model.train()
        self._snapshot(0)
        self._evaluate(0, 0.0, start, progress)
        step, epoch = 0, 0
        while step < self.total:
            clock.begin()
            for xb, yb in self._epoch_batches(self.total - step):
                self._optimizer_step(xb, yb)
                step += 1
                every = self.cfg.snapshot_every
                if every and step % every == 0 and step < self.total:
                    self._snapshot(step)
            clock.end()
            epoch += 1
            if epoch % self.eval_every == 0 and step < self.total:
                self._evaluate(step, step / self.steps_per_epoch, start, progress)
        self._snapshot(step)
        self._evaluate(step, step / self.steps_per_epoch, start, progress)
        return self._result(start, clock.seconds())

    def _epoch_batches(self, remaining: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch (at most ``remaining``): one shuffled pass, or the
        whole set once for full batch."""
        if self.full_batch:
            yield self._images(self.x_train), self.y_train
            return
        order = torch.randperm(self.n, device=self.device, generator=self.generator)
        for index in range(min(self.steps_per_epoch, remaining)):
            picked = order[index * self.batch : (index + 1) * self.batch]
            yield (
                self._images(self.x_train.index_select(0, picked)),
                self.y_train.index_select(0, picked),
            )

    def _optimizer_step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One optimiser step on the batch, its gradient accumulated over chunks."""
        self.optimizer.zero_grad(set_to_none=True)
        size = xb.shape[0]
        for begin in range(0, size, self.chunk):
            x_chunk, y_chunk = xb[begin : begin + self.chunk], yb[begin : begin + self.chunk]
            with self._autocast():
                out = self.forward(x_chunk)
            loss = _loss_sum(out, y_chunk, self.cfg.loss, self.num_classes, self.binary) / size
            loss.backward()
        self.optimizer.step()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _snapshot(self, step: int) -> None:
        self.snap_steps.append(step)
        self.snaps.append(self.conv.weight.detach().float().clone())

    # ----------------------------------------------------------------- evaluation

    def _evaluate(
        self,
        step: int,
        epoch: float,
        start: float,
        progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        train_loss, train_acc = self._measure(self.x_train, self.y_train)
        test_loss, test_acc = self._measure(self.x_test, self.y_test)
        if not np.isfinite(train_loss):
            raise UserError(
                f"training diverged: train loss {train_loss} at step {step}; lower the "
                f"learning rate (lr={self.cfg.lr})"
            )
        row = {
            "epoch": float(epoch),
            "step": float(step),
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "seconds": time.perf_counter() - start,
        }
        self.rows.append(row)
        if progress is not None:
            progress({**row, "total_steps": self.total})

    @torch.no_grad()
    def _measure(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Mean loss and accuracy over a whole split, in eval mode; one host sync."""
        self.model.eval()
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.float64)
        for begin in range(0, x.shape[0], self.eval_batch):
            xb = self._images(x[begin : begin + self.eval_batch])
            yb = y[begin : begin + self.eval_batch]
            with self._autocast():
                out = self.model(xb)
            loss += _loss_sum(out, yb, self.cfg.loss, self.num_classes, self.binary)
            correct += _correct(out, yb, self.binary)
        self.model.train()
        totals = torch.stack([loss, correct]).cpu().numpy() / x.shape[0]
        return float(totals[0]), float(totals[1])

    def _result(self, start: float, epoch_times: np.ndarray) -> TrainResult:
        train_seconds = float(epoch_times.sum())
        snapshots = torch.stack(self.snaps).contiguous().cpu().numpy()
        metrics = {
            name: np.array([row[name] for row in self.rows], dtype=np.float64)
            for name in METRIC_NAMES
        }
        metrics["step"] = metrics["step"].astype(np.int64)
        images = self.total * self.batch
        return TrainResult(
            steps=np.asarray(self.snap_steps, dtype=np.int64),
            snapshots=snapshots,
            metrics=metrics,
            seconds=time.perf_counter() - start,
            train_seconds=train_seconds,
            device=str(self.device),
            images_per_second=images / train_seconds if train_seconds > 0 else 0.0,
            epoch_seconds=epoch_times,
            amp=self.amp,
            channels_last=self.channels_last,
            compiled=self.cfg.compile,
            total_steps=self.total,
            batch_size=self.batch,
        )


# --------------------------------------------------------------------------- helpers


def _loss_sum(
    out: torch.Tensor, y: torch.Tensor, loss: str, num_classes: int, binary: bool
) -> torch.Tensor:
    """The loss summed over the images of a batch (float32)."""
    out = out.float()
    if binary:
        return torch.square(out.reshape(-1) - y).sum()
    if loss == "ce":
        return F.cross_entropy(out, y, reduction="sum")
    onehot = F.one_hot(y, num_classes).to(out.dtype)
    return torch.square(out - onehot).sum()


def _correct(out: torch.Tensor, y: torch.Tensor, binary: bool) -> torch.Tensor:
    """How many images of a batch are classified right (a device tensor)."""
    if binary:
        return ((out.reshape(-1) >= 0) == (y > 0)).sum()
    return (out.argmax(dim=1) == y).sum()


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    momentum = cfg.momentum if cfg.optimizer == "momentum" else 0.0
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay, **fused
    )


def _check_task(model: nn.Module, data: Prepared, cfg: TrainConfig) -> None:
    """Reject a loss/target/model combination that cannot train, with one clear line."""
    if data.target == "binary" and cfg.loss != "mse":
        raise UserError("the binary (±1) target is a regression: use loss='mse'")
    probe = data.x_test[:1].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(probe)
    model.train(was_training)
    got = 1 if out.ndim == 1 else int(out.shape[1])
    if got != data.output_dim:
        raise UserError(
            f"the model has {got} outputs but the {data.target} target needs {data.output_dim}"
        )


@contextlib.contextmanager
def _numerics(device: torch.device, *, exact: bool) -> Iterator[None]:
    """cuDNN autotuning on CUDA; for exact runs (the linear CNN without autocast) TF32 off,
    so fp32 means fp32. Restores the global flags afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.benchmark = True
    if exact:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = saved


def _eval_period(eval_every: int | None, full_batch: bool, total: int) -> int:
    """Epochs between evaluations (a period longer than the run: only start and end)."""
    if eval_every is None:
        return max(1, total // 20) if full_batch else 1
    return eval_every or total + 1


class _EpochClock:
    """Times the epochs without synchronising: CUDA events on the GPU (read once, at the
    end), the wall clock on the CPU (where work is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        self.marks.append(self._mark())

    def end(self) -> None:
        self.marks.append(self._mark())

    def seconds(self) -> np.ndarray:
        """Each epoch's duration in seconds (synchronises once on CUDA)."""
        pairs = list(zip(self.marks[::2], self.marks[1::2], strict=True))
        if self.cuda:
            torch.cuda.synchronize()
            return np.array([a.elapsed_time(b) / 1000.0 for a, b in pairs], dtype=np.float64)
        return np.array([b - a for a, b in pairs], dtype=np.float64)


def _choice(name: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise UserError(f"unknown {name} {value!r} (known: {', '.join(known)})")
