"""The ``zooscan`` command line (click). Plugins add commands via ``register_commands``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np
import pandas as pd

from zooscan import __version__, plugins
from zooscan.errors import UserError, ZooscanError
from zooscan.output import FORMATS, echo_frame, echo_json, parse_kernel, shape_label
from zooscan.store import Store, default_store_path

STORE_HELP = "HDF5 store (default: $ZOOSCAN_STORE or ./zoo.h5)."


class ZooscanGroup(click.Group):
    """A click group that turns zooscan errors into one clear line and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ZooscanError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if os.environ.get("ZOOSCAN_DEBUG"):
                raise
            message = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            raise click.ClickException(message) from None


def store_option(func):
    return click.option(
        "--store",
        "store_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=STORE_HELP,
    )(func)


def format_option(choices=FORMATS, default="table"):
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices),
        default=default,
        show_default=True,
        help="Output format.",
    )


def resolve_store(path: Path | None) -> Path:
    return Path(path) if path else default_store_path()


@click.group(cls=ZooscanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zooscan")
def cli() -> None:
    """Analyse the first layer of model zoos: energy profiles on image-patch principal
    components (Chowers & Weiss, ICML 2023)."""


# --------------------------------------------------------------------------- plugins


@cli.command("plugins")
@format_option(("table", "json"))
def plugins_cmd(fmt: str) -> None:
    """List installed plugins, the hooks they implement and their versions."""
    rows = [
        {
            "name": p.name,
            "module": p.module,
            "package": p.package,
            "version": p.version,
            "hooks": list(p.hooks),
        }
        for p in plugins.list_plugins()
    ]
    if fmt == "json":
        echo_json(rows)
        return
    frame = pd.DataFrame(rows, columns=["name", "module", "package", "version", "hooks"])
    frame["hooks"] = frame["hooks"].map(", ".join)
    echo_frame(frame, "table")


@cli.command("sources")
@format_option(("table", "json"))
def sources_cmd(fmt: str) -> None:
    """List model sources and patch datasets."""
    rows = [
        {"kind": "source", "name": name, "description": getattr(f, "description", "")}
        for name, f in plugins.sources().items()
    ]
    rows += [
        {"kind": "dataset", "name": name, "description": getattr(f, "description", "")}
        for name, f in plugins.datasets().items()
    ]
    if fmt == "json":
        echo_json(rows)
    else:
        echo_frame(pd.DataFrame(rows, columns=["kind", "name", "description"]), "table")


# --------------------------------------------------------------------------- models / scan


def source_options(func):
    """Options every source understands, passed to the source as its options dict."""
    options = [
        click.option(
            "--source",
            "-s",
            "source_name",
            required=True,
            help="Model source (see `zooscan sources`).",
        ),
        click.option(
            "--weights", help="torchvision: default | none (random init) | a weights name."
        ),
        click.option("--key", help="files: the checkpoint key of the first-layer tensor."),
        click.option("--arch", help="files: architecture that locates the first layer."),
        click.option("--mean", help="files: input mean per channel, comma-separated, [0,1] scale."),
        click.option("--std", help="files: input std per channel, comma-separated, [0,1] scale."),
        click.option(
            "--channel-order",
            type=click.Choice(["RGB", "BGR", "L"]),
            help="files: input channel order.",
        ),
        click.option(
            "--option",
            "-o",
            "extra",
            multiple=True,
            metavar="KEY=VALUE",
            help="Any other source option (repeatable).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_source(source_name: str, **kw):
    extra = kw.pop("extra", ())
    options = {k: str(v) for k, v in kw.items() if v is not None}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        options[key.replace("-", "_")] = value
    return plugins.get_source(source_name, options)


@cli.command("models")
@source_options
@click.argument("patterns", nargs=-1)
@click.option("--limit", type=click.IntRange(min=1), help="At most N models.")
@format_option()
def models_cmd(
    source_name: str, patterns: tuple[str, ...], limit: int | None, fmt: str, **kw
) -> None:
    """List what a source offers (no weights are fetched)."""
    source = build_source(source_name, **kw)
    rows = []
    for i, ref in enumerate(source.list_models(list(patterns))):
        if limit is not None and i >= limit:
            break
        rows.append({"name": ref.name, **ref.info})
    if fmt == "json":
        echo_json(rows)
    else:  # lists (mean, std, input size...) read best as short text in a table
        echo_frame(pd.DataFrame([{k: _cell(v) for k, v in row.items()} for row in rows]), fmt)


def _cell(value):
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + ")"
    return value


@cli.command("scan")
@source_options
@click.argument("patterns", nargs=-1)
@store_option
@click.option(
    "--dataset",
    "-d",
    default="synthetic",
    show_default=True,
    help="Patch dataset for the bases: synthetic | folder:PATH | cifar10 | cifar100 ...",
)
@click.option("--uncentered", is_flag=True, help="Uncentered patch basis (paper Def. 2.1).")
@click.option("--limit", type=click.IntRange(min=1), help="Scan at most N models.")
@click.option(
    "--workers",
    "-j",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Concurrent fetches.",
)
@click.option("--retry-failed", is_flag=True, help="Retry models that failed in earlier scans.")
@click.option("--dry-run", is_flag=True, help="Report what would be scanned; fetch nothing.")
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Print one line per model as soon as it is committed (or failed).",
)
@format_option(("table", "json"))
def scan_cmd(
    source_name,
    patterns,
    store_path,
    dataset,
    uncentered,
    limit,
    workers,
    retry_failed,
    dry_run,
    verbose,
    fmt,
    **kw,
) -> None:
    """Scan models from a source into the store (resumable; failures are recorded)."""
    from zooscan.progress import ScanProgress
    from zooscan.scan import estimate_fetch, plan_scan, run_scan

    source = build_source(source_name, **kw)
    path = resolve_store(store_path)
    patch_dataset = plugins.open_dataset(dataset)
    if dry_run:
        store = Store(path, mode="r") if path.exists() else None
        try:
            plan = plan_scan(store, source, list(patterns), limit=limit, retry_failed=retry_failed)
        finally:
            if store:
                store.close()
        estimate = estimate_fetch(source, plan.todo)
        report = {
            "source": source.name,
            "store": str(path),
            "listed": len(plan.listed),
            "to_scan": [r.name for r in plan.todo],
            "already_stored": len(plan.stored),
            "failed_before": len(plan.failed_before),
            "fetch": estimate.as_dict(),
        }
        if fmt == "json":
            echo_json(report)
        else:
            click.echo(
                f"{len(plan.listed)} models listed: {len(plan.todo)} to scan, "
                f"{len(plan.stored)} already stored, {len(plan.failed_before)} failed before"
                + (" (skipped; use --retry-failed)" if plan.failed_before else "")
            )
            if estimate.estimated:
                click.echo(
                    f"fetching them: about {estimate.requests} requests and "
                    f"{estimate.bytes / 1e6:.2f} MB; {estimate.cached} already cached"
                    + (
                        f" ({estimate.typical} sized as a typical model: their configs are not "
                        "cached)"
                        if estimate.typical
                        else ""
                    )
                )
            for name, message in estimate.errors:
                click.echo(f"  cannot estimate {name}: {message}")
            for ref in plan.todo:
                click.echo(f"  {ref.name}")
        return
    with Store(path, mode="a") as store:
        plan = plan_scan(store, source, list(patterns), limit=limit, retry_failed=retry_failed)
        with ScanProgress(len(plan.todo), enabled=fmt == "table" and not verbose) as progress:

            def on_model(ref, outcome: str) -> None:
                progress.model_done(ref, outcome)
                if verbose:
                    click.echo(f"{outcome} {ref.name}")
                    sys.stdout.flush()

            def on_basis(shape_key: tuple[int, int, int]):
                if verbose:
                    click.echo(f"computing basis {shape_label(shape_key)} on {patch_dataset.key}")
                    sys.stdout.flush()
                return progress.basis(shape_key)

            summary = run_scan(
                store,
                source,
                plan,
                patch_dataset,
                workers=workers,
                centered=not uncentered,
                on_model=on_model,
                basis_progress=on_basis,
            )
    if fmt == "json":
        echo_json({"source": source.name, "store": str(path), **summary.as_dict()})
    else:
        _print_summary(summary, path)
    if summary.interrupted:
        sys.exit(130)
    if summary.stopped:
        raise click.ClickException(
            f"the scan stopped: {summary.stopped}. The {summary.stored} models stored before "
            "are safe; free space and run the same command to resume"
        )
    if summary.failed:
        raise click.ClickException(
            f"{len(summary.failed)} of {len(plan.todo)} models failed (recorded in {path}; "
            "see `zooscan ls --failures`, retry with --retry-failed)"
        )


def _print_summary(summary, path: Path) -> None:
    state = "interrupted" if summary.interrupted else "stopped" if summary.stopped else "done"
    click.echo(
        f"{state}: stored {summary.stored}, "
        f"skipped {summary.skipped_stored} already stored"
        + (f" and {summary.skipped_failed} failed before" if summary.skipped_failed else "")
        + f", failed {len(summary.failed)} — {summary.seconds:.1f} s, "
        f"{summary.bytes_fetched / 1e6:.2f} MB fetched → {path}"
    )
    for basis in summary.bases_computed:
        click.echo(f"computed basis {basis}")
    for name, reason in summary.unanalysed:
        click.echo(f"stored without profile: {name}: {reason}")
    for name, error, message in summary.failed:
        click.echo(f"failed: {name}: {error}: {message}")
    if summary.failed:
        reasons = sorted(summary.failures_by_reason.items(), key=lambda item: -item[1])
        click.echo("failures by reason: " + ", ".join(f"{e} {n}" for e, n in reasons))


# --------------------------------------------------------------------------- queries


@cli.command("ls")
@store_option
@click.option("--source", "-s", "source_name", help="Only this source.")
@click.option("--kernel", "-k", help="Only this kernel shape: 7x7 or 3x7x7.")
@click.option("--failures", is_flag=True, help="List recorded failures instead of models.")
@format_option()
def ls_cmd(store_path, source_name, kernel, failures, fmt) -> None:
    """List the models (or failures) in the store."""
    from zooscan import query

    parse_kernel(kernel)
    with Store(resolve_store(store_path), mode="r") as store:
        if failures:
            frame = query.failures_table(store, source=source_name)
        else:
            frame = query.models_table(store, source=source_name, kernel=kernel)
    echo_frame(frame, fmt)


def find_model(store: Store, model: str, source_name: str | None) -> tuple[str, str]:
    """Resolve ``MODEL`` (``name`` or ``source:name``) to a stored ``(source, name)``."""
    candidates = [(s, n) for s, n in store.models(source_name) if n == model]
    if not candidates and source_name is None and ":" in model:
        prefix, _, rest = model.partition(":")
        candidates = [(s, n) for s, n in store.models(prefix) if n == rest]
    if not candidates:
        where = f" from source {source_name!r}" if source_name else ""
        raise UserError(f"no model {model!r}{where} in the store (see `zooscan ls`)")
    if len(candidates) > 1:
        sources = ", ".join(s for s, _ in candidates)
        raise UserError(f"{model!r} is in several sources ({sources}): name one with --source")
    return candidates[0]


def pick_basis(store: Store, stored, dataset: str | None):
    """The basis a stored model's profile is read on: ``dataset`` if given, else its first."""
    ids = sorted(stored.energy)
    if dataset:
        from zooscan.query import dataset_of

        ids = [b for b in ids if dataset_of(b) == dataset]
    if not ids:
        raise UserError(
            f"model {stored.name!r} has no energy profile"
            + (f" on dataset {dataset!r}" if dataset else "")
            + " (scan it with a dataset whose images fit its channels)"
        )
    basis = store.get_basis(ids[0])
    if basis is None:
        raise UserError(f"basis {ids[0]!r} is missing from the store")
    return basis


@cli.command("show")
@click.argument("model")
@store_option
@click.option("--source", "-s", "source_name", help="Source of MODEL (if ambiguous).")
@click.option("--dataset", "-d", help="Basis dataset key (default: the first stored).")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a PNG with the energy profile and the filter grid.",
)
@format_option(("table", "json"))
def show_cmd(model, store_path, source_name, dataset, plot, fmt) -> None:
    """Show one model: layer metadata, provenance, energy profile, formula fit."""
    from zooscan.energy import fit_formula, to_pixel_space

    with Store(resolve_store(store_path), mode="r") as store:
        source, name = find_model(store, model, source_name)
        stored = store.load_model(source, name)
        basis = pick_basis(store, stored, dataset) if stored.energy else None
    layer = stored.layer
    profile = stored.energy[basis.id] if basis is not None else None
    fit, fit_error = None, None
    if basis is not None:
        try:
            fit = fit_formula(profile, basis.lambdas)
        except UserError as exc:  # a constant profile has no fit; show the rest
            fit_error = str(exc)
    data = {
        "source": source,
        "name": name,
        "scanned_at": stored.scanned_at,
        "layer": {
            "module": layer.module,
            "kind": layer.kind,
            "shape": list(layer.weight.shape),
            "stride": layer.stride,
            "padding": layer.padding,
            "dilation": layer.dilation,
            "groups": layer.groups,
            "bias": layer.bias,
            "mean": layer.mean,
            "std": layer.std,
            "channel_order": layer.channel_order,
            "input_size": layer.input_size,
            "flags": layer.flags,
            "metadata": layer.metadata,
        },
        "provenance": layer.provenance.as_dict(),
        "basis": None
        if basis is None
        else {
            "id": basis.id,
            "dataset": basis.dataset,
            "centered": basis.centered,
            "n_patches": basis.n_patches,
            "n_images": basis.n_images,
            "eigenvalues": basis.eigenvalues,
            "lambdas": basis.lambdas,
        },
        "energy": profile,
        "fit": None if fit is None else fit.as_dict(),
        "fit_error": fit_error,
        "bases": sorted(stored.energy),
    }
    if plot:
        from zooscan.plots import plot_model

        plot_model(
            plot, to_pixel_space(layer), profile, basis=basis, fit=fit, title=f"{source}:{name}"
        )
    if fmt == "json":
        echo_json(data)
        return
    click.echo(f"{source}:{name}   scanned {stored.scanned_at}")
    meta = data["layer"]
    click.echo(
        f"  first layer  {meta['module']} ({meta['kind']}) weight {tuple(meta['shape'])} "
        f"stride {tuple(meta['stride'])} padding {meta['padding']} groups {meta['groups']}"
    )
    click.echo(
        f"  input        {layer.channel_order} mean {_fmt(layer.mean)} std {_fmt(layer.std)}"
    )
    if layer.flags:
        click.echo(f"  flags        {layer.flags}")
    prov = data["provenance"]
    click.echo(
        f"  provenance   {prov['repo']} {prov['file']} [{prov['tensor_key']}] "
        f"sha256 {str(prov['sha256'])[:16]}… fetched {prov['bytes_fetched']} B"
    )
    if basis is None:
        click.echo("  no energy profile stored")
    else:
        click.echo(f"  basis        {basis.id} ({basis.n_patches} patches)")
        click.echo("  energy       " + " ".join(f"{v:.2f}" for v in profile))
        click.echo(f"  peak         component {int(np.argmax(profile))} of {len(profile)}")
        if fit is None:
            click.echo(f"  fit          none: {fit_error}")
        else:
            click.echo(
                f"  fit          s={fit.s:.4g} r={fit.r:.3f} (r(λ)={fit.r_lambda:.3f}, "
                f"r(1/λ)={fit.r_inv_lambda:.3f}) whitening index "
                f"{fit.whitening_index:.3f}"
            )
    if plot:
        click.echo(f"  plot         {plot}")


def _fmt(values) -> str:
    return "-" if values is None else "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@cli.command("corr")
@store_option
@click.option("--source", "-s", "source_name", help="Only this source.")
@click.option("--kernel", "-k", help="Only this kernel shape: 7x7 or 3x7x7.")
@click.option("--dataset", "-d", help="Basis dataset key (default: the store's most common).")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the correlation heatmap as PNG (needs one kernel shape).",
)
@format_option()
def corr_cmd(store_path, source_name, kernel, dataset, plot, fmt) -> None:
    """Pearson correlations between energy profiles, grouped by (C, kh, kw)."""
    from zooscan import query

    parse_kernel(kernel)
    with Store(resolve_store(store_path), mode="r") as store:
        groups = query.correlations(store, source=source_name, kernel=kernel, dataset=dataset)
    if not groups:
        raise UserError("no energy profiles match (see `zooscan ls`)")
    if plot:
        if len(groups) > 1:
            shapes = ", ".join(shape_label(k) for k in groups)
            raise UserError(f"--plot needs one kernel shape; the store has {shapes}: add --kernel")
        from zooscan.plots import plot_heatmap

        ((shape, matrix),) = groups.items()
        plot_heatmap(plot, matrix, title=f"energy-profile correlation, {shape_label(shape)}")
    if fmt == "json":
        echo_json(
            {
                shape_label(shape): {"models": [_label(i) for i in m.index], "matrix": m.to_numpy()}
                for shape, m in groups.items()
            }
        )
    elif fmt == "csv":
        rows = []
        for shape, m in groups.items():
            labels = [_label(i) for i in m.index]
            for i, a in enumerate(labels):
                for j, b in enumerate(labels):
                    rows.append({"shape": shape_label(shape), "a": a, "b": b, "r": m.iat[i, j]})
        echo_frame(pd.DataFrame(rows), "csv")
    else:
        for shape, m in groups.items():
            click.echo(f"== {shape_label(shape)}: {len(m)} models")
            shown = m.copy()
            shown.index = shown.columns = [_label(i) for i in m.index]
            echo_frame(shown, "table", index=True)
            off = m.to_numpy()[~np.eye(len(m), dtype=bool)]
            if off.size:
                click.echo(f"   mean off-diagonal r = {np.nanmean(off):.3f}")
    if plot:
        click.echo(f"heatmap written to {plot}", err=fmt != "table")


