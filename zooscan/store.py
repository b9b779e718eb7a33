"""The HDF5 store: one file of first layers, patch bases, energy profiles and failures.

The file (default ``zoo.h5``, or ``$ZOOSCAN_STORE``) is plain HDF5 that any HDF5
tool reads; ``docs/store.md`` documents every group, dataset and attribute.

Crash safety (DESIGN §4). HDF5 files do not survive a writer being killed, so the
main file is **never modified in place**: it is only ever replaced atomically by a
complete new file (``<store>.tmp-<pid>``, fsynced, ``os.replace``-d, directory
fsynced). A commit is made durable cheaply by an append-only journal beside the store
(``<store>.journal/``: one checksummed file per operation, written to a temporary
name, fsynced and renamed), which is compacted into the main file in batches, at
close, and by the next writer that opens the store. Readers see the main file plus
every complete journal entry, so a committed model is visible (and safe) as soon as
:meth:`Store.commit_model` returns. One writer at a time holds ``<store>.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from zooscan import __version__
from zooscan.errors import StoreError, UserError
from zooscan.records import Analysis, FirstLayer, ModelRecord, PatchBasis, Provenance

__all__ = [
    "DEFAULT_STORE",
    "FORMAT",
    "SCHEMA_VERSION",
    "STORE_ENV",
    "ModelSummary",
    "Store",
    "StoredModel",
    "default_store_path",
    "escape_name",
    "unescape_name",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Version of the layout in ``docs/store.md``; root attribute ``schema_version``."""
FORMAT = "zooscan"
"""Root attribute ``format`` that marks an HDF5 file as a zooscan store."""
DEFAULT_STORE = "zoo.h5"
"""Store path when neither ``--store`` nor ``$ZOOSCAN_STORE`` is given."""
STORE_ENV = "ZOOSCAN_STORE"

JOURNAL_SUFFIX = ".journal"
LOCK_SUFFIX = ".lock"
TMP_INFIX = ".tmp-"
_ENTRY_SUFFIX = ".rec"
_CORRUPT_SUFFIX = ".corrupt"
_MAGIC = b"ZSJRNL01"
_DIGEST = 32
_REPACK_MIN_WASTE = 1 << 20
_REPACK_RATIO = 0.25
_SNAPSHOT_TRIES = 200

Key = tuple[str, str]


def default_store_path() -> Path:
    """The store path: ``$ZOOSCAN_STORE`` when set (and not empty), else ``zoo.h5``."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


# --------------------------------------------------------------------------- names

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_HEX = frozenset("0123456789abcdefABCDEF")


def escape_name(name: str) -> str:
    """Escape any string into one valid, non-empty HDF5 link name, reversibly.

    The RFC 3986 unreserved characters ``A-Z a-z 0-9 - _ . ~`` are kept, except a
    leading ``.`` (so ``.`` and ``..`` never occur); every other character is
    percent-encoded as its UTF-8 bytes (``/`` -> ``%2F``). The empty string is ``%``.
    """
    if name == "":
        return "%"
    out: list[str] = []
    for i, ch in enumerate(name):
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def unescape_name(escaped: str) -> str:
    """Invert :func:`escape_name`. Raise :class:`ValueError` on a malformed name."""
    if escaped == "%":
        return ""
    if not escaped:
        raise ValueError("an escaped name is never empty")
    buf = bytearray()
    i = 0
    while i < len(escaped):
        ch = escaped[i]
        if ch == "%":
            digits = escaped[i + 1 : i + 3]
            if len(digits) != 2 or not set(digits) <= _HEX:
                raise ValueError(f"bad percent escape in {escaped!r}")
            buf.append(int(digits, 16))
            i += 3
        elif ch in _SAFE:
            buf.append(ord(ch))
            i += 1
        else:
            raise ValueError(f"{escaped!r} is not an escaped name (character {ch!r})")
    return buf.decode("utf-8", "surrogatepass")


def _unescape_link(escaped: str) -> str:
    try:
        return unescape_name(escaped)
    except ValueError as exc:
        raise StoreError(f"the store holds a malformed name: {exc}") from None


# --------------------------------------------------------------------------- records


@dataclass
class StoredModel:
    """One model as read back from the store."""

    source: str
    name: str
    layer: FirstLayer
    energy: dict[str, np.ndarray]
    """Energy profile per basis id, ``(d,)`` float64."""
    projections: dict[str, np.ndarray]
    """Projections per basis id, ``(out, d)`` float64."""
    scanned_at: str

    @property
    def analyses(self) -> list[Analysis]:
        """The stored analyses, sorted by basis id."""
        return [
            Analysis(basis_id=bid, projections=self.projections[bid], energy=self.energy[bid])
            for bid in sorted(self.energy)
        ]

    def to_record(self) -> ModelRecord:
        """The :class:`ModelRecord` that stores this model again."""
        return ModelRecord(
            source=self.source,
            name=self.name,
            layer=self.layer,
            analyses=self.analyses,
            scanned_at=self.scanned_at,
        )


@dataclass(frozen=True)
class ModelSummary:
    """A stored model's metadata, read without its weight or projections (cheap)."""

    source: str
    name: str
    shape: tuple[int, int, int, int]
    """Weight shape ``(out, C, kh, kw)``."""
    module: str
    kind: str
    stride: tuple[int, int]
    channel_order: str
    flags: dict[str, Any]
    bytes_fetched: int
    scanned_at: str
    bases: tuple[str, ...]
    """Ids of the bases the model has an energy profile on, sorted."""

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """``(C, kh, kw)``."""
        return self.shape[1], self.shape[2], self.shape[3]


