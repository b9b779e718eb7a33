"""Checking a main file object by object: what ``zooscan fsck`` reads and why.

:class:`MainChecker` reads every group, attribute and dataset of an open main file and
lists each :class:`Problem` and the :class:`Damage` a repair removes; :func:`examine`
runs it on a path (and, for a repair, writes the rebuilt file). Reading damaged HDF5
metadata can hang or crash the HDF5 library, so :mod:`zooscan.fsck` calls
:func:`examine` in a child process it watches (``progress`` says which object is
being read; an object that hung is skipped on the next attempt).

Checks, per object:

- root: ``format``, ``schema_version`` (an integer this zooscan reads),
  ``journal_seq`` and ``wasted_bytes`` (non-negative integers), ``/bases``,
  ``/models`` and ``/failures`` groups;
- every dataset readable, its data matching its ``sha256`` attribute
  (:data:`~zooscan.store.codec.DIGEST_ATTR`, on every dataset written since digests
  exist);
- bases: attributes, shapes ``(d, d)``/``(d,)`` with ``d = C*kh*kw``, ``id`` = name;
- models: attributes decodable into a ``FirstLayer``, ``weight`` ``(out, C, kh, kw)``
  float32, energy ``(d,)`` and projections ``(out, d)`` per basis, energy recomputable
  from projections, the weight against its provenance sha256
  (:func:`provenance_status`; a mismatch is a problem only where no digest vouches for
  the stored bytes);
- failures: their attributes;
- runs: attributes and JSON, steps, snapshots, metrics and profiles shapes, the last
  snapshot equal to the model view's weight.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from zooscan.store.codec import (
    BASIS_ARRAYS,
    DIGEST_ATTR,
    array_digest,
    basis_from,
    layer_from_attrs,
    now,
    py_value,
    read_attrs,
)
from zooscan.store.compaction import rebuild
from zooscan.store.journal import Journal
from zooscan.store.naming import escape_name, unescape_link
from zooscan.store.overlay import Key
from zooscan.store.runs import RUN_SOURCE
from zooscan.store.schema import FORMAT, SCHEMA_VERSION
from zooscan.store.store import JOURNAL_SUFFIX, damaged_failure

__all__ = [
    "TRANSFORM_FLAGS",
    "Damage",
    "Examined",
    "MainChecker",
    "Problem",
    "Unopenable",
    "examine",
    "provenance_status",
]

TRANSFORM_FLAGS = (
    "fused_branches",
    "standardized",
    "weight_transform",
    "space_to_depth_converted",
    "patch_order",
    "input_transform",
)
"""Layer flags that mean the stored weight was derived from the checkpoint tensor(s),
so it cannot be hashed back to the provenance sha256."""
ENERGY_RTOL = 1e-9
"""Relative tolerance of energy against the profile recomputed from its projections."""


class Unopenable(OSError):
    """HDF5 cannot open the main file (truncated, or its superblock is damaged)."""


@dataclass
class Problem:
    """One problem: where it is, what is wrong, and what a repair does about it."""

    where: str
    """``model SOURCE:NAME``, ``basis ID``, ``run ID``, ``failure SOURCE:NAME``,
    ``journal entry N``, ``file NAME`` or ``root``."""
    message: str
    repair: str | None = None
    """What ``--repair`` does (``None``: nothing it can do safely)."""
    repaired: bool = False

    def line(self) -> str:
        """The problem as one line."""
        return f"{self.where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "where": self.where,
            "message": self.message,
            "repair": self.repair,
            "repaired": self.repaired,
        }


@dataclass
class Damage:
    """What a repair removes from (or rewrites in) the main file."""

    models: dict[Key, str] = field(default_factory=dict)
    """Models to remove and record as failures, with the reason."""
    bases: set[str] = field(default_factory=set)
    failures: set[Key] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    """Link paths (escaped) removed whole: objects that cannot even be named."""
    attrs: dict[str, Any] = field(default_factory=dict)
    """Root attributes to rewrite."""
    root_attrs_readable: bool = True
    """Whether every root attribute reads (else a rebuild writes only :attr:`attrs`)."""

    @property
    def empty(self) -> bool:
        """Nothing to remove or rewrite."""
        return not (self.models or self.bases or self.failures or self.paths or self.attrs)

    def skip_paths(self) -> set[str]:
        """The link paths a rebuild leaves out."""
        skip = set(self.paths)
        skip |= {f"models/{escape_name(s)}/{escape_name(n)}" for s, n in self.models}
        skip |= {f"bases/{escape_name(b)}" for b in self.bases}
        skip |= {f"failures/{escape_name(s)}/{escape_name(n)}" for s, n in self.failures}
        return skip


class MainChecker:
    """Checks one open main file: :attr:`problems`, :attr:`notes`, :attr:`checked` and
    the :attr:`damage` a repair removes.

    ``progress(path)`` is called before each object (a link path: ``/``,
    ``models/<src>``, ``models/<src>/<name>``...) is read; the objects in ``hung``
    (path -> what happened) are not read again but reported as damaged: reading them
    hung or crashed HDF5 in an earlier attempt (:mod:`zooscan.fsck` runs the checker
    in a child process it can kill).
    """

    def __init__(
        self,
        h5: h5py.File,
        store: Path,
        *,
        hung: Mapping[str, str] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.h5 = h5
        self.store = store
        self.hung = dict(hung or {})
        self.progress = progress or (lambda path: None)
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.checked: dict[str, int] = {}
        self.damage = Damage()
        self.journal_seq = 0
        self.usable = True
        """Whether the file is a store of this schema whose objects can be checked."""
        self.bases: dict[str, tuple[int, int, int]] = {}
        self.datasets = 0
        self.counts = {"models": 0, "bases": 0, "runs": 0, "failures": 0}
        self.provenance = {"verified": 0, "not comparable": 0}
        self.missing_bases: dict[str, int] = {}
        """Basis id -> models with a profile on it, for bases not in ``/bases``."""

    def problem(self, where: str, message: str, repair: str | None) -> None:
        """Record one problem."""
        self.problems.append(Problem(where, message, repair))

    def _enter(self, path: str) -> str | None:
        """Announce reading ``path``; what happened to it in an earlier attempt (it hung
        or crashed HDF5, or could not be copied), or ``None``."""
        if path in self.hung:
            return f"{self.hung[path]} (its metadata is damaged)"
        self.progress(path)
        return None

    def run(self) -> None:
        """Check everything (see :mod:`zooscan.fsck`)."""
        hung = self._enter("/")
        if hung:
            self.problem("root", hung, None)
            self.usable = False
            return
        self._root()
        if self.usable:
            self._root_attrs()
            self._bases()
            self._models()
            self._failures()
            self._runs()
        for bid, count in sorted(self.missing_bases.items()):
            self.notes.append(
                f"{count} models have a profile on basis {bid}, which is not in /bases "
                "(`show` and `fit` need it: a scan that computes it stores it)"
            )
        checked = self.checked
        checked.update(self.counts)
        checked["datasets"] = self.datasets
        checked["provenance_verified"] = self.provenance["verified"]
        checked["provenance_not_comparable"] = self.provenance["not comparable"]

    # ------------------------------------------------------------------ root

    def _root(self) -> None:
        attrs = self.h5.attrs
        fmt = _attr(attrs, "format")
        if fmt != FORMAT:
            self.problem(
                "root",
                f"format attribute is {fmt!r}, not {FORMAT!r}: not a zooscan store (or its "
                "root is damaged)",
                None,
            )
            self.usable = False
            return
        version = _attr(attrs, "schema_version")
        if not _is_int(version) or not 1 <= version <= SCHEMA_VERSION:
            newer = _is_int(version) and version > SCHEMA_VERSION
            self.problem(
                "root",
                f"schema_version {version!r} is newer than this zooscan reads; upgrade zooscan"
                if newer
                else f"schema_version attribute is {version!r}, not a version number",
                None,
            )
            self.usable = False
            return
        for key in ("journal_seq", "wasted_bytes"):
            value = _attr(attrs, key, 0)
            if _is_int(value) and value >= 0:
                continue
            if key == "wasted_bytes":
                self.problem("root", f"wasted_bytes attribute is {value!r}", "reset to 0")
                self.damage.attrs[key] = np.int64(0)
            else:
                self._bad_journal_seq(value)
        if _is_int(_attr(attrs, "journal_seq", 0)):
            self.journal_seq = int(_attr(attrs, "journal_seq", 0))
        for group in ("bases", "models", "failures"):
            hung = self._enter(group)
            try:
                found = not hung and isinstance(self.h5.get(group), h5py.Group)
            except Exception:  # noqa: BLE001 - a damaged link is as good as missing
                found = False
            if not found:
                what = f"/{group} is missing or not a group" + (f" ({hung})" if hung else "")
                self.problem("root", what, "created empty")
                self.damage.paths.add(group)

    def _root_attrs(self) -> None:
        """Every root attribute reads (a rebuild copies them all), else the ones a store
        needs are rewritten from what :meth:`_root` read."""
        why = self._enter("/attrs")
        if not why:
            try:
                dict(self.h5.attrs.items())
                return
            except Exception as exc:  # a damaged attribute
                why = f"cannot be read ({_short(exc)})"
        self.problem(
            "root", f"its attributes cannot be read: {why}", "rewritten: format, version, seq"
        )
        self.damage.root_attrs_readable = False
        self.damage.attrs.update(
            format=FORMAT,
            schema_version=np.int64(SCHEMA_VERSION),
            journal_seq=np.int64(self.journal_seq),
            created_at=now(),
        )

    def _bad_journal_seq(self, value: Any) -> None:
        journal = Journal(self.store.with_name(self.store.name + JOURNAL_SUFFIX))
        if journal.seqs(include_corrupt=True):
            self.problem(
                "root",
                f"journal_seq attribute is {value!r} and the journal holds entries: which of "
                "them the main file includes is unknown",
                None,
            )
        else:
            self.problem("root", f"journal_seq attribute is {value!r}", "reset to 0 (no journal)")
            self.damage.attrs["journal_seq"] = np.int64(0)

    # ------------------------------------------------------------------ walking

    def _members(self, group_path: str, on_fail: Callable[[str], None]) -> list[str]:
        """Link names in ``group_path`` (``[]`` and ``on_fail(reason)`` when unreadable)."""
        hung = self._enter(group_path)
        if hung:
            on_fail(hung)
            return []
        try:
            group = self.h5[group_path]
            if not isinstance(group, h5py.Group):
                on_fail("not a group")
                return []
            return list(group)
        except Exception as exc:  # any HDF5 damage: the group is unreadable
            on_fail(f"cannot be listed ({_short(exc)})")
            return []

    def _read(self, ds: Any, what: str) -> np.ndarray:
        """A dataset's data, its digest checked; raise ``_Bad`` naming ``what``."""
        if not isinstance(ds, h5py.Dataset):
            raise _Bad(f"{what} is not a dataset")
        try:
            data = ds[()]
            digest = py_value(ds.attrs.get(DIGEST_ATTR)) if DIGEST_ATTR in ds.attrs else None
        except Exception as exc:  # unreadable data or attributes
            raise _Unreadable(f"{what} cannot be read ({_short(exc)})") from None
        self.datasets += 1
        data = np.asarray(data)
        if digest is not None and array_digest(data) != digest:
            raise _Bad(f"{what} does not match its sha256 (the bytes changed after writing)")
        return data

    # ------------------------------------------------------------------ bases

    def _bases(self) -> None:
        for link in self._members("bases", lambda r: None):
            self.counts["bases"] += 1
            bid = _unescape(link)
            try:
                hung = self._enter(f"bases/{link}")
                if hung:
                    raise _Bad(hung)
                self.bases[bid] = self._basis(link, bid)
            except _Bad as exc:
                self.problem(
                    f"basis {bid}",
                    str(exc),
                    "removed, with the models analysed on it (a re-scan recomputes both)",
                )
                self.damage.bases.add(bid)

    def _basis(self, link: str, bid: str) -> tuple[int, int, int]:
        try:
            g = self.h5["bases"][link]
            attrs = read_attrs(g)
        except Exception as exc:  # damaged group or attributes
            raise _Bad(f"cannot be read ({_short(exc)})") from None
        arrays = {key: self._read(g.get(key), key) for key in BASIS_ARRAYS}
        try:
            basis = basis_from(attrs, arrays)
        except Exception as exc:  # missing or mistyped attributes
            raise _Bad(f"attributes cannot be decoded ({_short(exc)})") from None
        if attrs.get("id") != bid:
            raise _Bad(f"id attribute {attrs.get('id')!r} differs from its name")
        d = basis.dim
        expected = {"components": (d, d), "eigenvalues": (d,), "mean": (d,)}
        expected["second_moment"] = (d, d)
        for key, shape in expected.items():
            if arrays[key].shape != shape:
                raise _Bad(f"{key} has shape {arrays[key].shape}, expected {shape}")
        return basis.channels, basis.kh, basis.kw

    # ------------------------------------------------------------------ models

    def _models(self) -> None:
        for src_link in self._members("models", lambda r: None):
            source = _unescape(src_link)

            def unlistable(reason: str, source: str = source, src_link: str = src_link) -> None:
                self.problem(
                    f"models of source {source}",
                    f"the group {reason}",
                    "left out of the rebuilt file (the backup keeps them): re-train them"
                    if source == RUN_SOURCE
                    else "removed (their names are unreadable): a re-scan fetches them again",
                )
                self.damage.paths.add(f"models/{src_link}")

            for name_link in self._members(f"models/{src_link}", unlistable):
                self.counts["models"] += 1
                name = _unescape(name_link)
                path = f"models/{src_link}/{name_link}"
                hung = self._enter(path)
                reasons = [hung] if hung else self._model(path, source, name)
                self._damaged_model(source, name, reasons)
        for bid in self.damage.bases:
            self._drop_dependents(bid)

    def _damaged_model(self, source: str, name: str, reasons: list[str]) -> None:
        if not reasons:
            return
        trainer = source == RUN_SOURCE
        repair = None if trainer else "removed, recorded as a failure: the next scan fetches it"
        for reason in reasons:
            self.problem(f"model {source}:{name}", reason, repair)
        if not trainer:
            self.damage.models[(source, name)] = "; ".join(reasons)

    def _model(self, path: str, source: str, name: str) -> list[str]:
        try:
            g = self.h5[path]
            attrs = read_attrs(g)
        except Exception as exc:  # damaged group or attributes
            return [f"cannot be read ({_short(exc)})"]
        if not isinstance(g, h5py.Group):
            return ["is not a group"]
        try:
            weight = self._read(g.get("weight"), "weight")
        except _Bad as exc:
            return [str(exc)]
        if weight.dtype != np.float32 or weight.ndim != 4:
            return [f"weight is {weight.dtype} {weight.shape}, not (out, C, kh, kw) float32"]
        try:
            layer = layer_from_attrs(attrs, weight)
        except Exception as exc:  # missing or mistyped attributes
            return [f"attributes cannot be decoded ({_short(exc)})"]
        reasons = []
        if attrs.get("name", name) != name or attrs.get("source", source) != source:
            reasons.append("source/name attributes differ from its place in the store")
        status = provenance_status(
            weight, layer.provenance.sha256, layer.provenance.tensor_key, layer.flags
        )
        if status == "mismatch" and DIGEST_ATTR not in g["weight"].attrs:
            reasons.append("weight does not match the sha256 of the checkpoint tensor it came from")
        self.provenance["verified" if status == "verified" else "not comparable"] += 1
        reasons += self._analyses(g, weight.shape)
        return reasons

    def _analyses(self, g: h5py.Group, shape: tuple[int, ...]) -> list[str]:
        out, d = int(shape[0]), int(np.prod(shape[1:]))
        try:
            energy = set(g.get("energy", {}))
            projections = set(g.get("projections", {}))
        except Exception as exc:  # damaged analysis groups
            return [f"analyses cannot be listed ({_short(exc)})"]
        reasons = []
        for link in sorted(energy ^ projections):
            reasons.append(f"basis {_unescape(link)}: energy without projections or the reverse")
        for link in sorted(energy & projections):
            bid = _unescape(link)
            try:
                e = self._read(g["energy"][link], f"energy on {bid}")
                p = self._read(g["projections"][link], f"projections on {bid}")
            except _Bad as exc:
                reasons.append(str(exc))
                continue
            if e.shape != (d,) or p.shape != (out, d):
                reasons.append(
                    f"analysis on {bid} has energy {e.shape} and projections {p.shape}, "
                    f"expected ({d},) and ({out}, {d})"
                )
            elif not _energy_matches(e, p):
                reasons.append(f"energy on {bid} is not the profile of its projections")
            elif bid not in self.bases and bid not in self.damage.bases:
                self.missing_bases[bid] = self.missing_bases.get(bid, 0) + 1
            elif bid in self.bases and self.bases[bid] != tuple(int(v) for v in shape[1:]):
                reasons.append(f"basis {bid} is for {self.bases[bid]}, not {tuple(shape[1:])}")
        return reasons

    def _drop_dependents(self, bid: str) -> None:
        """Record the models analysed on the damaged basis ``bid`` for removal."""
        for src_link in self._members("models", lambda r: None):
            source = _unescape(src_link)
            if source == RUN_SOURCE:
                continue
            if f"models/{src_link}" in self.hung:
                continue
            for name_link in self._members(f"models/{src_link}", lambda r: None):
                key = (source, _unescape(name_link))
                if f"models/{src_link}/{name_link}" in self.hung:
                    continue
                with contextlib.suppress(Exception):
                    if escape_name(bid) in self.h5[f"models/{src_link}/{name_link}/energy"]:
                        self.damage.models.setdefault(key, f"its basis {bid} was damaged")

    # ------------------------------------------------------------------ failures

    def _failures(self) -> None:
        for src_link in self._members("failures", lambda r: None):
            source = _unescape(src_link)

            def unlistable(reason: str, source: str = source, src_link: str = src_link) -> None:
                self.problem(f"failures of source {source}", f"the group {reason}", "removed")
                self.damage.paths.add(f"failures/{src_link}")

            for name_link in self._members(f"failures/{src_link}", unlistable):
                self.counts["failures"] += 1
                name = _unescape(name_link)
                path = f"failures/{src_link}/{name_link}"
                reason = self._enter(path) or self._failure(path)
                if reason:
                    self.problem(
                        f"failure {source}:{name}",
                        reason,
                        "removed (the model is tried again by the next scan)",
                    )
                    self.damage.failures.add((source, name))

    def _failure(self, path: str) -> str | None:
        try:
            attrs = read_attrs(self.h5[path])
        except Exception as exc:  # damaged group or attributes
            return f"cannot be read ({_short(exc)})"
        kinds = {"error_class": str, "message": str, "attempts": int}
        kinds |= {"first_failed_at": str, "last_failed_at": str}
        for key, kind in kinds.items():
            if not isinstance(attrs.get(key), kind):
                return f"attribute {key} is {attrs.get(key)!r}"
        return None

    # ------------------------------------------------------------------ runs

    def _runs(self) -> None:
        """Runs are reported, not removed (they cannot be fetched again), except those
        that cannot be read at all: a rebuilt file cannot hold them (the backup does)."""
        if "runs" not in self.h5:
            return
        left_out = "left out of the rebuilt file (the backup keeps it): re-train it"

        def unlistable(reason: str) -> None:
            self.problem("runs", f"the group {reason}", left_out)
            self.damage.paths.add("runs")

        for link in self._members("runs", unlistable):
            self.counts["runs"] += 1
            run_id = _unescape(link)
            try:
                hung = self._enter(f"runs/{link}")
                if hung:
                    raise _Unreadable(hung)
                reasons = self._run(f"runs/{link}", run_id)
            except _Unreadable as exc:
                self.problem(f"run {run_id}", str(exc), left_out)
                self.damage.paths.add(f"runs/{link}")
                continue
            for reason in reasons:
                self.problem(f"run {run_id}", reason, None)

    def _run(self, path: str, run_id: str) -> list[str]:
        """A readable run's problems; raise ``_Unreadable`` when it cannot be read."""
        try:
            g = self.h5[path]
            attrs = read_attrs(g)
            metrics = dict(g.get("metrics", {}).items())
            profiles = [
                (k, b, ds) for k, g2 in g.get("profiles", {}).items() for b, ds in g2.items()
            ]
        except Exception as exc:  # damaged group or attributes
            raise _Unreadable(f"cannot be read ({_short(exc)})") from None
        try:
            for key in ("config", "summary"):
                json.loads(attrs[key])
            if attrs["run_id"] != run_id:
                return [f"run_id attribute {attrs['run_id']!r} differs from its name"]
        except Exception as exc:  # missing attributes, or not JSON
            return [f"attributes are damaged ({_short(exc)})"]
        try:
            steps = self._read(g.get("steps"), "steps")
            snapshots = self._read(g.get("snapshots"), "snapshots")
            values = {k: self._read(ds, f"metric {k}") for k, ds in metrics.items()}
            arrays = [(k, b, self._read(ds, f"profile {k}/{b}")) for k, b, ds in profiles]
        except _Bad as exc:  # damaged data: its chunks are still copied as they are
            return [str(exc)]
        return _run_shapes(self.h5, run_id, steps, snapshots, values, arrays)


