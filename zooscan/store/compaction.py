"""Folding the overlay into a copy of the main file, and repacking (the write half of
compaction; :class:`~zooscan.store.store.Store` installs the result atomically)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from zooscan.store.codec import BASIS_ARRAYS, text, write_attrs
from zooscan.store.naming import escape_name
from zooscan.store.overlay import Key, Overlay, PendingModel
from zooscan.store.runs import write_run

__all__ = ["apply_overlay", "write_repacked"]

logger = logging.getLogger("zooscan.store")


def _replace(parent: h5py.Group, name: str) -> int:
    """Delete ``parent[name]`` when present; return the bytes of data it held."""
    if name not in parent:
        return 0
    wasted = 0

    def count(_: str, obj: Any) -> None:
        nonlocal wasted
        if isinstance(obj, h5py.Dataset):
            wasted += obj.id.get_storage_size()

    obj = parent[name]
    if isinstance(obj, h5py.Group):
        obj.visititems(count)
    else:
        count(name, obj)
    del parent[name]
    return wasted


def _write_model(models: h5py.Group, key: Key, model: PendingModel) -> int:
    group = models.require_group(escape_name(key[0]))
    wasted = _replace(group, escape_name(key[1]))
    g = group.create_group(escape_name(key[1]))
    write_attrs(g, model.attrs)
    g.create_dataset("weight", data=model.weight)
    g.create_group("energy")
    g.create_group("projections")
    for bid, pair in model.analyses.items():
        wasted += _write_analysis(g, bid, pair)
    return wasted


def _write_analysis(g: h5py.Group, bid: str, pair: tuple[np.ndarray, np.ndarray]) -> int:
    wasted = 0
    for sub, data in zip(("energy", "projections"), pair, strict=True):
        group = g.require_group(sub)
        wasted += _replace(group, escape_name(bid))
        ds = group.create_dataset(escape_name(bid), data=data)
        ds.attrs["basis"] = text(bid)
    return wasted


def _write_basis(bases: h5py.Group, attrs: Mapping[str, Any], arrays: Mapping[str, Any]) -> int:
    name = escape_name(attrs["id"])
    wasted = _replace(bases, name)
    g = bases.create_group(name)
    write_attrs(g, attrs)
    for key in BASIS_ARRAYS:
        g.create_dataset(key, data=np.asarray(arrays[key], dtype=np.float64))
    return wasted


def _write_failure(failures: h5py.Group, key: Key, state: dict[str, Any] | None) -> None:
    src = escape_name(key[0])
    if state is None:
        if src in failures:
            _replace(failures[src], escape_name(key[1]))
            if len(failures[src]) == 0:
                del failures[src]
        return
    group = failures.require_group(src)
    _replace(group, escape_name(key[1]))
    g = group.create_group(escape_name(key[1]))
    write_attrs(g, {"source": text(key[0]), "name": text(key[1]), **state})


def apply_overlay(h5: h5py.File, overlay: Overlay) -> int:
    """Write the overlay into an open (writable) store; return bytes of data dropped."""
    wasted = 0
    for attrs, arrays in overlay.bases.values():
        wasted += _write_basis(h5.require_group("bases"), attrs, arrays)
    models = h5.require_group("models")
    for key, model in overlay.models.items():
        wasted += _write_model(models, key, model)
    for (source, name), analyses in overlay.analyses.items():
        g = models.get(f"{escape_name(source)}/{escape_name(name)}")
        if g is None:  # only when the main file was deleted behind the journal's back
            logger.warning("dropping analyses of %r from %r: the model is gone", name, source)
            continue
        for bid, pair in analyses.items():
            wasted += _write_analysis(g, bid, pair)
    failures = h5.require_group("failures")
    for key, state in overlay.failures.items():
        _write_failure(failures, key, state)
    if overlay.runs:  # a store without runs has no /runs group
        runs = h5.require_group("runs")
        for run_id, run in overlay.runs.items():
            wasted += write_run(runs, run_id, run)
    return wasted


def write_repacked(h5: h5py.File, tmp: Path) -> None:
    """Copy every object and root attribute of ``h5`` into a fresh file ``tmp``."""
    with h5py.File(tmp, "w") as out:
        for key, value in h5.attrs.items():
            out.attrs[key] = value
        for name in h5:
            h5.copy(h5[name], out, name=name)
