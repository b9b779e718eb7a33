"""Read-only pandas views of a store: profiles, correlations, model, failure and run
tables.

Every function takes an open :class:`zooscan.store.Store` (``mode="r"`` is enough) and
never writes to it.

**Which basis.** A model may have energy profiles on several bases (one per patch
dataset and centering). Profiles are only compared on one basis of one kernel shape
``(C, kh, kw)``. Unless a basis id or a dataset is given, each shape uses the basis
that maximises, in order: the number of selected models (of any shape) with a profile
on that basis's *dataset* (so every shape uses the store's most common dataset when it
can), the number of models of that shape with a profile on that exact basis, centered
before uncentered, and then the id in alphabetical order. Models without a profile on
the chosen basis are left out and listed in ``frame.attrs["missing"]``. A trainer run's
profiles over training (:func:`run_profiles`) choose among the run's bases the same
way.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from zooscan.errors import UserError
from zooscan.store import ModelSummary, Store

__all__ = [
    "MODEL_COLUMNS",
    "FAILURE_COLUMNS",
    "dataset_of",
    "correlations",
    "failures_table",
    "models_table",
    "parse_kernel",
    "profiles",
    "profiles_by_shape",
    "run_profiles",
    "runs_table",
]

Shape = tuple[int, int, int]
KernelSpec = str | int | tuple[int, ...] | list[int] | None

MODEL_COLUMNS = (
    "source",
    "name",
    "C",
    "kh",
    "kw",
    "out",
    "stride",
    "module",
    "kind",
    "channel_order",
    "flags",
    "bytes_fetched",
    "scanned_at",
    "bases",
)
"""Columns of :func:`models_table`."""

FAILURE_COLUMNS = (
    "source",
    "name",
    "error_class",
    "message",
    "attempts",
    "first_failed_at",
    "last_failed_at",
)
"""Columns of :func:`failures_table`."""

_KERNEL_RE = re.compile(r"^\s*(\d+)(?:\s*[x×]\s*(\d+))?(?:\s*[x×]\s*(\d+))?\s*$", re.IGNORECASE)
_BASIS_RE = re.compile(
    r"^(?P<dataset>.*)~(?P<c>\d+)x(?P<kh>\d+)x(?P<kw>\d+)~(?P<cent>centered|uncentered)$"
)


def parse_kernel(kernel: KernelSpec) -> tuple[int | None, int, int] | None:
    """Parse a kernel selector into ``(C or None, kh, kw)``.

    Accepts ``"7x7"``, ``"3x7x7"``, ``"7"`` (square), an int, or a tuple ``(kh, kw)`` /
    ``(C, kh, kw)``; ``None`` selects every shape.
    """
    if kernel is None:
        return None
    if isinstance(kernel, (int, np.integer)) and not isinstance(kernel, bool):
        return None, int(kernel), int(kernel)
    if isinstance(kernel, str):
        match = _KERNEL_RE.match(kernel)
        if match:
            parts = [int(p) for p in match.groups() if p is not None]
            return _kernel_from_parts(parts, kernel)
    elif isinstance(kernel, (tuple, list)) and all(
        isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in kernel
    ):
        return _kernel_from_parts([int(p) for p in kernel], kernel)
    raise UserError(f"bad kernel {kernel!r}: use KHxKW or CxKHxKW, e.g. 7x7 or 3x7x7")


def _kernel_from_parts(parts: list[int], original: Any) -> tuple[int | None, int, int]:
    if len(parts) == 1:
        return None, parts[0], parts[0]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise UserError(f"bad kernel {original!r}: use KHxKW or CxKHxKW, e.g. 7x7 or 3x7x7")


def _kernel_matches(shape: Shape, spec: tuple[int | None, int, int] | None) -> bool:
    if spec is None:
        return True
    c, kh, kw = spec
    return shape[1:] == (kh, kw) and (c is None or shape[0] == c)


def _shape_text(shape: Shape) -> str:
    return "x".join(str(v) for v in shape)


def _parse_basis_id(basis_id: str) -> tuple[str, Shape, bool] | None:
    match = _BASIS_RE.match(basis_id)
    if match is None:
        return None
    shape = (int(match["c"]), int(match["kh"]), int(match["kw"]))
    return match["dataset"], shape, match["cent"] == "centered"


def dataset_of(basis_id: str) -> str:
    """The dataset key of a basis id (``<dataset>~<C>x<kh>x<kw>~centered``); an id of
    another form is its own dataset."""
    parsed = _parse_basis_id(basis_id)
    return parsed[0] if parsed else basis_id


def _select(store: Store, source: str | None, kernel: KernelSpec) -> list[ModelSummary]:
    spec = parse_kernel(kernel)
    return [s for s in store.summaries(source) if _kernel_matches(s.shape_key, spec)]


def _by_shape(summaries: Iterable[ModelSummary]) -> dict[Shape, list[ModelSummary]]:
    groups: dict[Shape, list[ModelSummary]] = defaultdict(list)
    for summary in summaries:
        groups[summary.shape_key].append(summary)
    return dict(sorted(groups.items()))


def _dataset_counts(summaries: Iterable[ModelSummary]) -> Counter[str]:
    """How many models have at least one profile on each dataset."""
    counts: Counter[str] = Counter()
    for summary in summaries:
        counts.update({dataset_of(bid) for bid in summary.bases})
    return counts


def _choose_basis(
    group: list[ModelSummary], dataset: str | None, store_counts: Counter[str]
) -> str | None:
    """The basis a shape group is compared on (see the module docstring), or ``None``."""
    counts = Counter(
        bid
        for summary in group
        for bid in summary.bases
        if dataset is None or dataset_of(bid) == dataset or bid == dataset
    )
    if not counts:
        return None
    return min(counts, key=lambda bid: _basis_rank(bid, store_counts, counts[bid]))


def _basis_rank(bid: str, store_counts: Counter[str], count: int) -> tuple[int, int, bool, str]:
    """Sort key of a candidate basis: most common dataset in the store, most profiles
    of the shape on it, centered first, then by id."""
    parsed = _parse_basis_id(bid)
    centered = parsed[2] if parsed else True
    return -store_counts[dataset_of(bid)], -count, not centered, bid


def _profile_frame(store: Store, shape: Shape, group: list[ModelSummary], bid: str) -> pd.DataFrame:
    having = [s for s in group if bid in s.bases]
    rows = [store.energy(s.source, s.name, bid) for s in having]
    d = shape[0] * shape[1] * shape[2]
    values = np.vstack(rows) if rows else np.empty((0, d))
    index = pd.MultiIndex.from_tuples(
        [(s.source, s.name) for s in having], names=["source", "name"]
    )
    frame = pd.DataFrame(values, index=index, columns=pd.RangeIndex(values.shape[1]))
    frame.attrs.update(
        basis=bid,
        dataset=dataset_of(bid),
        shape_key=shape,
        missing=[(s.source, s.name) for s in group if bid not in s.bases],
    )
    return frame


def profiles(
    store: Store,
    *,
    source: str | None = None,
    kernel: KernelSpec = None,
    basis: str | None = None,
) -> pd.DataFrame:
    """Energy profiles of one kernel shape on one basis, one row per model.

    The index is a ``(source, name)`` MultiIndex, the columns are the component
    indices ``0..d-1``; ``frame.attrs`` holds ``basis``, ``dataset``, ``shape_key`` and
    ``missing`` (selected models without a profile on that basis). ``basis`` is a basis
    id or a dataset key (default: see the module docstring). Raise :class:`UserError`
    when nothing matches or when models of several shapes match (choose ``kernel``, or
    use :func:`profiles_by_shape`).
    """
    selected = _select(store, source, kernel)
    parsed = _parse_basis_id(basis) if basis is not None else None
    if parsed is not None:
        selected = [s for s in selected if s.shape_key == parsed[1]]
    groups = _by_shape(selected)
    if not groups:
        raise UserError(f"no stored model matches{_filters_text(source, kernel, basis)}")
    if len(groups) > 1:
        found = ", ".join(f"{_shape_text(k)}: {len(v)}" for k, v in groups.items())
        raise UserError(
            f"models of several kernel shapes match ({found}); choose one with kernel "
            "(e.g. 3x7x7) or compare per shape with profiles_by_shape"
        )
    ((shape, group),) = groups.items()
    bid = basis if parsed is not None else _choose_basis(group, basis, _dataset_counts(selected))
    if bid is None:
        raise UserError(f"no stored profile on dataset {basis!r} for kernel {_shape_text(shape)}")
    return _profile_frame(store, shape, group, bid)


def _filters_text(source: str | None, kernel: KernelSpec, basis: str | None) -> str:
    parts = [
        f"{key}={value!r}"
        for key, value in (("source", source), ("kernel", kernel), ("basis", basis))
        if value is not None
    ]
    return f" ({', '.join(parts)})" if parts else ""


def profiles_by_shape(
    store: Store,
    *,
    source: str | None = None,
    basis_dataset: str | None = None,
    kernel: KernelSpec = None,
) -> dict[Shape, pd.DataFrame]:
    """:func:`profiles` for every kernel shape, keyed by ``(C, kh, kw)`` in sorted order.

    ``basis_dataset`` restricts to bases of that dataset key (or that exact basis id);
    a shape with no profile on it is left out.
    """
    selected = _select(store, source, kernel)
    store_counts = _dataset_counts(selected)
    out: dict[Shape, pd.DataFrame] = {}
    for shape, group in _by_shape(selected).items():
        bid = _choose_basis(group, basis_dataset, store_counts)
        if bid is not None:
            out[shape] = _profile_frame(store, shape, group, bid)
    return out


def correlations(
    store: Store,
    *,
    source: str | None = None,
    kernel: KernelSpec = None,
    dataset: str | None = None,
) -> dict[Shape, pd.DataFrame]:
    """Pearson correlation matrices of the energy profiles, one per kernel shape.

    Only profiles of the same ``(C, kh, kw)`` on the same basis are compared (DESIGN §1).
    Each matrix is indexed by ``(source, name)`` on both axes and carries the
    profiles' ``attrs`` (``basis``, ``dataset``, ``shape_key``, ``missing``).
    """
    out: dict[Shape, pd.DataFrame] = {}
    frames = profiles_by_shape(store, source=source, basis_dataset=dataset, kernel=kernel)
    for shape, frame in frames.items():
        corr = frame.T.corr(method="pearson")
        corr.attrs.update(frame.attrs)
        out[shape] = corr
    return out


def models_table(
    store: Store, *, source: str | None = None, kernel: KernelSpec = None
) -> pd.DataFrame:
    """One row per stored model with the columns of :data:`MODEL_COLUMNS`.

    ``stride`` is a ``(sh, sw)`` tuple, ``flags`` a dict, ``bases`` a list of basis ids.
    """
    rows = [
        {
            "source": s.source,
            "name": s.name,
            "C": s.shape[1],
            "kh": s.shape[2],
            "kw": s.shape[3],
            "out": s.shape[0],
            "stride": s.stride,
            "module": s.module,
            "kind": s.kind,
            "channel_order": s.channel_order,
            "flags": s.flags,
            "bytes_fetched": s.bytes_fetched,
            "scanned_at": s.scanned_at,
            "bases": list(s.bases),
        }
        for s in _select(store, source, kernel)
    ]
    return pd.DataFrame(rows, columns=list(MODEL_COLUMNS))


def failures_table(store: Store, *, source: str | None = None) -> pd.DataFrame:
    """One row per recorded failure with the columns of :data:`FAILURE_COLUMNS`."""
    return pd.DataFrame(store.failures(source), columns=list(FAILURE_COLUMNS))


# ----------------------------------------------------------------------------- runs

_RUN_COLUMNS = ("run_id", "snapshots", "created_at")
_SCALARS = (str, int, float, bool, type(None))


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened into dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def runs_table(store: Store) -> pd.DataFrame:
    """One row per trainer run, sorted by run id.

    Columns: ``run_id``; the run's config flattened (nested keys joined by ``.``, e.g.
    ``optimizer.lr``; lists kept as lists); the scalar entries of its summary (e.g.
    ``train_acc``, ``test_acc``, ``fit_r``; lists and dicts left out); ``snapshots``
    (how many first-layer snapshots the run kept) and ``created_at``. A config key
    named like one of those three becomes ``config.<key>``, and a summary key named
    like a config column or one of those three becomes ``summary.<key>``. A run
    without some key has ``None``/``NaN`` there.
    """
    infos = [store.run_info(run_id) for run_id in store.runs()]
    configs = [
        {(f"config.{k}" if k in _RUN_COLUMNS else k): v for k, v in _flatten(i["config"]).items()}
        for i in infos
    ]
    config_cols = list(dict.fromkeys(key for config in configs for key in config))
    taken = set(config_cols) | set(_RUN_COLUMNS)
    summaries = [
        {
            (f"summary.{k}" if k in taken else k): v
            for k, v in i["summary"].items()
            if isinstance(v, _SCALARS)
        }
        for i in infos
    ]
    summary_cols = list(dict.fromkeys(key for summary in summaries for key in summary))
    rows = [
        {
            "run_id": info["run_id"],
            **config,
            **summary,
            "snapshots": info["snapshots"],
            "created_at": info["created_at"],
        }
        for info, config, summary in zip(infos, configs, summaries, strict=True)
    ]
    return pd.DataFrame(rows, columns=["run_id", *config_cols, *summary_cols, *_RUN_COLUMNS[1:]])


def _run_basis(store: Store, run_id: str, kind: str, bases: list[str], basis: str | None) -> str:
    """The basis a run's ``kind`` profiles are read on (see the module docstring)."""
    if basis in bases:
        return basis
    candidates = [b for b in bases if basis is None or dataset_of(b) == basis]
    if not candidates:
        raise UserError(
            f"run {run_id!r} has no {kind!r} profile on {basis!r} "
            f"(it has: {', '.join(bases) or 'none'})"
        )
    if len(candidates) == 1:
        return candidates[0]
    store_counts = _dataset_counts(store.summaries())
    return min(candidates, key=lambda bid: _basis_rank(bid, store_counts, 0))


