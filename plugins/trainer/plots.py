"""Figures of trainer runs, drawn with the core's :func:`zooscan.plots.plot_profile`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zooscan.energy import fit_formula
from zooscan.plots import plot_profile
from zooscan.records import PatchBasis, RunRecord

MAX_CURVES = 8


def plot_run(run: RunRecord, profiles: pd.DataFrame, kind: str, path: Path) -> Path:
    """One run's ``kind`` profile at up to 8 snapshots spread over training."""
    rows = np.unique(np.linspace(0, len(profiles) - 1, MAX_CURVES).round().astype(int))
    curves = {
        f"step {profiles.index[i]}": profiles.iloc[i].to_numpy()
        for i in rows
        if np.any(profiles.iloc[i].to_numpy())
    }
    return plot_profile(path, curves, title=f"{run.run_id}: {kind} over training")


def plot_reproduction(experiments: Any, path: Path, basis: PatchBasis | None = None) -> Path:
    """The compared profiles of a reproduction: VGG seeds (true and random labels), the
    wider VGG, ResNet-18, and the formula fitted to the first VGG seed."""
    from zooscan_builtins.trainer.reproduce import final_profile

    curves: dict[str, Any] = {}
    for run in experiments.true:
        curves[f"VGG-11-BN seed {run.config['seed']}"] = final_profile(run)
    for run in experiments.random:
        curves[f"VGG-11-BN random labels, seed {run.config['seed']}"] = final_profile(run)
    curves["VGG-11-BN wide"] = final_profile(experiments.wide)
    curves["ResNet-18"] = final_profile(experiments.resnet)
    lambdas = basis.lambdas if basis is not None else None
    fit = fit_formula(final_profile(experiments.true[0]), lambdas) if lambdas is not None else None
    return plot_profile(path, curves, lambdas=lambdas, fit=fit, title="zooscan reproduce")
