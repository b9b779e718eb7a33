"""``zooscan reproduce``: the paper's Tables 1–3 at a chosen scale, next to its numbers.

Each experiment is a set of ordinary runs (trained once, kept in the store, so a
second ``reproduce`` only recomputes the table). Profiles compared are the final
first layer's energy with the init subtracted, on the patch basis of the training
images, as in the paper's notebooks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from zooscan.energy import pearson
from zooscan.records import RunRecord
from zooscan.store import Store
from zooscan_builtins.trainer.run import execute
from zooscan_builtins.trainer.spec import RunSpec

PAPER_CIFAR10 = {
    "seeds": 0.99,
    "widths": 0.98,
    "trained vs init": -0.13,
    "VGG vs ResNet": 0.87,
    "random-label vs init": 0.03,
    "true vs random": 0.90,
    "formula fit": 0.94,
    "formula fit, random init": 0.10,
}
"""Paper Tab. 1–3, CIFAR-10 row (VGG-11; its code trained ``cifar10_vgg11_bn``)."""


@dataclass(frozen=True)
class Scale:
    """How big the reproduction is."""

    name: str
    dataset: str
    width: float
    wide: float
    seeds: tuple[int, ...]
    epochs: int
    random_epochs: int
    n_train: int | None = None
    n_test: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.01
    batch_size: int = 256
    linear_steps: int = 400
    linear_train: int | None = 1000
    description: str = ""


_SMALL = Scale(
    name="small",
    dataset="synthetic",
    width=0.25,
    wide=0.5,
    seeds=(0, 1, 2),
    epochs=5,
    random_epochs=20,
    n_train=4000,
    n_test=1000,
    lr=0.05,
    batch_size=128,
    linear_steps=400,
    linear_train=1000,
    description="offline, about 6 minutes on 2 CPU cores: VGG-11-BN/ResNet-18 at 1/4 width",
)
_DEMO = replace(
    _SMALL,
    name="demo",
    width=0.125,
    wide=0.25,
    seeds=(0, 1),
    epochs=3,
    random_epochs=3,
    n_train=2000,
    n_test=500,
    linear_steps=200,
    linear_train=500,
    description="the demo's small zoo: 7 runs in well under a minute on 2 CPU cores",
)
SCALES = {
    "tiny": replace(
        _DEMO,
        name="tiny",
        epochs=1,
        random_epochs=1,
        n_train=800,
        n_test=200,
        linear_steps=60,
        linear_train=200,
        description="a smoke test of the whole pipeline in seconds; too short to measure",
    ),
    "demo": _DEMO,
    "small": _SMALL,
    "full": Scale(
        name="full",
        dataset="cifar10",
        width=1.0,
        wide=2.0,
        seeds=(0, 1, 2),
        epochs=30,
        random_epochs=100,
        linear_steps=2000,
        linear_train=None,
        description="the paper's setting (CIFAR-10, VGG-11-BN, SGD lr 0.01, batch 256); GPU",
    ),
}


@dataclass
class Experiments:
    """The runs of one reproduction, by role."""

    true: list[RunRecord]
    random: list[RunRecord]
    wide: RunRecord
    resnet: RunRecord
    linear: RunRecord


def plan(scale: Scale, *, dataset: str | None = None, device: str = "auto") -> dict[str, Any]:
    """The run specs of a reproduction, by role."""
    base = RunSpec(
        arch="vgg11_bn",
        dataset=dataset or scale.dataset,
        width=scale.width,
        epochs=scale.epochs,
        optimizer=scale.optimizer,
        lr=scale.lr,
        batch_size=scale.batch_size,
        n_train=scale.n_train,
        n_test=scale.n_test,
        device=device,
    )
    return {
        "true": [replace(base, seed=s) for s in scale.seeds],
        "random": [
            replace(base, seed=s, labels="random", epochs=scale.random_epochs) for s in scale.seeds
        ],
        "wide": replace(base, width=scale.wide),
        "resnet": replace(base, arch="resnet18"),
        "linear": replace(
            base,
            arch="linear",
            optimizer="sgd",
            lr=None,
            batch_size=None,
            epochs=None,
            steps=scale.linear_steps,
            snapshot_every=max(scale.linear_steps // 8, 1),
            n_train=scale.linear_train,
            width=0.25,
        ),
    }


def run_all(
    specs: dict[str, Any],
    store: Store,
    *,
    extra_datasets: Sequence[str] = (),
    on_run: Callable[[str, RunSpec], None] | None = None,
) -> Experiments:
    """Train (or load) every run of a plan; ``extra_datasets`` as in
    :func:`~zooscan_builtins.trainer.run.execute`."""

    def one(role: str, spec: RunSpec) -> RunRecord:
        if on_run is not None:
            on_run(role, spec)
        return execute(spec, store, extra_datasets=extra_datasets).run

    return Experiments(
        true=[one("true", s) for s in specs["true"]],
        random=[one("random", s) for s in specs["random"]],
        wide=one("wide", specs["wide"]),
        resnet=one("resnet", specs["resnet"]),
        linear=one("linear", specs["linear"]),
    )


def final_profile(run: RunRecord) -> np.ndarray:
    """The final learned profile (init subtracted) on the run's training basis."""
    return run.profiles["energy"][run.summary["basis"]][-1]