class _Bad(Exception):
    """One damaged object (the message says what)."""


class _Unreadable(_Bad):
    """An object whose data or metadata cannot be read at all."""


def _run_shapes(
    h5: h5py.File,
    run_id: str,
    steps: np.ndarray,
    snapshots: np.ndarray,
    metrics: dict[str, np.ndarray],
    profiles: list[tuple[str, str, np.ndarray]],
) -> list[str]:
    """The shape problems of a run's arrays (and its model view)."""
    reasons = []
    if steps.ndim != 1 or steps.size == 0 or steps[0] != 0 or np.any(np.diff(steps) <= 0):
        reasons.append("steps are not a 1-D array starting at 0 and increasing")
    if snapshots.ndim != 5 or snapshots.shape[0] != steps.shape[0]:
        reasons.append(
            f"snapshots have shape {snapshots.shape}, expected ({len(steps)}, K, C, kh, kw)"
        )
        return reasons
    if len({len(v) for v in metrics.values()}) > 1 or any(v.ndim != 1 for v in metrics.values()):
        reasons.append("metrics are not 1-D arrays of one length")
    d = int(np.prod(snapshots.shape[2:]))
    for kind, bid, values in profiles:
        if values.shape != (len(steps), d):
            reasons.append(
                f"profile {kind}/{bid} has shape {values.shape}, expected ({len(steps)}, {d})"
            )
    view = f"models/{escape_name(RUN_SOURCE)}/{escape_name(run_id)}/weight"
    try:
        weight = h5[view][()]
    except Exception:  # noqa: BLE001 - a missing or unreadable model view is the finding
        reasons.append("its model view (/models/trainer/<run id>) is missing or unreadable")
        return reasons
    if not np.array_equal(weight, snapshots[-1], equal_nan=True):
        reasons.append("its last snapshot differs from its model view's weight")
    return reasons