def run_profiles(
    store: Store, run_id: str, kind: str = "energy", basis: str | None = None
) -> pd.DataFrame:
    """A trainer run's profiles over training: one row per snapshot, indexed by optimiser
    ``step``, columns the component indices ``0..d-1``.

    ``kind`` is ``energy`` (init subtracted), ``energy_raw``, ``exact``,
    ``closed_form``... (whatever the run stored); ``basis`` a basis id or a dataset key
    (default: chosen as for :func:`profiles`). ``frame.attrs`` holds ``run_id``,
    ``kind``, ``basis``, ``dataset`` and ``shape_key``. Raise :class:`UserError` when
    the run, the kind or the basis is absent.
    """
    info = store.run_info(run_id)
    if kind not in info["profiles"]:
        kinds = ", ".join(info["profiles"]) or "none"
        raise UserError(f"run {run_id!r} has no {kind!r} profiles (it has: {kinds})")
    bid = _run_basis(store, run_id, kind, info["profiles"][kind], basis)
    values = store.run_profile(run_id, kind, bid)
    frame = pd.DataFrame(
        values,
        index=pd.Index(info["steps"], name="step"),
        columns=pd.RangeIndex(values.shape[1]),
    )
    frame.attrs.update(
        run_id=run_id,
        kind=kind,
        basis=bid,
        dataset=dataset_of(bid),
        shape_key=tuple(info["shape"][1:]),
    )
    return frame
