"""The main file's root: what makes an HDF5 file a store this zooscan reads, and a new one.

The layout of schema version :data:`SCHEMA_VERSION` is documented in ``docs/store.md``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from zooscan import __version__
from zooscan.errors import StoreError
from zooscan.store.codec import now, py_value

__all__ = ["FORMAT", "SCHEMA_VERSION", "init_root", "open_main"]

SCHEMA_VERSION = 1
"""Version of the layout in ``docs/store.md``; root attribute ``schema_version``."""
FORMAT = "zooscan"
"""Root attribute ``format`` that marks an HDF5 file as a zooscan store."""


def open_main(path: Path) -> h5py.File:
    """Open the main file read-only and check that it is a store this version reads."""
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a zooscan store")
    if not path.exists():
        raise StoreError(f"no store at {path}; run zooscan scan first")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    if not is_hdf5:
        raise StoreError(f"{path} is not an HDF5 file, so not a zooscan store")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path} is corrupt or unreadable as an HDF5 file ({exc})") from None
    try:
        _check_root(path, h5)
    except BaseException:
        h5.close()
        raise
    return h5


def _check_root(path: Path, h5: h5py.File) -> None:
    fmt = py_value(h5.attrs.get("format"))
    if fmt != FORMAT:
        raise StoreError(f"{path} is an HDF5 file but not a zooscan store (no format='zooscan')")
    version = py_value(h5.attrs.get("schema_version"))
    if not isinstance(version, int):
        raise StoreError(f"{path} has no valid schema_version attribute")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema version {version}, newer than this zooscan reads "
            f"({SCHEMA_VERSION}); upgrade zooscan"
        )
    if version < 1:
        raise StoreError(f"{path} has an invalid store schema version {version}")
    for key in ("journal_seq", "wasted_bytes"):
        value = py_value(h5.attrs.get(key, 0))
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise StoreError(
                f"{path} has an invalid {key} attribute {value!r}; run zooscan fsck --repair"
            )


def init_root(h5: h5py.File) -> None:
    """Write the root attributes and top-level groups of an empty store."""
    h5.attrs["format"] = FORMAT
    h5.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
    h5.attrs["zooscan_version"] = __version__
    h5.attrs["created_at"] = now()
    h5.attrs["journal_seq"] = np.int64(0)
    h5.attrs["wasted_bytes"] = np.int64(0)
    for group in ("bases", "models", "failures"):
        h5.require_group(group)