# ----------------------------------------------------------------------------- checks


def provenance_status(
    weight: np.ndarray, sha256: str | None, tensor_key: str | None, flags: Any
) -> str:
    """Whether a stored float32 ``weight`` hashes to the provenance ``sha256`` (the raw
    checkpoint tensor's bytes in its stored dtype): ``"verified"`` when it does as
    float32, float16 or bfloat16 (the dtypes the float32 weight holds exactly),
    ``"not comparable"`` when there is no sha256, the layer combines several tensors
    (``+`` in the key) or was derived from them (:data:`TRANSFORM_FLAGS`), else
    ``"mismatch"`` (also what a float64 checkpoint gives: its values were rounded)."""
    if not sha256 or (tensor_key and "+" in tensor_key):
        return "not comparable"
    if isinstance(flags, dict) and any(flags.get(flag) for flag in TRANSFORM_FLAGS):
        return "not comparable"
    w = np.ascontiguousarray(weight, dtype="<f4")
    if array_digest(w) == sha256:
        return "verified"
    with np.errstate(over="ignore"):
        half = w.astype("<f2")
    if np.array_equal(half.astype("<f4"), w, equal_nan=True) and array_digest(half) == sha256:
        return "verified"
    bits = w.view("<u4")
    if not np.any(bits & 0xFFFF) and array_digest((bits >> 16).astype("<u2")) == sha256:
        return "verified"
    return "mismatch"


