"""Folding the overlay into a copy of the main file, and repacking (the write half of
compaction; :class:`~zooscan.store.store.Store` installs the result atomically)."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from zooscan.store.codec import BASIS_ARRAYS, create_dataset, text, write_attrs
from zooscan.store.files import reserve
from zooscan.store.naming import escape_name
from zooscan.store.overlay import Key, Overlay, PendingModel
from zooscan.store.runs import write_run

__all__ = [
    "CopyError",
    "apply_overlay",
    "hdf5_image",
    "new_file",
    "rebuild",
    "write_filtered",
    "write_repacked",
]

logger = logging.getLogger("zooscan.store")

OBJECT_BYTES = 16 << 10
"""Space reserved per object written by a compaction, beyond its data (HDF5 metadata:
object headers, group B-trees and heaps)."""
SPARE_BYTES = 1 << 20
"""Space reserved per compaction beyond the estimate."""


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
    create_dataset(g, "weight", model.weight)
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
        ds = create_dataset(group, escape_name(bid), data)
        ds.attrs["basis"] = text(bid)
    return wasted


def _write_basis(bases: h5py.Group, attrs: Mapping[str, Any], arrays: Mapping[str, Any]) -> int:
    name = escape_name(attrs["id"])
    wasted = _replace(bases, name)
    g = bases.create_group(name)
    write_attrs(g, attrs)
    for key in BASIS_ARRAYS:
        create_dataset(g, key, np.asarray(arrays[key], dtype=np.float64))
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


def hdf5_image(fill: Callable[[h5py.File], None] | None = None) -> bytes:
    """The bytes of a new HDF5 file, built in memory (``fill`` writes into it first)."""
    with h5py.File(f"zooscan-{uuid.uuid4().hex}", "w", driver="core", backing_store=False) as h5:
        if fill is not None:
            fill(h5)
        h5.flush()
        return h5.id.get_file_image()


def new_file(tmp: Path, size: int) -> None:
    """An empty HDF5 file ``tmp`` with ``size`` bytes reserved (:func:`reserve`): a full
    disk fails here with :class:`OSError`, never later inside HDF5."""
    image = hdf5_image()
    with open(tmp, "wb") as fh:
        fh.write(image)
    reserve(tmp, max(size, len(image)))


def write_repacked(h5: h5py.File, tmp: Path, size: int) -> None:
    """Copy every object and root attribute of ``h5`` into a fresh file ``tmp``, with
    ``size`` bytes reserved for it (:func:`new_file`)."""
    new_file(tmp, size)
    with h5py.File(tmp, "a") as out:
        for key, value in h5.attrs.items():
            out.attrs[key] = value
        for name in h5:
            h5.copy(h5[name], out, name=name)


def write_filtered(
    h5: h5py.File,
    tmp: Path,
    skip: Collection[str],
    size: int,
    progress: Callable[[str], None] | None = None,
    *,
    root_attrs: bool = True,
) -> None:
    """Like :func:`write_repacked`, leaving out the objects at the paths in ``skip``
    (link paths from the root, ``models/<source>/<name>``) and everything below them,
    and the root attributes unless ``root_attrs``. ``progress(path)`` is called before
    each object is copied (``/attrs`` before the root attributes)."""
    progress = progress or (lambda path: None)
    new_file(tmp, size)
    with h5py.File(tmp, "a") as out:
        if root_attrs:
            progress("/attrs")
            for key, value in h5.attrs.items():
                out.attrs[key] = value
        _copy_members(h5, out, "", frozenset(skip), progress)


class CopyError(Exception):
    """An object of the source file that cannot be copied (its link ``path``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def _copy_members(
    src: h5py.Group,
    dst: h5py.Group,
    prefix: str,
    skip: frozenset[str],
    progress: Callable[[str], None],
) -> None:
    for name in src:
        path = prefix + name
        if path in skip:
            continue
        progress(path)
        walk = any(other.startswith(path + "/") for other in skip) or _walked(path)
        try:
            if not walk:
                src.copy(src[name], dst, name=name)
                continue
            group = dst.create_group(name)
            for key, value in src[name].attrs.items():
                group.attrs[key] = value
        except (OSError, KeyError, ValueError, RuntimeError) as exc:  # damaged in the source
            raise CopyError(path, " ".join(str(exc).split())) from None
        _copy_members(src[name], group, path + "/", skip, progress)


def rebuild(
    source: h5py.File,
    tmp: Path,
    *,
    skip: Collection[str] = (),
    failures: Mapping[Key, dict[str, Any]] | None = None,
    attrs: Mapping[str, Any] | None = None,
    root_attrs: bool = True,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write a new main file ``tmp`` from ``source``: every object but those at the
    paths in ``skip`` (:func:`write_filtered`), the failure states ``failures`` recorded,
    the root attributes copied (unless ``root_attrs`` is false), ``attrs`` set (HDF5
    values) and ``wasted_bytes`` reset, the top-level groups every store has created
    when missing. Room for a copy of the whole source file is reserved first."""
    size = os.path.getsize(source.filename)
    failures = failures or {}
    room = size + SPARE_BYTES + OBJECT_BYTES * len(failures)
    write_filtered(source, tmp, skip, room, progress, root_attrs=root_attrs)
    with h5py.File(tmp, "a") as out:
        for key, value in (attrs or {}).items():
            out.attrs[key] = value
        out.attrs["wasted_bytes"] = np.int64(0)
        for group in ("bases", "models", "failures"):
            out.require_group(group)
        apply_overlay(out, Overlay(failures=dict(failures)))


def _walked(path: str) -> bool:
    """Whether :func:`write_filtered` copies the group at ``path`` member by member (so
    that progress names each basis, model, failure and run) rather than whole."""
    top, _, rest = path.partition("/")
    if not rest:
        return top in ("bases", "models", "failures", "runs")
    return top in ("models", "failures") and "/" not in rest