# --------------------------------------------------------------------------- attributes

_FLOAT_LISTS = frozenset({"mean", "std"})
_SUMMARY_KEYS = (
    "module",
    "kind",
    "stride",
    "channel_order",
    "flags",
    "bytes_fetched",
    "scanned_at",
)
_LAYER_TEXT = ("module", "kind", "channel_order")
_PROVENANCE_TEXT = ("repo", "revision", "file", "tensor_key", "sha256")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: Any) -> str:
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


def _int_pair(value: Any) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [int(value), int(value)]
    return [int(v) for v in value]


def _layer_attrs(layer: FirstLayer, source: str, name: str, scanned_at: str) -> dict[str, Any]:
    """Every :class:`FirstLayer` field as JSON-able attribute values (``None`` omitted)."""
    prov = layer.provenance
    attrs: dict[str, Any] = {
        "source": _text(source),
        "name": _text(name),
        "scanned_at": _text(scanned_at),
        "stride": _int_pair(layer.stride),
        "padding": _text(layer.padding)
        if isinstance(layer.padding, str)
        else _int_pair(layer.padding),
        "dilation": _int_pair(layer.dilation),
        "groups": int(layer.groups),
        "bias": bool(layer.bias),
        "flags": _to_json(layer.flags, "flags"),
        "metadata": _to_json(layer.metadata, "metadata"),
        "bytes_fetched": int(prov.bytes_fetched),
    }
    attrs.update({key: _text(getattr(layer, key)) for key in _LAYER_TEXT})
    for key in ("mean", "std"):
        if getattr(layer, key) is not None:
            attrs[key] = [float(v) for v in getattr(layer, key)]
    if layer.input_size is not None:
        attrs["input_size"] = _int_pair(layer.input_size)
    for key in _PROVENANCE_TEXT:
        if getattr(prov, key) is not None:
            attrs[key] = _text(getattr(prov, key))
    if prov.byte_range is not None:
        attrs["byte_range"] = _int_pair(prov.byte_range)
    return attrs


def _layer_from_attrs(attrs: Mapping[str, Any], weight: np.ndarray) -> FirstLayer:
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


def _basis_attrs(basis: PatchBasis) -> dict[str, Any]:
    space = {3: "pixel-rgb", 1: "pixel-luminance"}.get(int(basis.channels), "pixel")
    return {
        "id": _text(basis.id),
        "dataset": _text(basis.dataset),
        "channels": int(basis.channels),
        "kh": int(basis.kh),
        "kw": int(basis.kw),
        "centered": bool(basis.centered),
        "n_patches": int(basis.n_patches),
        "n_images": int(basis.n_images),
        "space": space,
        "created_at": _now(),
    }


_BASIS_ARRAYS = ("components", "eigenvalues", "mean", "second_moment")