def _energy_matches(energy: np.ndarray, projections: np.ndarray) -> bool:
    profile = np.sqrt(np.mean(np.square(projections), axis=0))
    top = profile.max() if profile.size else 0.0
    if top > 0:
        profile = profile / top
    return bool(np.allclose(energy, profile, rtol=ENERGY_RTOL, atol=1e-12, equal_nan=True))


def _attr(attrs: h5py.AttributeManager, key: str, default: Any = None) -> Any:
    try:
        return py_value(attrs[key]) if key in attrs else default
    except Exception as exc:  # an unreadable attribute
        return f"<unreadable: {_short(exc)}>"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unescape(link: str) -> str:
    try:
        return unescape_link(link)
    except Exception:  # noqa: BLE001 - a damaged link name is shown as it is
        return link


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@dataclass
class Examined:
    """What :func:`examine` found (picklable: it crosses from a child process)."""

    problems: list[Problem]
    notes: list[str]
    checked: dict[str, int]
    damage: Damage
    journal_seq: int
    usable: bool
    rebuilt: bool = False
    """Whether ``rebuild_to`` was written (there was damage to remove)."""


def examine(
    path: Path,
    store: Path,
    *,
    hung: Mapping[str, str] | None = None,
    rebuild_to: Path | None = None,
    always: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Examined:
    """Check the main file at ``path`` (the store's, or a salvage copy of it) of the
    store ``store``. With ``rebuild_to``, write there a new main file without the
    damage (:func:`~zooscan.store.compaction.rebuild`) when there is damage to remove,
    or ``always``. ``hung`` and ``progress`` as for :class:`MainChecker`. Raise
    :class:`Unopenable` when HDF5 cannot open ``path``."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise Unopenable(" ".join(str(exc).split())) from None
    with h5:
        checker = MainChecker(h5, store, hung=hung, progress=progress)
        checker.run()
        result = Examined(
            checker.problems,
            checker.notes,
            checker.checked,
            checker.damage,
            checker.journal_seq,
            checker.usable,
        )
        if rebuild_to is not None and checker.usable and (always or not checker.damage.empty):
            states = {key: damaged_failure(why) for key, why in checker.damage.models.items()}
            rebuild(
                h5,
                rebuild_to,
                skip=checker.damage.skip_paths(),
                failures=states,
                attrs=checker.damage.attrs,
                root_attrs=checker.damage.root_attrs_readable,
                progress=progress,
            )
            result.rebuilt = True
    return result