def _label(index) -> str:
    return ":".join(index) if isinstance(index, tuple) else str(index)


@cli.command("fit")
@click.argument("models", nargs=-1)
@click.option("--all", "all_models", is_flag=True, help="Fit every model in the store.")
@store_option
@click.option("--source", "-s", "source_name", help="Only this source.")
@click.option("--dataset", "-d", help="Basis dataset key (default: each model's first).")
@format_option()
def fit_cmd(models, all_models, store_path, source_name, dataset, fmt) -> None:
    """Fit the linear-CNN formula (paper Eq. 3) to energy profiles; print s, r, baselines."""
    from zooscan.energy import fit_formula

    if not models and not all_models:
        raise UserError("name MODELs or use --all")
    rows = []
    with Store(resolve_store(store_path), mode="r") as store:
        targets = (
            store.models(source_name)
            if all_models
            else [find_model(store, m, source_name) for m in models]
        )
        for source, name in targets:
            stored = store.load_model(source, name)
            if not stored.energy:
                continue
            basis = pick_basis(store, stored, dataset)
            row = {
                "source": source,
                "name": name,
                "shape": shape_label(basis.shape_key),
                "basis": basis.id,
            }
            try:
                fit = fit_formula(stored.energy[basis.id], basis.lambdas)
            except UserError as exc:  # e.g. a constant profile: report it, fit the rest
                rows.append({**row, "error": str(exc)})
                continue
            rows.append(
                {
                    **row,
                    "s": fit.s,
                    "r": fit.r,
                    "r_lambda": fit.r_lambda,
                    "r_inv_lambda": fit.r_inv_lambda,
                    "whitening_index": fit.whitening_index,
                    "at_limit": fit.at_limit,
                }
            )
    if fmt == "table":
        frame = pd.DataFrame(rows)
        if not frame.empty:
            frame = frame.drop(columns=["basis"])
        echo_frame(frame, "table")
    else:
        echo_frame(pd.DataFrame(rows), fmt)


