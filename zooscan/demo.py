"""``zooscan demo``: the main job end to end, offline, on the embedded default.

It computes patch bases on the procedural ``synthetic`` dataset, scans torchvision
architectures at random initialisation (two seeds each: the paper's control) plus
every pretrained torchvision checkpoint already in the local cache, and shows what
the paper's control shows: random-init profiles are flat and mutually
uncorrelated, while the patch spectrum — what a linear CNN's first layer follows
early in training (paper Eq. 3) — is steep.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import pandas as pd

from zooscan import plugins, query
from zooscan.energy import fit_formula, formula_profile, pearson
from zooscan.output import echo_frame, shape_label
from zooscan.progress import ScanProgress
from zooscan.scan import plan_scan, run_scan
from zooscan.store import Store

DEMO_ARCHITECTURES = (
    "resnet18",
    "resnet50",
    "googlenet",
    "densenet121",  # 7x7 stems
    "vgg11",
    "mobilenet_v2",
    "efficientnet_b0",
    "regnet_x_400mf",  # 3x3 stems
    "alexnet",  # 11x11
    "convnext_tiny",  # 4x4 patchify
)
QUICK_ARCHITECTURES = ("resnet18", "resnet34", "mobilenet_v2", "mnasnet0_5")
SEEDS = (0, 1)


def run_demo(out_dir: Path, *, quick: bool = False) -> dict:
    """Run the demo, print its tables and write its plots into ``out_dir``."""
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path = out_dir / "zoo.h5"
    dataset = plugins.open_dataset("synthetic")
    architectures = QUICK_ARCHITECTURES if quick else DEMO_ARCHITECTURES
    click.echo(f"zooscan demo → {out_dir}/  (offline; patch dataset: {dataset.key})")

    with Store(store_path, mode="a") as store:
        for seed in SEEDS:
            source = plugins.get_source("torchvision", {"weights": "none", "seed": str(seed)})
            _scan(store, source, architectures, dataset, f"random init, seed {seed}")
        pretrained = plugins.get_source("torchvision", {})
        cached = [r.name for r in pretrained.list_models([]) if r.info.get("cached")]
        if cached:
            _scan(store, pretrained, cached, dataset, "pretrained weights found in the cache")
        else:
            click.echo(
                "no pretrained torchvision weights in the local cache "
                "(TORCH_HOME); scanning random initialisations only"
            )

    with Store(store_path, mode="r") as store:
        groups = query.profiles_by_shape(store, basis_dataset=dataset.key)
        bases = {b.shape_key: b for b in (store.get_basis(i) for i in store.bases()) if b}
        correlations = query.correlations(store, dataset=dataset.key)
    result = _report(groups, correlations, bases, out_dir)
    for name, part in plugins.demo_parts().items():
        with Store(store_path, mode="a") as store:
            result[name] = part(store, out_dir, dataset=dataset.key, quick=quick)
    click.echo(
        f"\ndemo finished in {time.monotonic() - started:.0f} s; store: {store_path} "
        f"(try `zooscan ls --store {store_path}`)"
    )
    return result


def _scan(store, source, names, dataset, label: str) -> None:
    plan = plan_scan(store, source, list(names))
    click.echo(f"scanning {len(plan.todo)} models ({label}); {len(plan.stored)} already stored")
    with ScanProgress(len(plan.todo)) as progress:
        summary = run_scan(
            store,
            source,
            plan,
            dataset,
            workers=2,
            on_model=progress.model_done,
            basis_progress=progress.basis,
        )
    for name, error, message in summary.failed:
        click.echo(f"  failed: {name}: {error}: {message}")


def _report(groups: dict, correlations: dict, bases: dict, out_dir: Path) -> dict:
    from zooscan.plots import plot_heatmap, plot_profile

    rows, result = [], {}
    for shape, frame in groups.items():
        basis = bases.get(shape)
        if basis is None or frame.empty:
            continue
        profiles = frame.to_numpy(dtype=float)
        lambdas = basis.lambdas
        spectrum = lambdas / lambdas.max()
        corr = correlations.get(shape)
        off = (
            corr.to_numpy()[~np.eye(len(corr), dtype=bool)]
            if corr is not None and len(corr) > 1
            else np.array([])
        )
        random_init = [i for i, idx in enumerate(frame.index) if "random" in _name(idx)]
        fits = [fit_formula(p, lambdas) for p in profiles]
        rows.append(
            {
                "shape": shape_label(shape),
                "models": len(frame),
                "profile min/max": float(np.mean(profiles.min(axis=1))),
                "mean r between models": float(np.mean(off)) if off.size else np.nan,
                "mean |r|": float(np.mean(np.abs(off))) if off.size else np.nan,
                "r with spectrum λ": float(np.mean([pearson(p, spectrum) for p in profiles])),
                "formula fit r": float(np.mean([f.r for f in fits])),
                "theory min/max (s=30)": float(formula_profile(lambdas, 30.0).min()),
                "λ_max/λ_min": float(lambdas[0] / max(lambdas[-1], 1e-12)),
            }
        )
        result[shape_label(shape)] = rows[-1]
        named = {_name(idx): p for idx, p in zip(frame.index, profiles, strict=True)}
        theory = {f"theory s={s:g}": formula_profile(lambdas, s) for s in (1.0, 30.0, 1000.0)}
        plot_profile(
            out_dir / f"profiles_{shape_label(shape)}.png",
            {**named, **theory},
            lambdas=lambdas,
            title=f"{shape_label(shape)}: {len(random_init)} random-init profiles "
            "vs. the linear-CNN formula",
        )
        if corr is not None and len(corr) > 1:
            plot_heatmap(
                out_dir / f"corr_{shape_label(shape)}.png",
                corr,
                title=f"energy-profile correlation, {shape_label(shape)}",
            )
    click.echo("\nEnergy profiles by first-layer shape (synthetic patch basis):")
    echo_frame(pd.DataFrame(rows), "table")
    click.echo(
        "\nRandom initialisations (the paper's control) give flat profiles: every component\n"
        "keeps a large share of the peak energy (profile min/max), where the linear-CNN\n"
        "theory concentrates it on a few components (theory min/max). They are mutually\n"
        "uncorrelated (mean r near 0) and the formula does not fit them (paper Tab. 3: random\n"
        "init 0.10 ± 0.15), while the patch spectrum λ spans orders of magnitude: a trained\n"
        "first layer follows it early in training and whitens it later (paper Eq. 3; the\n"
        "theory curves are drawn in the profile plots)."
    )
    click.echo(f"plots: {', '.join(sorted(p.name for p in out_dir.glob('*.png')))}")
    return result


def _name(index) -> str:
    return ":".join(map(str, index)) if isinstance(index, tuple) else str(index)
