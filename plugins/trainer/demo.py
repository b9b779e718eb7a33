"""The trainer's part of ``zooscan demo``: a small zoo trained offline, its profiles
compared the paper's way, and next to the scanned models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from zooscan import query
from zooscan.output import echo_frame
from zooscan.store import Store
from zooscan_builtins.trainer import reproduce
from zooscan_builtins.trainer.plots import plot_reproduction


class TrainedZoo:
    """Demo part: train the ``demo`` scale of ``zooscan reproduce`` and report it."""

    name = "trained"

    def __call__(self, store: Store, out_dir: Path, *, dataset: str, quick: bool) -> dict:
        scale = reproduce.SCALES["tiny" if quick else "demo"]
        specs = reproduce.plan(scale, device="cpu")
        count = sum(len(v) if isinstance(v, list) else 1 for v in specs.values())
        click.echo(
            f"\ntraining a small zoo ({count} runs: VGG-11-BN true/random labels, "
            f"a wider VGG-11-BN, ResNet-18, the linear CNN) on labelled synthetic images"
        )
        experiments = reproduce.run_all(specs, store, extra_datasets=(dataset,))
        rows, extra = reproduce.table(experiments), reproduce.extras(experiments)
        click.echo(
            "\nThe paper's comparisons on the trained zoo (ours) next to its CIFAR-10 numbers:"
        )
        echo_frame(pd.DataFrame(rows).rename(columns={"paper": "paper (CIFAR-10)"}), "table")
        echo_frame(pd.DataFrame(extra), "table")
        neighbours = _next_to_scanned(store, dataset)
        if neighbours:
            click.echo(f"\nTrained vs scanned first layers (3x3x3, basis {dataset}): mean r")
            echo_frame(pd.DataFrame([neighbours]), "table")
        basis = store.get_basis(experiments.true[0].summary["basis"])
        plot_reproduction(experiments, out_dir / "trained_profiles.png", basis)
        click.echo("plot: trained_profiles.png")
        return {"tables": rows, "extras": extra, "trained_vs_scanned": neighbours}


def _next_to_scanned(store: Store, dataset: str) -> dict[str, Any]:
    """Mean correlation among trained runs, among scanned models, and across."""
    corr = query.correlations(store, kernel="3x3x3", dataset=dataset).get((3, 3, 3))
    if corr is None or corr.empty:
        return {}
    sources = np.array([idx[0] if isinstance(idx, tuple) else "" for idx in corr.index])
    values = corr.to_numpy()
    trained, scanned = sources == "trainer", sources != "trainer"

    def mean(rows: np.ndarray, cols: np.ndarray, *, same: bool = False) -> float | None:
        block = values[np.ix_(rows, cols)]
        if same:
            block = block[~np.eye(len(block), dtype=bool)]
        return float(np.nanmean(block)) if block.size else None

    return {
        "trained vs trained": mean(trained, trained, same=True),
        "scanned vs scanned": mean(scanned, scanned, same=True),
        "trained vs scanned": mean(trained, scanned),
        "trained runs": int(trained.sum()),
        "scanned models": int(scanned.sum()),
    }


DEMO_PART = TrainedZoo()
