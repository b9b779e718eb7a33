"""The trainer's commands: ``zooscan train``, ``zooscan runs`` and ``zooscan reproduce``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pandas as pd

from zooscan.cli import format_option, resolve_store, store_option
from zooscan.errors import UserError
from zooscan.output import echo_frame, echo_json
from zooscan.store import Store
from zooscan_builtins.trainer.models import ARCHITECTURES
from zooscan_builtins.trainer.spec import DEVICES, LABELS, LOSSES, OPTIMIZERS, RunSpec

RUN_COLUMNS = (
    "run_id",
    "train_acc",
    "test_acc",
    "fit_r",
    "fit_s",
    "whitening_index",
    "r_trained_vs_init",
    "exact_r_min",
    "seconds",
    "device",
)


def _batch_size(value: str) -> int | None:
    if value == "full":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: an integer or 'full'") from None


def run_row(run_id: str, summary: dict[str, Any], trained: bool | None = None) -> dict:
    """One table row for a run: id, accuracies, fit, comparison with init, timing."""
    row = {"run_id": run_id, **{k: summary.get(k) for k in RUN_COLUMNS[1:]}}
    if trained is not None:
        row["status"] = "trained" if trained else "stored"
    return row


@click.command("train")
@click.option(
    "--arch",
    "-a",
    default="vgg11",
    show_default=True,
    type=click.Choice(sorted(ARCHITECTURES)),
    help="Architecture.",
)
@click.option(
    "--dataset",
    "-d",
    default="synthetic",
    show_default=True,
    help="Labelled dataset: synthetic, folder:PATH, cifar10, cifar100.",
)
@click.option(
    "--labels",
    type=click.Choice(LABELS),
    default="true",
    show_default=True,
    help="True labels, or one fixed random permutation of them (per run).",
)
@click.option(
    "--seed", "seeds", type=int, multiple=True, help="Seed (repeat for several runs; default 0)."
)
@click.option("--width", type=float, default=1.0, show_default=True, help="Width multiplier.")
@click.option(
    "--first-kernel", type=int, help="First-layer kernel size (linear: 3; resnet18: 3 or 7)."
)
@click.option(
    "--head",
    type=click.Choice(["sum", "linear"]),
    help="Linear CNN head: the paper's fixed sum (scalar, MSE) or a trained readout.",
)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True)
@click.option(
    "--lr", type=float, help="Learning rate (default 0.01; linear CNN: stable auto rate)."
)
@click.option(
    "--momentum", type=float, default=0.9, show_default=True, help="For --optimizer momentum."
)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option(
    "--batch-size", default=None, help="Batch size or 'full' (default 256; linear: full)."
)
@click.option("--epochs", type=int, help="Epochs (default 10; the linear CNN counts --steps).")
@click.option("--steps", type=int, help="Optimiser steps instead of epochs (linear default 300).")
@click.option("--loss", type=click.Choice(LOSSES), help="Loss (default ce; linear: mse).")
@click.option(
    "--snapshot-every",
    type=int,
    default=0,
    show_default=True,
    help="Keep the first layer every N steps (the init and the end always).",
)
@click.option("--freeze-first", is_flag=True, help="Freeze the first layer at its random init.")
@click.option("--image-size", type=int, default=32, show_default=True)
@click.option("--n-train", type=int, help="Training images (default: the dataset's).")
@click.option("--n-test", type=int, help="Test images (default: the dataset's).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (CUDA).")
@click.option(
    "--basis",
    "extra_bases",
    multiple=True,
    help="Also analyse on this dataset's patch basis (e.g. the one scans used).",
)
@click.option("--force", is_flag=True, help="Train again even if the store has the run.")
@store_option
@format_option(("table", "json"))
def train_cmd(store_path, seeds, batch_size, compile_, extra_bases, force, fmt, **options) -> None:
    """Train CNNs and store their runs (first layer over training, metrics, fits).

    Runs are keyed by their configuration: a run already in the store is not trained
    again (use --force). Each run's final first layer also appears among the models
    (source ``trainer``), so ``ls``, ``show``, ``corr`` and ``fit`` work on it.
    """
    from zooscan_builtins.trainer.run import execute

    base = RunSpec(
        batch_size=-1 if batch_size is None else _batch_size(batch_size),
        compile=compile_,
        **options,
    )
    rows, runs = [], []
    with Store(resolve_store(store_path), mode="a") as store:
        for seed in seeds or (0,):
            spec = RunSpec(**(base.as_config() | {"seed": seed}))
            outcome = execute(
                spec,
                store,
                extra_datasets=extra_bases,
                force=force,
                progress=_progress_printer(fmt),
            )
            rows.append(run_row(outcome.run.run_id, outcome.run.summary, outcome.trained))
            runs.append(
                {
                    "run_id": outcome.run.run_id,
                    "config": outcome.run.config,
                    "summary": outcome.run.summary,
                    "trained": outcome.trained,
                }
            )
    if fmt == "json":
        echo_json(runs)
    else:
        echo_frame(pd.DataFrame(rows), "table")


def _progress_printer(fmt: str):
    if fmt == "json":
        return None

    def report(event: dict[str, Any]) -> None:
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items()]
        click.echo("  " + " ".join(parts), err=True)

    return report


@click.command("runs")
@click.argument("run_id", required=False)
@store_option
@click.option(
    "--kind",
    default="energy",
    show_default=True,
    help="Profile kind over training: energy, energy_raw, exact, closed_form.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With RUN_ID: write a PNG of the profile over training.",
)
@format_option()
def runs_cmd(run_id, store_path, kind, plot, fmt) -> None:
    """List trainer runs, or show one run's metrics and profile over training."""
    from zooscan import query

    with Store(resolve_store(store_path), mode="r") as store:
        if run_id is None:
            if plot:
                raise UserError("--plot needs a RUN_ID")
            echo_frame(query.runs_table(store), fmt)
            return
        run = store.load_run(run_id)
        profiles = query.run_profiles(store, run_id, kind=kind)
    if plot:
        from zooscan_builtins.trainer.plots import plot_run

        plot_run(run, profiles, kind, plot)
        click.echo(f"wrote {plot}", err=True)
    if fmt == "json":
        echo_json(
            {
                "run_id": run.run_id,
                "config": run.config,
                "summary": run.summary,
                "steps": run.steps,
                "metrics": run.metrics,
                "profiles": {k: {b: v for b, v in by.items()} for k, by in run.profiles.items()},
            }
        )
        return
    click.echo(f"run {run.run_id}  ({run.created_at})")
    click.echo("config: " + ", ".join(f"{k}={v}" for k, v in run.config.items()))
    echo_frame(pd.DataFrame(run.metrics), "table")
    click.echo(f"\n{kind} profile over training (rows: steps; columns: components)")
    echo_frame(profiles, fmt if fmt != "json" else "table", index=True)


