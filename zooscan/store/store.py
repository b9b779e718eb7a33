"""The :class:`Store`: the public API over the main file, the journal and the writer lock.

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
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from zooscan import __version__
from zooscan.errors import StoreError, UserError
from zooscan.records import Analysis, ModelRecord, PatchBasis, RunRecord
from zooscan.store.codec import (
    BASIS_ARRAYS,
    basis_from,
    layer_from_attrs,
    now,
    py_value,
    read_attrs,
    text,
)
from zooscan.store.compaction import (
    OBJECT_BYTES,
    SPARE_BYTES,
    apply_overlay,
    hdf5_image,
    write_repacked,
)
from zooscan.store.entries import basis_entry, check_analysis, model_entry
from zooscan.store.files import (
    TMP_INFIX,
    acquire_lock,
    release_lock,
    replace_durably,
    reserve,
    write_durably,
)
from zooscan.store.journal import CorruptEntry, Entry, Journal
from zooscan.store.naming import escape_name, unescape_link
from zooscan.store.overlay import Key, Overlay
from zooscan.store.runs import read_run, run_entry, run_info, run_info_from_group, run_record
from zooscan.store.schema import init_root, open_main
from zooscan.store.views import SUMMARY_KEYS, ModelSummary, StoredModel, make_summary

__all__ = [
    "DAMAGED",
    "DEFAULT_STORE",
    "JOURNAL_SUFFIX",
    "LOCK_SUFFIX",
    "STORE_ENV",
    "Store",
    "damaged_failure",
    "default_store_path",
]

logger = logging.getLogger("zooscan.store")

DEFAULT_STORE = "zoo.h5"
"""Store path when neither ``--store`` nor ``$ZOOSCAN_STORE`` is given."""
STORE_ENV = "ZOOSCAN_STORE"
DAMAGED = "StoreDamaged"
"""``error_class`` of the failure recorded for a model that ``zooscan fsck --repair``
removed because its stored data was damaged: a scan retries these without
``--retry-failed``."""
JOURNAL_SUFFIX = ".journal"
LOCK_SUFFIX = ".lock"

_REPACK_MIN_WASTE = 1 << 20
_PENDING_BYTES_CAP = 256 << 20
_REPACK_RATIO = 0.25
_SNAPSHOT_TRIES = 200


def damaged_failure(reason: str) -> dict[str, Any]:
    """The failure state recorded for a model removed as damaged: ``error_class``
    :data:`DAMAGED`, ``reason`` as message, ``attempts`` 0 (no scan of it failed)."""
    stamp = now()
    return {
        "error_class": DAMAGED,
        "message": text(reason),
        "attempts": 0,
        "first_failed_at": stamp,
        "last_failed_at": stamp,
    }


def default_store_path() -> Path:
    """The store path: ``$ZOOSCAN_STORE`` when set (and not empty), else ``zoo.h5``."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


