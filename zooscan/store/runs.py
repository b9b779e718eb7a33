"""Trainer runs: validated ``run`` journal entries, and ``/runs/<run id>`` groups written
and read (layout in ``docs/store.md``).

A run travels through the store as a :class:`PendingRun`: attributes in their Python
form plus its arrays. The journal entry of :func:`run_entry` holds the run *and* its
model view (``/models/trainer/<run id>``), so one durable write commits both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from zooscan.errors import StoreError
from zooscan.records import ModelRecord, RunRecord
from zooscan.store.codec import (
    create_dataset,
    json_text,
    layer_attrs,
    layer_from_attrs,
    now,
    py_value,
    read_attrs,
    text,
    write_attrs,
)
from zooscan.store.entries import model_entry
from zooscan.store.journal import Entry
from zooscan.store.naming import escape_name, unescape_link

__all__ = [
    "RUN_SOURCE",
    "PendingRun",
    "pending_from_entry",
    "read_run",
    "run_entry",
    "run_info",
    "run_info_from_group",
    "run_record",
    "write_run",
]

RUN_SOURCE = "trainer"
"""The source of the model view of every run (``/models/trainer/<run id>``)."""

_LAYER_ONLY = ("source", "name", "scanned_at")
"""Layer attributes that describe a scanned model, not a run (left out of ``/runs``)."""
_STEPS = "run:steps"
_SNAPSHOTS = "run:snapshots"
_GZIP_LEVEL = 4


@dataclass
class PendingRun:
    """One run as the store holds it: attributes (Python form) and arrays."""

    attrs: dict[str, Any]
    """``run_id``, ``created_at``, ``config`` and ``summary`` (JSON text), and the
    final layer's attributes (:func:`zooscan.store.codec.layer_attrs`)."""
    steps: np.ndarray
    """``(S,)`` int64."""
    snapshots: np.ndarray
    """``(S, K, C, kh, kw)`` float32."""
    metrics: dict[str, np.ndarray]
    profiles: dict[str, dict[str, np.ndarray]]
    """``kind -> basis id -> (S, d)`` float64."""


# ----------------------------------------------------------------------------- validation


