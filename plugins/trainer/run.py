"""One training run end to end: data → model → training → analysis → the store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from zooscan import plugins
from zooscan.energy import analyse, colour_share
from zooscan.records import Analysis, FirstLayer, ModelRecord, PatchBasis, Provenance, RunRecord
from zooscan.scan import BasisCache, utc_now
from zooscan.store import Store
from zooscan_builtins.trainer import analysis
from zooscan_builtins.trainer.data import prepare
from zooscan_builtins.trainer.loop import TrainConfig, train
from zooscan_builtins.trainer.models import build_model, first_conv
from zooscan_builtins.trainer.spec import RunSpec

SOURCE = "trainer"
"""The source name under which runs' final first layers appear among the models."""


@dataclass
class RunOutcome:
    """A run and whether it was trained now or found in the store."""

    run: RunRecord
    trained: bool


def execute(
    spec: RunSpec,
    store: Store,
    *,
    extra_datasets: Sequence[str] = (),
    force: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> RunOutcome:
    """Train ``spec`` (unless the store already holds it and ``force`` is false),
    analyse it on the patch basis of its training images (and of ``extra_datasets``)
    and commit it to ``store`` as one run plus its ``trainer`` model view."""
    spec = spec.resolved()
    run_id = spec.run_id()
    if store.has_run(run_id) and not force:
        return RunOutcome(store.load_run(run_id), trained=False)

    train_set = plugins.open_labelled(
        spec.dataset, "train", size=spec.image_size, count=spec.n_train
    )
    test_set = plugins.open_labelled(spec.dataset, "test", size=spec.image_size, count=spec.n_test)
    target = "binary" if spec.scalar_output else "class"
    data = prepare(train_set, test_set, labels=spec.labels, seed=spec.seed, target=target)

    classes = 1 if spec.scalar_output else data.num_classes
    model = build_model(
        spec.arch,
        num_classes=classes,
        width=spec.width,
        first_kernel=spec.first_kernel,
        in_channels=int(train_set.images.shape[1]),
        head=spec.head,
        seed=spec.seed,
    )
    conv = first_conv(model)
    lr = spec.lr
    if lr is None:
        kh, kw = conv.kernel_size
        lr = analysis.auto_linear_lr(data.x_train, data.y_train, kh, kw, conv.out_channels)
    result = train(model, data, _train_config(spec, lr), progress=progress)

    layer = _final_layer(spec, conv, result.snapshots[-1], data, train_set.key)
    shape = layer.shape_key
    bases = [BasisCache(store, train_set).get(shape)]
    bases += [BasisCache(store, plugins.open_dataset(d)).get(shape) for d in extra_datasets]

    profiles: dict[str, dict[str, np.ndarray]] = {}
    for basis in bases:
        for kind, rows in analysis.trajectories(layer, result.snapshots, basis).items():
            profiles.setdefault(kind, {})[basis.id] = rows
    primary = bases[0]
    on_primary = {kind: by_basis[primary.id] for kind, by_basis in profiles.items()}
    fits = analysis.snapshot_fits(on_primary["energy"], primary)
    summary = _metrics_summary(result, lr)
    summary.update(analysis.summarise_profiles(on_primary, primary, fits))
    init, final = analysis.pixel_weights(layer, result.snapshots[[0, -1]])
    summary["colour_share"] = colour_share(final - init)
    if spec.exact_theory_applies:
        predicted, linear_summary = analysis.linear_predictions(
            layer, result.snapshots, result.steps, data.x_train, data.y_train, lr, primary, fits
        )
        for kind, rows in predicted.items():
            profiles.setdefault(kind, {})[primary.id] = rows
        summary.update(linear_summary)

    config = spec.as_config() | {"lr": lr, "train_images": train_set.key}
    run = RunRecord(
        run_id=run_id,
        config=config,
        layer=layer,
        steps=result.steps,
        snapshots=result.snapshots,
        metrics=result.metrics,
        profiles=profiles,
        summary=summary,
        created_at=utc_now(),
    )
    view = ModelRecord(
        SOURCE, run_id, layer, [_view_analysis(layer, result.snapshots, b) for b in bases]
    )
    store.commit_run(run, view)
    return RunOutcome(run, trained=True)


def _train_config(spec: RunSpec, lr: float) -> TrainConfig:
    return TrainConfig(
        epochs=spec.epochs,
        steps=spec.steps,
        batch_size=spec.batch_size,
        optimizer=spec.optimizer,
        lr=lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        loss=spec.loss,
        snapshot_every=spec.snapshot_every,
        device=spec.device,
        compile=spec.compile,
        freeze_first=spec.freeze_first,
        seed=spec.seed,
    )


def _final_layer(
    spec: RunSpec, conv: torch.nn.Conv2d, weight: np.ndarray, data: Any, images_key: str
) -> FirstLayer:
    final = np.ascontiguousarray(weight, dtype=np.float32)
    return FirstLayer(
        weight=final,
        module="first_conv",
        kind="conv",
        stride=tuple(conv.stride),
        padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
        mean=tuple(float(v) for v in data.mean),
        std=tuple(float(v) for v in data.std),
        channel_order="RGB",
        input_size=(spec.image_size, spec.image_size),
        flags={"trained": True, "frozen": spec.freeze_first},
        metadata={
            "arch": spec.arch,
            "width": spec.width,
            "labels": spec.labels,
            "seed": spec.seed,
            "train_images": images_key,
        },
        provenance=Provenance(sha256=hashlib.sha256(final.tobytes()).hexdigest()),
    )


def _view_analysis(layer: FirstLayer, snapshots: np.ndarray, basis: PatchBasis) -> Analysis:
    """What training changed (init subtracted) — the weights themselves when nothing
    changed (a frozen first layer)."""
    pixel = analysis.pixel_weights(layer, snapshots[[0, -1]])
    changed = not np.array_equal(snapshots[0], snapshots[-1])
    return analyse(pixel[1], basis, init=pixel[0] if changed else None)


def _metrics_summary(result: Any, lr: float) -> dict[str, Any]:
    last = {name: float(values[-1]) for name, values in result.metrics.items() if len(values)}
    return {
        "train_acc": last.get("train_acc"),
        "test_acc": last.get("test_acc"),
        "train_loss": last.get("train_loss"),
        "test_loss": last.get("test_loss"),
        "seconds": float(result.seconds),
        "device": str(result.device),
        "images_per_second": float(result.images_per_second),
        "lr": lr,
    }