def _pairs(a: Sequence[RunRecord], b: Sequence[RunRecord] | None = None) -> list[float]:
    pairs = itertools.combinations(a, 2) if b is None else zip(a, b, strict=True)
    return [pearson(final_profile(x), final_profile(y)) for x, y in pairs]


def table(exp: Experiments) -> list[dict[str, Any]]:
    """Rows ``{table, comparison, ours, sd, n, paper}`` (paper: CIFAR-10 row)."""
    vgg_vs_resnet = [pearson(final_profile(r), final_profile(exp.resnet)) for r in exp.true]
    measured = {
        "seeds": ("Tab. 1", _pairs(exp.true)),
        "widths": ("Tab. 1", _pairs([exp.true[0]], [exp.wide])),
        "trained vs init": ("Tab. 1", [r.summary["r_trained_vs_init"] for r in exp.true]),
        "VGG vs ResNet": ("Tab. 1", vgg_vs_resnet),
        "random-label vs init": ("Tab. 2", [r.summary["r_trained_vs_init"] for r in exp.random]),
        "true vs random": ("Tab. 2", _pairs(exp.true, exp.random)),
        "formula fit": ("Tab. 3", [r.summary.get("fit_r") for r in exp.true]),
        "formula fit, random init": ("Tab. 3", [r.summary.get("init_fit_r") for r in exp.true]),
    }
    rows = []
    for name, (where, values) in measured.items():
        clean = [float(v) for v in values if v is not None and not math.isnan(v)]
        rows.append(
            {
                "table": where,
                "comparison": name,
                "ours": float(np.mean(clean)) if clean else None,
                "sd": float(np.std(clean)) if len(clean) > 1 else None,
                "n": len(clean),
                "paper": PAPER_CIFAR10[name],
            }
        )
    return rows


def extras(exp: Experiments) -> list[dict[str, Any]]:
    """Rows beyond the paper's tables: the linear CNN's predictions, and every role's
    accuracies and colour share (:func:`zooscan.energy.colour_share` of ``W - W0``)."""
    lin = exp.linear.summary
    closed = [r for r in lin.get("closed_form_r", []) if r is not None]
    rows = [
        {
            "what": "linear CNN vs exact GD dynamics, min r over snapshots",
            "value": lin.get("exact_r_min"),
        },
        {
            "what": "linear CNN vs closed form (s fitted), final r",
            "value": closed[-1] if closed else None,
        },
        {
            "what": "linear CNN: fitted s / s implied by eta*t, final",
            "value": _ratio(lin.get("closed_form_s"), lin.get("implied_s")),
        },
    ]
    for role, runs in (
        ("VGG-11-BN true labels", exp.true),
        ("VGG-11-BN random labels", exp.random),
        ("VGG-11-BN wide", [exp.wide]),
        ("ResNet-18", [exp.resnet]),
    ):
        for key, label in (
            ("train_acc", "train acc"),
            ("test_acc", "test acc"),
            ("colour_share", "colour share of what the first layer learned"),
        ):
            values = [r.summary.get(key) for r in runs if r.summary.get(key) is not None]
            rows.append(
                {
                    "what": f"{role}: {label}",
                    "value": float(np.mean(values)) if values else None,
                }
            )
    return rows


def _ratio(fitted: list | None, implied: list | None) -> float | None:
    if not fitted or not implied or fitted[-1] is None or not implied[-1]:
        return None
    return float(fitted[-1]) / float(implied[-1])