def _float32(run_id: str, what: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.array(value, dtype=np.float32, order="C")
    except (TypeError, ValueError) as exc:
        raise StoreError(f"run {run_id!r}: {what} is not a float array ({exc})") from None


def _check_steps(run_id: str, steps: Any) -> np.ndarray:
    arr = np.asarray(steps)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise StoreError(
            f"run {run_id!r}: steps must be a non-empty 1-D integer array, "
            f"got {arr.dtype} {arr.shape}"
        )
    arr = arr.astype(np.int64)
    if arr[0] != 0 or np.any(np.diff(arr) <= 0):
        raise StoreError(
            f"run {run_id!r}: steps must start at 0 and increase strictly, got "
            f"{np.array2string(arr, threshold=8)}"
        )
    return arr


def _check_snapshots(run_id: str, snapshots: Any, n_steps: int, weight: np.ndarray) -> np.ndarray:
    arr = _float32(run_id, "snapshots", snapshots)
    expected = (n_steps, *weight.shape)
    if arr.shape != expected:
        raise StoreError(
            f"run {run_id!r}: snapshots have shape {arr.shape}, expected {expected} "
            "(one per step, each shaped like the layer weight)"
        )
    if not np.array_equal(arr[-1], weight, equal_nan=True):
        raise StoreError(f"run {run_id!r}: the last snapshot differs from the layer weight")
    return arr


def _check_metrics(run_id: str, metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, values in metrics.items():
        arr = np.asarray(values)
        kind = arr.dtype.kind
        if not isinstance(name, str) or arr.ndim != 1 or kind not in "biuf":
            raise StoreError(
                f"run {run_id!r}: metric {name!r} must be a 1-D numeric array named by a "
                f"string, got {arr.dtype} {arr.shape}"
            )
        out[name] = arr.astype({"b": np.bool_, "f": np.float64}.get(kind, np.int64))
    lengths = {name: len(arr) for name, arr in out.items()}
    if len(set(lengths.values())) > 1:
        raise StoreError(f"run {run_id!r}: metrics of unequal lengths {lengths}")
    return out


def _check_profiles(
    run_id: str, profiles: Mapping[str, Mapping[str, Any]], n_steps: int, d: int
) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for kind, by_basis in profiles.items():
        if not isinstance(kind, str) or not isinstance(by_basis, Mapping):
            raise StoreError(
                f"run {run_id!r}: profiles must map kind (str) -> basis id -> (S, d) array"
            )
        out[kind] = {}
        for bid, values in by_basis.items():
            arr = np.array(values, dtype=np.float64, order="C")
            if not isinstance(bid, str) or arr.shape != (n_steps, d):
                raise StoreError(
                    f"run {run_id!r}: profile {kind!r} on basis {bid!r} has shape {arr.shape}, "
                    f"expected ({n_steps}, {d}) (one row per snapshot, d = C*kh*kw)"
                )
            out[kind][bid] = arr
    return out


def _check_identity(run: RunRecord, model: ModelRecord) -> str:
    run_id = run.run_id
    if not isinstance(run_id, str) or not run_id:
        raise StoreError(f"a run id must be a non-empty string, got {run_id!r}")
    if model.source != RUN_SOURCE or model.name != run_id:
        raise StoreError(
            f"run {run_id!r}: its model view must be source {RUN_SOURCE!r} named {run_id!r}, "
            f"got source {model.source!r} named {model.name!r}"
        )
    return run_id


def run_entry(run: RunRecord, model: ModelRecord) -> Entry:
    """The ``run`` journal entry of a run and its model view, both validated and copied.

    Its fields and arrays are those of the ``model`` entry of ``model`` plus, under
    ``fields["run"]`` and arrays named ``run:*``, the run itself. Raise
    :class:`StoreError` on any inconsistency (see ``docs/store.md``).
    """
    run_id = _check_identity(run, model)
    view = model_entry(model)
    weight = _float32(run_id, "the layer weight", run.layer.weight)
    if weight.ndim != 4:
        raise StoreError(f"run {run_id!r}: weight must be (K, C, kh, kw), got {weight.shape}")
    if not np.array_equal(view.arrays["weight"], weight, equal_nan=True):
        raise StoreError(
            f"run {run_id!r}: the model view's weight differs from the run's final layer"
        )
    steps = _check_steps(run_id, run.steps)
    snapshots = _check_snapshots(run_id, run.snapshots, len(steps), weight)
    metrics = _check_metrics(run_id, run.metrics)
    profiles = _check_profiles(run_id, run.profiles, len(steps), int(np.prod(weight.shape[1:])))
    created_at = text(run.created_at or now())
    attrs = {
        key: value
        for key, value in layer_attrs(run.layer, RUN_SOURCE, run_id, created_at).items()
        if key not in _LAYER_ONLY
    }
    attrs.update(
        run_id=text(run_id),
        created_at=created_at,
        config=json_text(run.config, f"the config of run {run_id!r}"),
        summary=json_text(run.summary, f"the summary of run {run_id!r}"),
    )
    arrays = {**view.arrays, _STEPS: steps, _SNAPSHOTS: snapshots}
    pairs = [[kind, bid] for kind, by_basis in profiles.items() for bid in by_basis]
    arrays.update({f"run:metric:{i}": arr for i, arr in enumerate(metrics.values())})
    arrays.update({f"run:profile:{i}": profiles[k][b] for i, (k, b) in enumerate(pairs)})
    fields = {
        **view.fields,
        "run": {
            "attrs": attrs,
            "metrics": list(metrics),
            "kinds": list(profiles),
            "profiles": pairs,
        },
    }
    return Entry("run", fields, arrays)


def pending_from_entry(entry: Entry) -> PendingRun:
    """The run held by a ``run`` entry (KeyError/TypeError/ValueError when malformed)."""
    f, arrays = entry.fields["run"], entry.arrays
    profiles: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in f["kinds"]}
    for i, (kind, bid) in enumerate(f["profiles"]):
        profiles[kind][bid] = arrays[f"run:profile:{i}"]
    return PendingRun(
        attrs=dict(f["attrs"]),
        steps=arrays[_STEPS],
        snapshots=arrays[_SNAPSHOTS],
        metrics={name: arrays[f"run:metric:{i}"] for i, name in enumerate(f["metrics"])},
        profiles=profiles,
    )


# ----------------------------------------------------------------------------- HDF5


def _drop(parent: h5py.Group, name: str) -> int:
    """Delete ``parent[name]`` when present; return the bytes of data it held."""
    if name not in parent:
        return 0
    sizes: list[int] = []
    parent[name].visititems(
        lambda _, obj: (
            sizes.append(obj.id.get_storage_size()) if isinstance(obj, h5py.Dataset) else None
        )
    )
    del parent[name]
    return sum(sizes)


def write_run(runs: h5py.Group, run_id: str, run: PendingRun) -> int:
    """Write (or replace) ``runs/<escaped run id>``; return the bytes of data replaced."""
    name = escape_name(run_id)
    wasted = _drop(runs, name)
    g = runs.create_group(name)
    write_attrs(g, run.attrs)
    create_dataset(g, "steps", np.asarray(run.steps, dtype=np.int64))
    snapshots = np.asarray(run.snapshots, dtype=np.float32)
    create_dataset(
        g,
        "snapshots",
        snapshots,
        chunks=(1, *snapshots.shape[1:]) if snapshots.size else None,
        compression="gzip" if snapshots.size else None,
        compression_opts=_GZIP_LEVEL if snapshots.size else None,
        shuffle=bool(snapshots.size),
    )
    metrics = g.create_group("metrics")
    for metric, values in run.metrics.items():
        create_dataset(metrics, escape_name(metric), values)
    profiles = g.create_group("profiles")
    for kind, by_basis in run.profiles.items():
        group = profiles.create_group(escape_name(kind))
        for bid, values in by_basis.items():
            ds = create_dataset(group, escape_name(bid), np.asarray(values, dtype=np.float64))
            ds.attrs["basis"] = text(bid)
    return wasted


def read_run(g: h5py.Group) -> PendingRun:
    """Read a ``/runs/<run id>`` group in full."""
    return PendingRun(
        attrs=read_attrs(g),
        steps=g["steps"][()],
        snapshots=g["snapshots"][()],
        metrics={unescape_link(k): ds[()] for k, ds in g.get("metrics", {}).items()},
        profiles={
            unescape_link(kind): {unescape_link(b): ds[()] for b, ds in group.items()}
            for kind, group in g.get("profiles", {}).items()
        },
    )


def run_record(run: PendingRun) -> RunRecord:
    """The :class:`RunRecord` of a stored run (arrays copied)."""
    attrs = run.attrs
    snapshots = np.array(run.snapshots, dtype=np.float32)
    return RunRecord(
        run_id=attrs["run_id"],
        config=json.loads(attrs["config"]),
        layer=layer_from_attrs(attrs, snapshots[-1].copy()),
        steps=np.array(run.steps, dtype=np.int64),
        snapshots=snapshots,
        metrics={name: np.array(values) for name, values in run.metrics.items()},
        profiles={
            kind: {bid: np.array(values) for bid, values in by_basis.items()}
            for kind, by_basis in run.profiles.items()
        },
        summary=json.loads(attrs["summary"]),
        created_at=attrs["created_at"],
    )


def run_info(
    attrs: Mapping[str, Any],
    steps: np.ndarray,
    shape: tuple[int, ...],
    metrics: list[str],
    profiles: Mapping[str, list[str]],
) -> dict[str, Any]:
    """A run's description without its big arrays (see :meth:`Store.run_info`);
    ``shape`` is the layer's ``(K, C, kh, kw)``."""
    return {
        "run_id": attrs["run_id"],
        "created_at": attrs["created_at"],
        "config": json.loads(attrs["config"]),
        "summary": json.loads(attrs["summary"]),
        "snapshots": len(steps),
        "steps": [int(v) for v in steps],
        "shape": tuple(int(v) for v in shape),
        "metrics": sorted(metrics),
        "profiles": {kind: sorted(bids) for kind, bids in sorted(profiles.items())},
    }


def run_info_from_group(g: h5py.Group) -> dict[str, Any]:
    """:func:`run_info` of a ``/runs/<run id>`` group, reading no big array."""
    keys = ("run_id", "created_at", "config", "summary")
    return run_info(
        {key: py_value(g.attrs[key]) for key in keys},
        g["steps"][()],
        g["snapshots"].shape[1:],
        [unescape_link(k) for k in g.get("metrics", {})],
        {
            unescape_link(kind): [unescape_link(b) for b in group]
            for kind, group in g.get("profiles", {}).items()
        },
    )
