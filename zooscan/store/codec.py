"""Records as HDF5 attributes: FirstLayer and PatchBasis to attribute dicts and back.

Attribute dicts are in their Python form (str, int, float, bool, lists); that form is
also what the journal stores. :func:`write_attrs` and :func:`read_attrs` convert to and
from what HDF5 holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from datetime import date, datetime, timezone
from typing import Any

import h5py
import numpy as np

from zooscan.errors import StoreError
from zooscan.records import FirstLayer, PatchBasis, Provenance

__all__ = [
    "BASIS_ARRAYS",
    "DIGEST_ATTR",
    "array_digest",
    "basis_attrs",
    "basis_from",
    "create_dataset",
    "json_text",
    "layer_attrs",
    "layer_from_attrs",
    "now",
    "py_value",
    "read_attrs",
    "text",
    "write_attrs",
]

BASIS_ARRAYS = ("components", "eigenvalues", "mean", "second_moment")
"""The datasets of a basis group, each float64."""
DIGEST_ATTR = "sha256"
"""Attribute of every dataset the store writes: :func:`array_digest` of its data, so
``zooscan fsck`` can tell whether the bytes read back are the bytes written."""

_FLOAT_LISTS = frozenset({"mean", "std"})
_LAYER_TEXT = ("module", "kind", "channel_order")
_PROVENANCE_TEXT = ("repo", "revision", "file", "tensor_key", "sha256")


def now() -> str:
    """The current UTC time as ISO-8601 (``2025-02-03T04:05:06Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def text(value: Any) -> str:
    """A string HDF5 can hold: NUL becomes U+FFFD, unencodable characters are replaced."""
    return str(value).replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _to_json(value: Mapping[str, Any], what: str) -> str:
    try:
        return json.dumps(dict(value), sort_keys=True, default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"cannot store the layer's {what}: {exc}") from None


def _finite(value: Any) -> Any:
    """``value`` (parsed JSON) with every non-finite float replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def json_text(value: Mapping[str, Any], what: str) -> str:
    """``value`` as strict JSON text (RFC 8259), for attributes any JSON parser reads.

    Keys are sorted; numpy scalars and arrays, sets, paths and dates are converted as
    for ``flags``; tuples become lists; non-finite floats (NaN, ±inf) become ``null``
    (strict JSON has no literal for them). Raise :class:`StoreError` naming ``what``
    when a value cannot be converted.
    """
    try:
        plain = json.loads(json.dumps(dict(value), default=_json_default))
        out = json.dumps(_finite(plain), sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"cannot store {what}: {exc}") from None
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: keep them exactly, as \u escapes
        out = json.dumps(_finite(plain), sort_keys=True, ensure_ascii=True, allow_nan=False)
    return out


def _int_pair(value: Any) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [int(value), int(value)]
    return [int(v) for v in value]


def layer_attrs(layer: FirstLayer, source: str, name: str, scanned_at: str) -> dict[str, Any]:
    """Every :class:`FirstLayer` field as JSON-able attribute values (``None`` omitted)."""
    prov = layer.provenance
    attrs: dict[str, Any] = {
        "source": text(source),
        "name": text(name),
        "scanned_at": text(scanned_at),
        "stride": _int_pair(layer.stride),
        "padding": text(layer.padding)
        if isinstance(layer.padding, str)
        else _int_pair(layer.padding),
        "dilation": _int_pair(layer.dilation),
        "groups": int(layer.groups),
        "bias": bool(layer.bias),
        "flags": _to_json(layer.flags, "flags"),
        "metadata": _to_json(layer.metadata, "metadata"),
        "bytes_fetched": int(prov.bytes_fetched),
    }
    attrs.update({key: text(getattr(layer, key)) for key in _LAYER_TEXT})
    for key in ("mean", "std"):
        if getattr(layer, key) is not None:
            attrs[key] = [float(v) for v in getattr(layer, key)]
    if layer.input_size is not None:
        attrs["input_size"] = _int_pair(layer.input_size)
    for key in _PROVENANCE_TEXT:
        if getattr(prov, key) is not None:
            attrs[key] = text(getattr(prov, key))
    if prov.byte_range is not None:
        attrs["byte_range"] = _int_pair(prov.byte_range)
    return attrs


def layer_from_attrs(attrs: Mapping[str, Any], weight: np.ndarray) -> FirstLayer:
    """Rebuild a :class:`FirstLayer` from attributes in their Python form."""
    padding = attrs["padding"]

    def floats(key: str) -> tuple[float, ...] | None:
        return tuple(float(v) for v in attrs[key]) if key in attrs else None

    def pair(key: str) -> tuple[int, int] | None:
        return (int(attrs[key][0]), int(attrs[key][1])) if key in attrs else None

    provenance = Provenance(
        **{key: attrs.get(key) for key in _PROVENANCE_TEXT},
        byte_range=pair("byte_range"),
        bytes_fetched=int(attrs.get("bytes_fetched", 0)),
    )
    return FirstLayer(
        weight=weight,
        module=attrs["module"],
        kind=attrs["kind"],
        stride=pair("stride") or (1, 1),
        padding=padding if isinstance(padding, str) else (int(padding[0]), int(padding[1])),
        dilation=pair("dilation") or (1, 1),
        groups=int(attrs["groups"]),
        bias=bool(attrs["bias"]),
        mean=floats("mean"),
        std=floats("std"),
        channel_order=attrs["channel_order"],
        input_size=pair("input_size"),
        flags=json.loads(attrs.get("flags", "{}")),
        provenance=provenance,
        metadata=json.loads(attrs.get("metadata", "{}")),
    )


def basis_attrs(basis: PatchBasis) -> dict[str, Any]:
    """A :class:`PatchBasis`'s scalar fields as attribute values, stamped ``created_at``."""
    space = {3: "pixel-rgb", 1: "pixel-luminance"}.get(int(basis.channels), "pixel")
    return {
        "id": text(basis.id),
        "dataset": text(basis.dataset),
        "channels": int(basis.channels),
        "kh": int(basis.kh),
        "kw": int(basis.kw),
        "centered": bool(basis.centered),
        "n_patches": int(basis.n_patches),
        "n_images": int(basis.n_images),
        "space": space,
        "created_at": now(),
    }


def basis_from(attrs: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> PatchBasis:
    """Rebuild a :class:`PatchBasis` from its attributes and its :data:`BASIS_ARRAYS`."""
    return PatchBasis(
        dataset=attrs["dataset"],
        channels=int(attrs["channels"]),
        kh=int(attrs["kh"]),
        kw=int(attrs["kw"]),
        centered=bool(attrs["centered"]),
        components=arrays["components"],
        eigenvalues=arrays["eigenvalues"],
        mean=arrays["mean"],
        second_moment=arrays["second_moment"],
        n_patches=int(attrs["n_patches"]),
        n_images=int(attrs["n_images"]),
    )


def array_digest(data: np.ndarray) -> str:
    """sha256 (hex) of an array's elements in C order, little-endian, in its dtype."""
    arr = np.asarray(data)
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return hashlib.sha256(little.tobytes()).hexdigest()


def create_dataset(group: h5py.Group, name: str, data: np.ndarray, **options: Any) -> h5py.Dataset:
    """``group.create_dataset(name, data=data, **options)`` stamped with the digest
    (:data:`DIGEST_ATTR`) of the data as stored (in the dataset's dtype)."""
    ds = group.create_dataset(name, data=data, **options)
    ds.attrs[DIGEST_ATTR] = array_digest(np.asarray(data, dtype=ds.dtype))
    return ds


def _h5_value(key: str, value: Any) -> Any:
    """A Python attribute value as HDF5 stores it."""
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, list):
        return np.asarray(value, dtype=np.float64 if key in _FLOAT_LISTS else np.int64)
    return value


def py_value(value: Any) -> Any:
    """An HDF5 attribute value in its Python form."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, h5py.Empty):
        return []
    return value


def read_attrs(obj: h5py.HLObject, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Attributes in their Python form: all of them, or those of ``keys`` present."""
    attrs = obj.attrs
    if keys is None:
        return {key: py_value(value) for key, value in attrs.items()}
    return {key: py_value(attrs[key]) for key in keys if key in attrs}


def write_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    """Write attribute values given in their Python form."""
    for key, value in attrs.items():
        obj.attrs[key] = _h5_value(key, value)