def _basis_from(attrs: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> PatchBasis:
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


def _py_value(value: Any) -> Any:
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


def _read_attrs(obj: h5py.HLObject, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Attributes in their Python form: all of them, or those of ``keys`` present."""
    attrs = obj.attrs
    if keys is None:
        return {key: _py_value(value) for key, value in attrs.items()}
    return {key: _py_value(attrs[key]) for key in keys if key in attrs}


def _write_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        obj.attrs[key] = _h5_value(key, value)


# --------------------------------------------------------------------------- journal


@dataclass
class _Entry:
    """One journaled operation: ``op``, JSON-able ``fields`` and named arrays."""

    op: str
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class _CorruptEntry(Exception):
    pass


def _encode_entry(seq: int, entry: _Entry) -> bytes:
    """``MAGIC | u64 header length | JSON header | raw arrays | sha256 of all before``."""
    arrays = {
        key: np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        for key, arr in entry.arrays.items()
    }
    header = {
        "seq": seq,
        "op": entry.op,
        "fields": entry.fields,
        "arrays": [[key, arr.dtype.str, list(arr.shape)] for key, arr in arrays.items()],
    }
    head = json.dumps(header, ensure_ascii=True).encode("ascii")
    parts = [
        _MAGIC,
        struct.pack("<Q", len(head)),
        head,
        *(arr.tobytes() for arr in arrays.values()),
    ]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def _decode_entry(data: bytes, seq: int) -> _Entry:
    """Parse and verify one journal entry; raise :class:`_CorruptEntry` when it is not whole."""
    if len(data) < len(_MAGIC) + 8 + _DIGEST or not data.startswith(_MAGIC):
        raise _CorruptEntry("bad magic or truncated")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise _CorruptEntry("checksum mismatch")
    (head_len,) = struct.unpack_from("<Q", body, len(_MAGIC))
    pos = len(_MAGIC) + 8
    try:
        header = json.loads(body[pos : pos + head_len].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _CorruptEntry(f"bad header: {exc}") from None
    if header.get("seq") != seq:
        raise _CorruptEntry(f"sequence number {header.get('seq')} in entry {seq}")
    pos += head_len
    arrays: dict[str, np.ndarray] = {}
    for key, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dt.itemsize
        if pos + nbytes > len(body):
            raise _CorruptEntry("array data truncated")
        arr = np.frombuffer(body, dtype=dt, count=count, offset=pos).reshape(shape)
        arrays[key] = arr.astype(dt.newbyteorder("="), copy=True)
        pos += nbytes
    if pos != len(body):
        raise _CorruptEntry("trailing bytes")
    return _Entry(op=header["op"], fields=header["fields"], arrays=arrays)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes, tmp: Path) -> None:
    """Write ``data`` to ``tmp``, fsync it, rename it to ``path``, fsync the directory."""
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class _Journal:
    """The ``<store>.journal/`` directory: entries ``<seq:016d>.rec``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:016d}{_ENTRY_SUFFIX}"

    def seqs(self, *, include_corrupt: bool = False) -> list[int]:
        """Sequence numbers of the complete entries (and quarantined ones when asked)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        suffixes = (
            (_ENTRY_SUFFIX, _ENTRY_SUFFIX + _CORRUPT_SUFFIX)
            if include_corrupt
            else (_ENTRY_SUFFIX,)
        )
        found = []
        for name in names:
            for suffix in suffixes:
                stem = name[: -len(suffix)]
                if name.endswith(suffix) and stem.isdigit():
                    found.append(int(stem))
        return sorted(found)

    def read(self, seq: int) -> _Entry:
        """Read one entry (FileNotFoundError when compacted away; _CorruptEntry)."""
        return _decode_entry(self._path(seq).read_bytes(), seq)

    def write(self, seq: int, entry: _Entry) -> int:
        """Write one entry durably; return its size in bytes."""
        data = _encode_entry(seq, entry)
        _write_durably(self._path(seq), data, self.dir / f"{TMP_INFIX}{seq:016d}-{os.getpid()}")
        return len(data)

    def remove(self, seqs: list[int]) -> None:
        for seq in seqs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(seq))

    def ensure(self) -> None:
        """Create the directory (durably) when missing."""
        if not self.dir.is_dir():
            self.dir.mkdir()
            _fsync_dir(self.dir.parent)

    def quarantine(self, seq: int) -> None:
        path = self._path(seq)
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, path.with_name(path.name + _CORRUPT_SUFFIX))

    def remove_temporaries(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                if name.startswith(TMP_INFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.dir / name)


# --------------------------------------------------------------------------- overlay


@dataclass
class _PendingModel:
    attrs: dict[str, Any]
    weight: np.ndarray
    analyses: dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class _Overlay:
    """The journal's effect on top of the main file, merged in sequence order."""

    models: dict[Key, _PendingModel] = field(default_factory=dict)
    """Models written (or replaced) since the main file."""
    analyses: dict[Key, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    """Analyses added to models of the main file."""
    bases: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = field(default_factory=dict)
    failures: dict[Key, dict[str, Any] | None] = field(default_factory=dict)
    """Failure state per model; ``None`` means cleared."""

    def __bool__(self) -> bool:
        return bool(self.models or self.analyses or self.bases or self.failures)

    def apply(self, entry: _Entry) -> None:
        """Merge one entry; raise :class:`_CorruptEntry` when its fields are malformed."""
        try:
            self._apply(entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise _CorruptEntry(f"malformed {entry.op!r} entry: {exc!r}") from None

    def _apply(self, entry: _Entry) -> None:
        f, arrays = entry.fields, entry.arrays
        if entry.op == "basis":
            self.bases[f["attrs"]["id"]] = (f["attrs"], arrays)
            return
        key = (f["source"], f["name"])
        if entry.op == "model":
            analyses = {
                bid: (arrays[f"energy/{bid}"], arrays[f"projections/{bid}"]) for bid in f["bases"]
            }
            self.models[key] = _PendingModel(f["attrs"], arrays["weight"], analyses)
            self.analyses.pop(key, None)
            self.failures[key] = None
        elif entry.op == "analysis":
            pair = (arrays["energy"], arrays["projections"])
            if key in self.models:
                self.models[key].analyses[f["basis_id"]] = pair
            else:
                self.analyses.setdefault(key, {})[f["basis_id"]] = pair
        elif entry.op == "failure":
            self.failures[key] = f["state"]
        elif entry.op == "clear_failure":
            self.failures[key] = None
        else:
            raise _CorruptEntry(f"unknown operation {entry.op!r}")


def _model_entry(record: ModelRecord) -> _Entry:
    layer = record.layer
    weight = layer.weight
    if hasattr(weight, "detach"):
        weight = weight.detach().cpu().numpy()
    weight = np.array(weight, dtype=np.float32, order="C")  # a copy: the caller may reuse it
    if weight.ndim != 4:
        raise StoreError(
            f"model {record.name!r}: weight must be (out, C, kh, kw), got {weight.shape}"
        )
    arrays: dict[str, np.ndarray] = {"weight": weight}
    bases: list[str] = []
    for analysis in record.analyses:
        if analysis.basis_id in bases:
            raise StoreError(f"model {record.name!r}: two analyses on basis {analysis.basis_id!r}")
        energy, proj = _check_analysis(record.name, weight.shape, analysis)
        arrays[f"energy/{analysis.basis_id}"] = energy
        arrays[f"projections/{analysis.basis_id}"] = proj
        bases.append(analysis.basis_id)
    attrs = _layer_attrs(layer, record.source, record.name, record.scanned_at or _now())
    fields = {"source": record.source, "name": record.name, "attrs": attrs, "bases": bases}
    return _Entry("model", fields, arrays)


def _check_analysis(
    name: str, shape: tuple[int, ...], analysis: Analysis
) -> tuple[np.ndarray, np.ndarray]:
    out, d = int(shape[0]), int(np.prod(shape[1:]))
    energy = np.array(analysis.energy, dtype=np.float64, order="C")
    proj = np.array(analysis.projections, dtype=np.float64, order="C")
    if energy.shape != (d,) or proj.shape != (out, d):
        raise StoreError(
            f"model {name!r}: analysis on {analysis.basis_id!r} has energy {energy.shape} and "
            f"projections {proj.shape}, expected ({d},) and ({out}, {d})"
        )
    return energy, proj


# --------------------------------------------------------------------------- main file


def _describe_open_error(path: Path, exc: Exception) -> StoreError:
    return StoreError(f"{path} is corrupt or unreadable as an HDF5 file ({exc})")


def _open_main(path: Path) -> h5py.File:
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
        raise _describe_open_error(path, exc) from None
    try:
        _check_root(path, h5)
    except BaseException:
        h5.close()
        raise
    return h5


def _check_root(path: Path, h5: h5py.File) -> None:
    fmt = _py_value(h5.attrs.get("format"))
    if fmt != FORMAT:
        raise StoreError(f"{path} is an HDF5 file but not a zooscan store (no format='zooscan')")
    version = _py_value(h5.attrs.get("schema_version"))
    if not isinstance(version, int):
        raise StoreError(f"{path} has no valid schema_version attribute")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema version {version}, newer than this zooscan reads "
            f"({SCHEMA_VERSION}); upgrade zooscan"
        )
    if version < 1:
        raise StoreError(f"{path} has an invalid store schema version {version}")


def _fd_inode(h5: h5py.File) -> int:
    fd = h5.id.get_vfd_handle()
    return os.fstat(fd).st_ino


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


def _write_model(models: h5py.Group, key: Key, model: _PendingModel) -> int:
    group = models.require_group(escape_name(key[0]))
    wasted = _replace(group, escape_name(key[1]))
    g = group.create_group(escape_name(key[1]))
    _write_attrs(g, model.attrs)
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
        ds.attrs["basis"] = _text(bid)
    return wasted


def _write_basis(bases: h5py.Group, attrs: Mapping[str, Any], arrays: Mapping[str, Any]) -> int:
    name = escape_name(attrs["id"])
    wasted = _replace(bases, name)
    g = bases.create_group(name)
    _write_attrs(g, attrs)
    for key in _BASIS_ARRAYS:
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
    _write_attrs(g, {"source": _text(key[0]), "name": _text(key[1]), **state})


def _apply_overlay(h5: h5py.File, overlay: _Overlay) -> int:
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
    return wasted


def _init_root(h5: h5py.File) -> None:
    h5.attrs["format"] = FORMAT
    h5.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
    h5.attrs["zooscan_version"] = __version__
    h5.attrs["created_at"] = _now()
    h5.attrs["journal_seq"] = np.int64(0)
    h5.attrs["wasted_bytes"] = np.int64(0)
    for group in ("bases", "models", "failures"):
        h5.require_group(group)


# --------------------------------------------------------------------------- store


class Store:
    """A zooscan HDF5 store.

    ``mode="r"`` opens an existing store read-only: a consistent snapshot (the main
    file plus every complete journal entry at open time); it takes no lock and works
    while a writer is active. ``mode="a"`` opens read-write, creating the store when
    missing: it takes the writer lock (a second writer is refused), recovers what a
    killed writer left, and makes every write durable before returning.

    ``compact_every`` and ``compact_ratio`` tune the batching: the journal is compacted
    into the main file when it holds at least ``compact_every`` entries *and* at least
    ``compact_ratio`` times the main file's size in bytes (so compaction costs stay
    proportional to what is written), and always at :meth:`flush`, :meth:`close` and
    open.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: str = "r",
        compact_every: int = 64,
        compact_ratio: float = 0.05,
    ) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.compact_every = max(1, int(compact_every))
        self.compact_ratio = float(compact_ratio)
        self._abs = Path(os.path.abspath(self.path))
        self._journal = _Journal(self._abs.with_name(self._abs.name + JOURNAL_SUFFIX))
        self._lock = threading.RLock()
        self._h5: h5py.File | None = None
        self._lock_fd: int | None = None
        self._overlay = _Overlay()
        self._pending: list[int] = []
        self._pending_bytes = 0
        self._last_seq = 0
        if mode == "r":
            self._h5, self._overlay, self._last_seq = self._snapshot()
        else:
            self._open_writer()

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._h5 is None else self.mode
        return f"Store({str(self.path)!r}, {state})"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._h5 is None

    def close(self) -> None:
        """Compact the journal (writer) and release the file and the writer lock."""
        with self._lock:
            if self._h5 is None:
                return
            try:
                if self.mode == "a" and self._pending:
                    self._compact_quietly()
            finally:
                self._h5.close()
                self._h5 = None
                self._release_lock()

    def flush(self, *, repack: bool = False) -> None:
        """Compact the journal into the HDF5 file now (atomic replace).

        ``repack=True`` rewrites every object into a fresh file, dropping the space
        left by replaced models (done automatically when it exceeds a quarter of the
        file).
        """
        with self._lock:
            self._check_writable()
            self._compact(repack=repack)

    def refresh(self) -> None:
        """Reader: take a new snapshot, seeing what writers committed since it opened.

        (A writer always sees its own commits; for it this is a no-op.)
        """
        with self._lock:
            old = self._check_open()
            if self.mode == "r":
                self._h5, self._overlay, self._last_seq = self._snapshot()
                old.close()

    def _snapshot(self) -> tuple[h5py.File, _Overlay, int]:
        """Open the main file and read the journal entries it does not include.

        A writer may compact meanwhile (replace the main file, then delete the entries
        it absorbed); when the path no longer names the file we opened, retry.
        """
        for _ in range(_SNAPSHOT_TRIES):
            h5 = _open_main(self._abs)
            try:
                result = self._read_journal_after(h5)
            except BaseException:
                h5.close()
                raise
            if result is not None:
                overlay, last = result
                return h5, overlay, last
            h5.close()
            time.sleep(0.005)
        raise StoreError(f"{self.path} keeps changing under the reader; try again")

    def _read_journal_after(self, h5: h5py.File) -> tuple[_Overlay, int] | None:
        inode = _fd_inode(h5)
        base = int(_py_value(h5.attrs.get("journal_seq", 0)))
        overlay = _Overlay()
        last = base
        try:
            for seq in self._journal.seqs():
                if seq <= base:
                    continue
                try:
                    overlay.apply(self._journal.read(seq))
                except _CorruptEntry as exc:
                    logger.warning(
                        "ignoring damaged journal entry %d of %s: %s", seq, self.path, exc
                    )
                last = seq
            if os.stat(self._abs).st_ino != inode:
                return None
        except FileNotFoundError:
            return None
        return overlay, last

    def _open_writer(self) -> None:
        if self._abs.exists():
            _open_main(self._abs).close()
        elif not self._abs.parent.is_dir():
            raise StoreError(
                f"cannot create {self.path}: directory {self._abs.parent} does not exist"
            )
        self._acquire_lock()
        try:
            self._recover()
        except BaseException:
            if self._h5 is not None:
                self._h5.close()
                self._h5 = None
            self._release_lock()
            raise

    def _recover(self) -> None:
        """Clean up after a killed writer and compact what its journal holds."""
        for stale in self._abs.parent.glob(f"{self._abs.name}{TMP_INFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self._journal.ensure()
        self._journal.remove_temporaries()
        if not self._abs.exists():
            self._create_empty()
        self._h5 = _open_main(self._abs)
        base = int(_py_value(self._h5.attrs.get("journal_seq", 0)))
        seqs = self._journal.seqs()
        self._journal.remove([s for s in seqs if s <= base])
        for seq in (s for s in seqs if s > base):
            try:
                self._overlay.apply(self._journal.read(seq))
                self._pending.append(seq)
            except _CorruptEntry as exc:
                logger.warning("damaged journal entry %d of %s set aside: %s", seq, self.path, exc)
                self._journal.quarantine(seq)
        self._last_seq = max([base, *self._journal.seqs(include_corrupt=True)])
        if self._pending:
            self._compact_quietly()

    def _create_empty(self) -> None:
        tmp = self._tmp_path()
        try:
            with h5py.File(tmp, "w") as h5:
                _init_root(h5)
            self._install(tmp)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot create {self.path}: {exc}") from None

    def _acquire_lock(self) -> None:
        lock_path = self._abs.with_name(self._abs.name + LOCK_SUFFIX)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {lock_path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(
                    f"store {self.path} is being written by another zooscan process (pid {holder})"
                ) from None
            raise StoreError(f"cannot lock {lock_path}: {exc}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._lock_fd, 0)
        os.close(self._lock_fd)
        self._lock_fd = None

    # ----------------------------------------------------------------- commits

    def _tmp_path(self) -> Path:
        return self._abs.with_name(f"{self._abs.name}{TMP_INFIX}{os.getpid()}")

    def _check_open(self) -> h5py.File:
        if self._h5 is None:
            raise StoreError(f"store {self.path} is closed")
        return self._h5

    def _check_writable(self) -> None:
        self._check_open()
        if self.mode != "a":
            raise StoreError(f"store {self.path} was opened read-only")

    def _append(self, entry: _Entry) -> None:
        """Make one operation durable (journal), apply it to the view, maybe compact."""
        self._check_writable()
        seq = self._last_seq + 1
        try:
            size = self._journal.write(seq, entry)
        except OSError as exc:
            raise StoreError(f"cannot write to the store journal of {self.path}: {exc}") from None
        self._last_seq = seq
        self._overlay.apply(entry)
        self._pending.append(seq)
        self._pending_bytes += size
        if len(self._pending) >= self.compact_every and (
            self._pending_bytes >= self.compact_ratio * os.path.getsize(self._abs)
        ):
            self._compact_quietly()

    def _compact_quietly(self) -> None:
        """Compact; on failure (e.g. a full disk) keep the durable journal and warn."""
        try:
            self._compact()
        except StoreError as exc:
            logger.warning("%s (the journal keeps every commit)", exc)

    def _compact(self, *, repack: bool = False) -> None:
        """Write main file + journal into a new file, replace the main file atomically."""
        h5 = self._check_open()
        wasted = int(_py_value(h5.attrs.get("wasted_bytes", 0)))
        size = os.path.getsize(self._abs)
        repack = repack or (wasted > _REPACK_MIN_WASTE and wasted > _REPACK_RATIO * size)
        if not self._pending and not repack:
            return
        tmp = self._tmp_path()
        try:
            if repack:
                self._write_repacked(h5, tmp)
                wasted = 0
            else:
                shutil.copyfile(self._abs, tmp)
            with h5py.File(tmp, "a") as out:
                wasted += _apply_overlay(out, self._overlay)
                out.attrs["journal_seq"] = np.int64(self._last_seq)
                out.attrs["wasted_bytes"] = np.int64(wasted)
                out.attrs["zooscan_version"] = __version__
            self._install(tmp)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot compact the journal into {self.path}: {exc}") from None
        h5.close()
        self._h5 = _open_main(self._abs)
        self._journal.remove(self._pending)
        self._overlay = _Overlay()
        self._pending = []
        self._pending_bytes = 0

    def _write_repacked(self, h5: h5py.File, tmp: Path) -> None:
        """Copy every object and root attribute of ``h5`` into a fresh file ``tmp``."""
        with h5py.File(tmp, "w") as out:
            for key, value in h5.attrs.items():
                out.attrs[key] = value
            for name in h5:
                h5.copy(h5[name], out, name=name)

    def _install(self, tmp: Path) -> None:
        """fsync ``tmp``, rename it over the main file, fsync the directory."""
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._abs)
        _fsync_dir(self._abs.parent)

    def commit_model(self, record: ModelRecord) -> None:
        """Store one model (replacing one of the same source and name) and clear any
        failure recorded for it. Durable when it returns: a crash right after never
        loses it."""
        with self._lock:
            self._append(_model_entry(record))

    def add_analysis(self, source: str, name: str, analysis: Analysis) -> None:
        """Add (or replace) one basis's energy profile and projections of a stored model."""
        with self._lock:
            summary = self.summary(source, name)
            energy, proj = _check_analysis(name, summary.shape, analysis)
            fields = {"source": source, "name": name, "basis_id": analysis.basis_id}
            self._append(_Entry("analysis", fields, {"energy": energy, "projections": proj}))

    def put_basis(self, basis: PatchBasis) -> None:
        """Store a patch basis (replacing one of the same id); durable when it returns."""
        with self._lock:
            arrays = {
                key: np.array(getattr(basis, key), dtype=np.float64, order="C")
                for key in _BASIS_ARRAYS
            }
            d = basis.dim
            expected = {
                "components": (d, d),
                "eigenvalues": (d,),
                "mean": (d,),
                "second_moment": (d, d),
            }
            for key, shape in expected.items():
                if arrays[key].shape != shape:
                    raise StoreError(
                        f"basis {basis.id!r}: {key} has shape {arrays[key].shape}, expected {shape}"
                    )
            self._append(_Entry("basis", {"attrs": _basis_attrs(basis)}, arrays))

    def record_failure(self, source: str, name: str, error_class: str, message: str) -> None:
        """Record that scanning a model failed (again): increments ``attempts``."""
        with self._lock:
            self._check_writable()
            previous = self._failure(source, name)
            now = _now()
            state = {
                "error_class": _text(error_class),
                "message": _text(message),
                "attempts": int(previous["attempts"]) + 1 if previous else 1,
                "first_failed_at": previous["first_failed_at"] if previous else now,
                "last_failed_at": now,
            }
            self._append(_Entry("failure", {"source": source, "name": name, "state": state}))

    def clear_failure(self, source: str, name: str) -> None:
        """Forget the failure recorded for a model (no-op when there is none)."""
        with self._lock:
            self._check_writable()
            if self._failure(source, name) is not None:
                self._append(_Entry("clear_failure", {"source": source, "name": name}))

    # ----------------------------------------------------------------- reading

    def _main_group(self, *parts: str) -> h5py.Group | None:
        node: Any = self._check_open()
        for part in parts:
            if not isinstance(node, h5py.Group) or part not in node:
                return None
            node = node[part]
        return node

    def _main_model(self, source: str, name: str) -> h5py.Group | None:
        return self._main_group("models", escape_name(source), escape_name(name))

    def has_model(self, source: str, name: str) -> bool:
        """Whether the store holds the model."""
        with self._lock:
            self._check_open()
            return (source, name) in self._overlay.models or self._main_model(
                source, name
            ) is not None

    def models(self, source: str | None = None) -> list[tuple[str, str]]:
        """Every stored ``(source, name)``, sorted; only ``source``'s when given."""
        with self._lock:
            keys = set(self._iter_main_keys("models", source))
            keys.update(k for k in self._overlay.models if source is None or k[0] == source)
            return sorted(keys)

    def _iter_main_keys(self, root: str, source: str | None) -> Iterator[Key]:
        top = self._main_group(root)
        if top is None:
            return
        for src_link in top:
            src = _unescape_link(src_link)
            if source is not None and src != source:
                continue
            for name_link in top[src_link]:
                yield src, _unescape_link(name_link)

    def load_model(self, source: str, name: str) -> StoredModel:
        """Read one model back in full. Raise :class:`UserError` when it is not stored."""
        with self._lock:
            self._check_open()
            pending = self._overlay.models.get((source, name))
            if pending is not None:
                weight, attrs, analyses = (
                    pending.weight.copy(),
                    pending.attrs,
                    dict(pending.analyses),
                )
            else:
                g = self._require_model(source, name)
                weight, attrs = g["weight"][()], _read_attrs(g)
                analyses = {
                    _unescape_link(link): (g["energy"][link][()], g["projections"][link][()])
                    for link in g.get("energy", {})
                }
                analyses.update(self._overlay.analyses.get((source, name), {}))
            return StoredModel(
                source=source,
                name=name,
                layer=_layer_from_attrs(attrs, weight),
                energy={bid: np.array(pair[0]) for bid, pair in sorted(analyses.items())},
                projections={bid: np.array(pair[1]) for bid, pair in sorted(analyses.items())},
                scanned_at=attrs.get("scanned_at", ""),
            )

    def _require_model(self, source: str, name: str) -> h5py.Group:
        g = self._main_model(source, name)
        if g is None:
            raise UserError(f"no model {name!r} from source {source!r} in store {self.path}")
        return g

    def summary(self, source: str, name: str) -> ModelSummary:
        """A model's metadata without reading its weight or projections."""
        with self._lock:
            self._check_open()
            pending = self._overlay.models.get((source, name))
            if pending is not None:
                return _summary(source, name, pending.attrs, pending.weight.shape, pending.analyses)
            return self._main_summary(source, name, self._require_model(source, name))

    def _main_summary(self, source: str, name: str, g: h5py.Group) -> ModelSummary:
        bases = {_unescape_link(link) for link in g.get("energy", {})}
        bases.update(self._overlay.analyses.get((source, name), {}))
        return _summary(source, name, _read_attrs(g, _SUMMARY_KEYS), g["weight"].shape, bases)

    def summaries(self, source: str | None = None) -> list[ModelSummary]:
        """:meth:`summary` of every stored model (of ``source`` when given), sorted."""
        with self._lock:
            found: dict[Key, ModelSummary] = {}
            top = self._main_group("models")
            for src_link in top if top is not None else ():
                src = _unescape_link(src_link)
                if source is not None and src != source:
                    continue
                for name_link, g in top[src_link].items():
                    name = _unescape_link(name_link)
                    if (src, name) not in self._overlay.models:
                        found[(src, name)] = self._main_summary(src, name, g)
            for (src, name), model in self._overlay.models.items():
                if source is None or src == source:
                    found[(src, name)] = _summary(
                        src, name, model.attrs, model.weight.shape, model.analyses
                    )
            return [found[key] for key in sorted(found)]

    def energy(self, source: str, name: str, basis_id: str) -> np.ndarray:
        """One model's energy profile on one basis. Raise :class:`UserError` when absent."""
        with self._lock:
            self._check_open()
            key = (source, name)
            pending = self._overlay.models.get(key)
            found = (pending.analyses if pending else self._overlay.analyses.get(key, {})).get(
                basis_id
            )
            if found is not None:
                return found[0].copy()
            if pending is None:
                group = self._require_model(source, name).get("energy", {})
                if escape_name(basis_id) in group:
                    return group[escape_name(basis_id)][()]
            raise UserError(
                f"model {name!r} from source {source!r} has no profile on basis {basis_id!r}"
            )

    def _failure(self, source: str, name: str) -> dict[str, Any] | None:
        key = (source, name)
        if key in self._overlay.failures:
            state = self._overlay.failures[key]
            return None if state is None else dict(state)
        g = self._main_group("failures", escape_name(source), escape_name(name))
        if g is None:
            return None
        attrs = _read_attrs(g)
        return {
            k: attrs[k]
            for k in ("error_class", "message", "attempts", "first_failed_at", "last_failed_at")
        }

    def failures(self, source: str | None = None) -> list[dict[str, Any]]:
        """Recorded failures, sorted by (source, name): dicts with ``source``, ``name``,
        ``error_class``, ``message``, ``attempts``, ``first_failed_at``, ``last_failed_at``."""
        with self._lock:
            keys = set(self._iter_main_keys("failures", source))
            keys.update(k for k in self._overlay.failures if source is None or k[0] == source)
            out = []
            for src, name in sorted(keys):
                state = self._failure(src, name)
                if state is not None:
                    out.append({"source": src, "name": name, **state})
            return out

    def bases(self) -> list[str]:
        """Ids of the stored patch bases, sorted."""
        with self._lock:
            group = self._main_group("bases")
            ids = {_unescape_link(link) for link in group} if group is not None else set()
            return sorted(ids | set(self._overlay.bases))

    def get_basis(self, basis_id: str) -> PatchBasis | None:
        """The stored basis with this id, or ``None``."""
        with self._lock:
            self._check_open()
            if basis_id in self._overlay.bases:
                attrs, arrays = self._overlay.bases[basis_id]
                return _basis_from(attrs, {k: np.array(v) for k, v in arrays.items()})
            g = self._main_group("bases", escape_name(basis_id))
            if g is None:
                return None
            return _basis_from(_read_attrs(g), {k: g[k][()] for k in _BASIS_ARRAYS})

    def basis_info(self, basis_id: str) -> dict[str, Any] | None:
        """A stored basis's attributes (dataset, channels, kh, kw, centered, ...) without
        its arrays, or ``None``."""
        with self._lock:
            self._check_open()
            if basis_id in self._overlay.bases:
                return dict(self._overlay.bases[basis_id][0])
            g = self._main_group("bases", escape_name(basis_id))
            return None if g is None else _read_attrs(g)


def _summary(
    source: str,
    name: str,
    attrs: Mapping[str, Any],
    shape: tuple[int, ...],
    bases: Any,
) -> ModelSummary:
    stride = attrs.get("stride", [1, 1])
    return ModelSummary(
        source=source,
        name=name,
        shape=(int(shape[0]), int(shape[1]), int(shape[2]), int(shape[3])),
        module=attrs.get("module", ""),
        kind=attrs.get("kind", ""),
        stride=(int(stride[0]), int(stride[1])),
        channel_order=attrs.get("channel_order", ""),
        flags=json.loads(attrs.get("flags", "{}")),
        bytes_fetched=int(attrs.get("bytes_fetched", 0)),
        scanned_at=attrs.get("scanned_at", ""),
        bases=tuple(sorted(bases)),
    )