@click.command("reproduce")
@click.option(
    "--scale",
    type=click.Choice(["tiny", "demo", "small", "full"]),
    default="small",
    show_default=True,
    help="tiny: a smoke test (seconds); demo: the demo's small zoo (under a minute); "
    "small: synthetic data, 2 CPU cores, minutes; full: CIFAR-10, the paper's setting, "
    "a GPU.",
)
@click.option("--dataset", "-d", help="Another labelled dataset (e.g. folder:PHOTOS).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a PNG of the compared profiles.",
)
@store_option
@format_option()
def reproduce_cmd(scale, dataset, device, plot, store_path, fmt) -> None:
    """Run the paper's experiments (Tab. 1–3) and print them next to its numbers.

    Runs are kept in the store: a second call only recomputes the tables.
    """
    from zooscan_builtins.trainer import reproduce
    from zooscan_builtins.trainer.loop import resolve_device

    chosen = reproduce.SCALES[scale]
    if scale == "full" and resolve_device(device).type == "cpu":
        click.echo(
            "warning: the full scale trains VGG-11s and a ResNet-18 on 50 000 images for "
            "about 450 epochs in all: days on a CPU; it is meant for a GPU",
            err=True,
        )
    specs = reproduce.plan(chosen, dataset=dataset, device=device)
    count = sum(len(v) if isinstance(v, list) else 1 for v in specs.values())
    if fmt == "table":
        click.echo(
            f"reproduce --scale {scale}: {chosen.description}; {count} runs "
            f"on {dataset or chosen.dataset}",
            err=True,
        )

    def announce(role: str, spec: RunSpec) -> None:
        if fmt == "table":
            click.echo(f"  {role:7s} {spec.resolved().run_id()}", err=True)

    with Store(resolve_store(store_path), mode="a") as store:
        experiments = reproduce.run_all(specs, store, on_run=announce)
        basis = store.get_basis(experiments.true[0].summary["basis"])
    rows, extra = reproduce.table(experiments), reproduce.extras(experiments)
    if plot:
        from zooscan_builtins.trainer.plots import plot_reproduction

        plot_reproduction(experiments, plot, basis)
        click.echo(f"wrote {plot}", err=True)
    if fmt == "json":
        echo_json(
            {"scale": scale, "dataset": dataset or chosen.dataset, "tables": rows, "extras": extra}
        )
        return
    frame = pd.DataFrame(rows).rename(columns={"paper": "paper (CIFAR-10)"})
    echo_frame(frame, fmt)
    if fmt == "table":
        click.echo("")
        echo_frame(pd.DataFrame(extra), "table")