@cli.command("fsck")
@store_option
@click.option(
    "--repair",
    is_flag=True,
    help="Fix what is safe: fold the journal, set damaged entries aside, delete stale "
    "temporaries, move damaged models to the failures (a re-scan redoes them).",
)
@format_option(("table", "json"))
def fsck_cmd(store_path, repair, fmt) -> None:
    """Check a store: schema, every group and dataset readable, data digests, shapes,
    energy against projections, weights against their provenance sha256, journal and
    temporaries. Exit status 0 when no problem remains, 1 otherwise."""
    from zooscan.fsck import check_store

    report = check_store(resolve_store(store_path), repair=repair)
    if fmt == "json":
        echo_json(report.as_dict())
    else:
        _print_fsck(report)
    if not report.ok:
        sys.exit(1)


def _print_fsck(report) -> None:
    c = report.checked
    click.echo(
        f"checked {report.store}: {c.get('models', 0)} models, {c.get('bases', 0)} bases, "
        f"{c.get('runs', 0)} runs, {c.get('failures', 0)} failures, "
        f"{c.get('journal_entries', 0)} journal entries; {c.get('datasets', 0)} datasets read"
    )
    if c.get("models"):
        click.echo(
            f"provenance: {c.get('provenance_verified', 0)} weights match the sha256 of their "
            f"checkpoint tensor, {c.get('provenance_not_comparable', 0)} cannot be compared "
            "(derived, several tensors, or no sha256)"
        )
    for problem in report.problems:
        if problem.repaired:
            action = f"repaired: {problem.repair}"
        elif problem.repair:
            action = f"--repair: {problem.repair}"
        else:
            action = "cannot be repaired safely"
        click.echo(f"problem: {problem.line()} [{action}]")
    if report.repair:
        for problem in report.remaining:
            click.echo(f"remains: {problem.line()}")
    for note in report.notes:
        click.echo(f"note: {note}")
    if report.ok:
        click.echo("clean" if not report.problems else "clean after repair")
    else:
        fixable = sum(1 for p in report.remaining if p.repair)
        click.echo(
            f"{len(report.remaining)} problems remain"
            + (f" ({fixable} fixable with --repair)" if fixable and not report.repair else "")
        )


@cli.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("zooscan-demo"),
    show_default=True,
    help="Folder for the demo's store and plots.",
)
@click.option("--quick", is_flag=True, help="Fewer models (for tests).")
def demo_cmd(out_dir: Path, quick: bool) -> None:
    """Run the main job offline on the embedded default (synthetic patches, torchvision
    architectures at random initialisation, plus any pretrained weights already cached)."""
    from zooscan.demo import run_demo

    run_demo(out_dir, quick=quick)


def build_cli() -> click.Group:
    """The CLI with every plugin's commands added."""
    plugins.plugin_manager().hook.register_commands(cli=cli)
    return cli


def main() -> None:
    """Console-script entry point."""
    try:
        group = build_cli()
    except ZooscanError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    group(prog_name="zooscan")