class Store:
    """A zooscan HDF5 store.

    ``mode="r"`` opens an existing store read-only: a consistent snapshot (the main
    file plus every complete journal entry at open time); it takes no lock and works
    while a writer is active. ``mode="a"`` opens read-write, creating the store when
    missing: it takes the writer lock (a second writer is refused), recovers what a
    killed writer left, and makes every write durable before returning.

    ``compact_every`` and ``compact_ratio`` tune the batching: the journal is compacted
    into the main file when it holds at least ``compact_every`` entries (or 256 MiB,
    which bounds the memory pending entries hold) *and* at least ``compact_ratio``
    times the main file's size in bytes (so compaction costs stay proportional to what
    is written), and always at :meth:`flush`, :meth:`close` and open.
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
        self._journal = Journal(self._abs.with_name(self._abs.name + JOURNAL_SUFFIX))
        self._lock = threading.RLock()
        self._h5: h5py.File | None = None
        self._lock_fd: int | None = None
        self._overlay = Overlay()
        self._pending: list[int] = []
        self._pending_bytes = 0
        self._last_seq = 0
        self._compact_failed_at = 0
        """Pending entries when a compaction last failed (0: none failed since): the next
        batch waits until twice as many are pending, so a full disk is not retried at
        every commit (nor warned about more than once in a row)."""
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

    def _snapshot(self) -> tuple[h5py.File, Overlay, int]:
        """Open the main file and read the journal entries it does not include.

        A writer may compact meanwhile (replace the main file, then delete the entries
        it absorbed); when the path no longer names the file we opened, retry.
        """
        for _ in range(_SNAPSHOT_TRIES):
            h5 = open_main(self._abs)
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

    def _read_journal_after(self, h5: h5py.File) -> tuple[Overlay, int] | None:
        inode = os.fstat(h5.id.get_vfd_handle()).st_ino
        base = int(py_value(h5.attrs.get("journal_seq", 0)))
        overlay = Overlay()
        last = base
        try:
            for seq in self._journal.seqs():
                if seq <= base:
                    continue
                try:
                    overlay.apply(self._journal.read(seq))
                except CorruptEntry as exc:
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
            open_main(self._abs).close()
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
        self._h5 = open_main(self._abs)
        base = int(py_value(self._h5.attrs.get("journal_seq", 0)))
        seqs = self._journal.seqs()
        self._journal.remove([s for s in seqs if s <= base])
        for seq in (s for s in seqs if s > base):
            try:
                self._overlay.apply(self._journal.read(seq))
                self._pending.append(seq)
            except CorruptEntry as exc:
                logger.warning("damaged journal entry %d of %s set aside: %s", seq, self.path, exc)
                self._journal.quarantine(seq)
        self._last_seq = max([base, *self._journal.seqs(include_corrupt=True)])
        if self._pending:
            self._compact_quietly()

    def _create_empty(self) -> None:
        try:  # built in memory: a full disk fails in plain file I/O, not inside HDF5
            write_durably(self._abs, hdf5_image(init_root), self._tmp_path())
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc}") from None

    def _acquire_lock(self) -> None:
        lock_path = self._abs.with_name(self._abs.name + LOCK_SUFFIX)
        self._lock_fd = acquire_lock(lock_path, self.path)

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        release_lock(self._lock_fd)
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

    def _append(self, entry: Entry) -> None:
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
        enough = (
            len(self._pending) >= self.compact_every or self._pending_bytes >= _PENDING_BYTES_CAP
        )
        if (
            enough
            and self._pending_bytes >= self.compact_ratio * os.path.getsize(self._abs)
            and len(self._pending) >= 2 * self._compact_failed_at
        ):
            self._compact_quietly()

    def _compact_quietly(self) -> None:
        """Compact; on failure (e.g. a full disk) keep the durable journal and warn."""
        try:
            self._compact()
        except StoreError as exc:
            level = logging.DEBUG if self._compact_failed_at else logging.WARNING
            self._compact_failed_at = len(self._pending)
            logger.log(level, "%s (the journal keeps every commit)", exc)

    def _compact(self, *, repack: bool = False) -> None:
        """Write main file + journal into a new file, replace the main file atomically."""
        h5 = self._check_open()
        wasted = int(py_value(h5.attrs.get("wasted_bytes", 0)))
        size = os.path.getsize(self._abs)
        repack = repack or (wasted > _REPACK_MIN_WASTE and wasted > _REPACK_RATIO * size)
        if not self._pending and not repack:
            return
        tmp = self._tmp_path()
        room = self._pending_bytes + OBJECT_BYTES * len(self._pending) + SPARE_BYTES
        try:
            if repack:
                write_repacked(h5, tmp, size + room)
                wasted = 0
            else:
                shutil.copyfile(self._abs, tmp)
                reserve(tmp, size + room)  # a full disk fails here, not inside HDF5
            with h5py.File(tmp, "a") as out:
                wasted += apply_overlay(out, self._overlay)
                out.attrs["journal_seq"] = np.int64(self._last_seq)
                out.attrs["wasted_bytes"] = np.int64(wasted)
                out.attrs["zooscan_version"] = __version__
            replace_durably(tmp, self._abs)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot compact the journal into {self.path}: {exc}") from None
        h5.close()
        self._h5 = open_main(self._abs)
        self._journal.remove(self._pending)
        self._overlay = Overlay()
        self._pending = []
        self._pending_bytes = 0
        self._compact_failed_at = 0

    def commit_model(self, record: ModelRecord) -> None:
        """Store one model (replacing one of the same source and name) and clear any
        failure recorded for it. Durable when it returns: a crash right after never
        loses it."""
        with self._lock:
            self._append(model_entry(record))

    def add_analysis(self, source: str, name: str, analysis: Analysis) -> None:
        """Add (or replace) one basis's energy profile and projections of a stored model."""
        with self._lock:
            summary = self.summary(source, name)
            energy, proj = check_analysis(name, summary.shape, analysis)
            fields = {"source": source, "name": name, "basis_id": analysis.basis_id}
            self._append(Entry("analysis", fields, {"energy": energy, "projections": proj}))

    def commit_run(self, run: RunRecord, model: ModelRecord) -> None:
        """Store a trainer run under ``/runs`` and its model view ``model`` (source
        ``"trainer"``, named ``run.run_id``) under ``/models``, replacing a run and a
        model of that id; both or neither, durable when it returns.

        ``model`` is stored exactly as :meth:`commit_model` stores it (so the run is
        listed, correlated and fitted like a scanned model); its weight must be the
        run's final layer weight. Raise :class:`StoreError` when the run is
        inconsistent (``docs/store.md`` lists the checks).
        """
        with self._lock:
            self._check_writable()
            self._append(run_entry(run, model))

    def put_basis(self, basis: PatchBasis) -> None:
        """Store a patch basis (replacing one of the same id); durable when it returns."""
        with self._lock:
            self._append(basis_entry(basis))

    def record_failure(self, source: str, name: str, error_class: str, message: str) -> None:
        """Record that scanning a model failed (again): increments ``attempts``."""
        with self._lock:
            self._check_writable()
            previous = self._failure(source, name)
            stamp = now()
            state = {
                "error_class": text(error_class),
                "message": text(message),
                "attempts": int(previous["attempts"]) + 1 if previous else 1,
                "first_failed_at": previous["first_failed_at"] if previous else stamp,
                "last_failed_at": stamp,
            }
            self._append(Entry("failure", {"source": source, "name": name, "state": state}))

    def clear_failure(self, source: str, name: str) -> None:
        """Forget the failure recorded for a model (no-op when there is none)."""
        with self._lock:
            self._check_writable()
            if self._failure(source, name) is not None:
                self._append(Entry("clear_failure", {"source": source, "name": name}))

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
            src = unescape_link(src_link)
            if source is not None and src != source:
                continue
            for name_link in top[src_link]:
                yield src, unescape_link(name_link)

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
                weight, attrs = g["weight"][()], read_attrs(g)
                analyses = {
                    unescape_link(link): (g["energy"][link][()], g["projections"][link][()])
                    for link in g.get("energy", {})
                }
                analyses.update(self._overlay.analyses.get((source, name), {}))
            return StoredModel(
                source=source,
                name=name,
                layer=layer_from_attrs(attrs, weight),
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
                return make_summary(
                    source, name, pending.attrs, pending.weight.shape, pending.analyses
                )
            return self._main_summary(source, name, self._require_model(source, name))

    def _main_summary(self, source: str, name: str, g: h5py.Group) -> ModelSummary:
        bases = {unescape_link(link) for link in g.get("energy", {})}
        bases.update(self._overlay.analyses.get((source, name), {}))
        return make_summary(source, name, read_attrs(g, SUMMARY_KEYS), g["weight"].shape, bases)

    def summaries(self, source: str | None = None) -> list[ModelSummary]:
        """:meth:`summary` of every stored model (of ``source`` when given), sorted."""
        with self._lock:
            found: dict[Key, ModelSummary] = {}
            top = self._main_group("models")
            for src_link in top if top is not None else ():
                src = unescape_link(src_link)
                if source is not None and src != source:
                    continue
                for name_link, g in top[src_link].items():
                    name = unescape_link(name_link)
                    if (src, name) not in self._overlay.models:
                        found[(src, name)] = self._main_summary(src, name, g)
            for (src, name), model in self._overlay.models.items():
                if source is None or src == source:
                    found[(src, name)] = make_summary(
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
        attrs = read_attrs(g)
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
            ids = {unescape_link(link) for link in group} if group is not None else set()
            return sorted(ids | set(self._overlay.bases))

    def get_basis(self, basis_id: str) -> PatchBasis | None:
        """The stored basis with this id, or ``None``."""
        with self._lock:
            self._check_open()
            if basis_id in self._overlay.bases:
                attrs, arrays = self._overlay.bases[basis_id]
                return basis_from(attrs, {k: np.array(v) for k, v in arrays.items()})
            g = self._main_group("bases", escape_name(basis_id))
            if g is None:
                return None
            return basis_from(read_attrs(g), {k: g[k][()] for k in BASIS_ARRAYS})

    def basis_info(self, basis_id: str) -> dict[str, Any] | None:
        """A stored basis's attributes (dataset, channels, kh, kw, centered, ...) without
        its arrays, or ``None``."""
        with self._lock:
            self._check_open()
            if basis_id in self._overlay.bases:
                return dict(self._overlay.bases[basis_id][0])
            g = self._main_group("bases", escape_name(basis_id))
            return None if g is None else read_attrs(g)

    # ----------------------------------------------------------------- runs

    def has_run(self, run_id: str) -> bool:
        """Whether the store holds a trainer run of this id."""
        with self._lock:
            self._check_open()
            return run_id in self._overlay.runs or self._main_run(run_id) is not None

    def runs(self) -> list[str]:
        """Ids of the stored trainer runs, sorted."""
        with self._lock:
            group = self._main_group("runs")
            ids = {unescape_link(link) for link in group} if group is not None else set()
            return sorted(ids | set(self._overlay.runs))

    def load_run(self, run_id: str) -> RunRecord:
        """Read one trainer run back in full. Raise :class:`UserError` when it is not
        stored."""
        with self._lock:
            self._check_open()
            pending = self._overlay.runs.get(run_id)
            return run_record(
                pending if pending is not None else read_run(self._require_run(run_id))
            )

    def run_info(self, run_id: str) -> dict[str, Any]:
        """A run's description without its big arrays: ``run_id``, ``created_at``,
        ``config``, ``summary``, ``snapshots`` (their count), ``steps`` (list of int),
        ``shape`` ``(K, C, kh, kw)``, ``metrics`` (names) and ``profiles``
        (``kind -> [basis id]``), names sorted. Raise :class:`UserError` when the run is
        not stored."""
        with self._lock:
            self._check_open()
            run = self._overlay.runs.get(run_id)
            if run is None:
                return run_info_from_group(self._require_run(run_id))
            return run_info(
                run.attrs,
                run.steps,
                run.snapshots.shape[1:],
                list(run.metrics),
                {kind: list(by_basis) for kind, by_basis in run.profiles.items()},
            )

    def run_profile(self, run_id: str, kind: str, basis_id: str) -> np.ndarray:
        """One ``(S, d)`` profile of a run (one row per snapshot), read without the rest
        of the run. Raise :class:`UserError` when the run or the profile is absent."""
        with self._lock:
            self._check_open()
            run = self._overlay.runs.get(run_id)
            if run is not None:
                found = run.profiles.get(kind, {}).get(basis_id)
                if found is not None:
                    return found.copy()
            else:
                group = self._require_run(run_id).get("profiles", {})
                path = f"{escape_name(kind)}/{escape_name(basis_id)}"
                if path in group:
                    return group[path][()]
            raise UserError(f"run {run_id!r} has no {kind!r} profile on basis {basis_id!r}")

    def _main_run(self, run_id: str) -> h5py.Group | None:
        return self._main_group("runs", escape_name(run_id))

    def _require_run(self, run_id: str) -> h5py.Group:
        g = self._main_run(run_id)
        if g is None:
            raise UserError(f"no trainer run {run_id!r} in store {self.path}")
        return g
