"""``zooscan fsck``: check a store end to end, and repair what can be repaired safely.

:func:`check_store` reads everything a store holds and reports each problem in one
line (:class:`~zooscan.store.check.Problem`; the checks are listed in
:mod:`zooscan.store.check`):

- **files**: the main file opens as HDF5; stale temporaries (``<store>.tmp-*`` and
  journal ``.tmp-*`` files a killed writer left; not while a writer runs);
- **journal**: every entry decodes (checksum) and applies; entries already folded into
  the main file (left by an interrupted compaction);
- **schema**: the root attributes (``format``, ``schema_version``, ``journal_seq``,
  ``wasted_bytes``) and the top-level groups;
- **every group and dataset is readable**, and its data matches the ``sha256``
  attribute the store stamps on every dataset it writes (stores written before those
  digests existed are checked for everything else);
- **shapes**: weights ``(out, C, kh, kw)`` float32, energy ``(d,)`` and projections
  ``(out, d)`` per basis (``d = C*kh*kw``), bases ``(d, d)``/``(d,)``, runs' steps,
  snapshots, metrics and profiles; energy recomputable from its projections
  (``sqrt(mean(p**2, axis=0))`` divided by its maximum); every profile's basis stored;
- **provenance**: the stored weight against the sha256 its source recorded for the
  checkpoint tensor (:func:`~zooscan.store.check.provenance_status`).

Damaged HDF5 metadata can make the HDF5 library loop forever or crash, so the main file
is read in a child process that reports each object before reading it: an object on
which the child hangs (no progress for :data:`STALL_SECONDS`) or dies is reported as
damaged and skipped by the next attempt.

``repair=True`` (``zooscan fsck --repair``) takes the writer lock (a running writer is
never disturbed: fsck refuses) and fixes what is safe: stale temporaries and folded
journal entries are deleted, damaged journal entries set aside (``.rec.corrupt``), the
rest of the journal folded; a model with any damage is removed and recorded in
``/failures`` (error class ``StoreDamaged``) so the next scan fetches it again; a
damaged basis is removed with the models analysed on it (a re-scan recomputes both);
damaged failure records are removed; a main file that HDF5 cannot open (truncated) is
salvaged object by object. Trainer runs are reported, never removed (re-train them).
Whenever the main file is rewritten, the previous one is kept as
``<store>.fsck-<UTC time>.bak`` (a hard link), so nothing is ever deleted for good.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zooscan.errors import StoreError
from zooscan.store import Store
from zooscan.store.check import Examined, Problem, Unopenable, examine, provenance_status
from zooscan.store.compaction import CopyError
from zooscan.store.files import TMP_INFIX, acquire_lock, install, lock_holder, release_lock
from zooscan.store.journal import CorruptEntry, Journal
from zooscan.store.overlay import Overlay
from zooscan.store.store import JOURNAL_SUFFIX, LOCK_SUFFIX

__all__ = ["STALL_SECONDS", "FsckReport", "Problem", "check_store", "provenance_status"]

STALL_SECONDS = 30.0
"""An object whose reading shows no progress for this long hangs HDF5: it is damaged."""
MAX_DAMAGED_OBJECTS = 100
"""Attempts at reading the main file, each skipping one more object that hung it."""
_BACKUP_INFIX = ".fsck-"


# ----------------------------------------------------------------------------- report


@dataclass
class FsckReport:
    """What :func:`check_store` found (and repaired)."""

    store: Path
    checked: dict[str, int] = field(default_factory=dict)
    """Counts: ``models``, ``bases``, ``runs``, ``failures``, ``datasets`` (read),
    ``journal_entries``, ``provenance_verified``, ``provenance_not_comparable``."""
    problems: list[Problem] = field(default_factory=list)
    """Every problem found (with ``repaired`` set by a repair)."""
    remaining: list[Problem] = field(default_factory=list)
    """Problems still there at the end (after a repair: found by checking again)."""
    notes: list[str] = field(default_factory=list)
    """Facts worth knowing that are not problems (pending journal entries, backups...)."""
    repair: bool = False
    backup: Path | None = None
    """The previous main file, kept when a repair rewrote it."""

    @property
    def ok(self) -> bool:
        """No problem remains."""
        return not self.remaining

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``zooscan fsck --format json``)."""
        return {
            "store": str(self.store),
            "ok": self.ok,
            "repair": self.repair,
            "checked": dict(self.checked),
            "problems": [p.as_dict() for p in self.problems],
            "remaining": [p.as_dict() for p in self.remaining],
            "notes": list(self.notes),
            "backup": None if self.backup is None else str(self.backup),
        }


# ----------------------------------------------------------------------------- entry


def check_store(path: str | os.PathLike[str], *, repair: bool = False) -> FsckReport:
    """Check the store at ``path`` (module docstring); with ``repair``, fix what is safe
    first and check again. Raise :class:`StoreError` when ``path`` is a directory or
    missing, or (``repair``) when a writer holds the store."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a zooscan store")
    journal_dir = path.with_name(path.name + JOURNAL_SUFFIX)
    if not path.exists() and not journal_dir.is_dir():
        raise StoreError(f"no store at {path}")
    if not repair:
        report = _inspect(path, lock_holder(path.with_name(path.name + LOCK_SUFFIX)))
        report.remaining = list(report.problems)
        return report
    first = _repair(path)
    final = _inspect(path, None)
    first.remaining = final.problems
    first.checked = final.checked
    first.notes.extend(note for note in final.notes if note not in first.notes)
    return first


def _inspect(path: Path, holder: str | None) -> FsckReport:
    """Check without changing anything; ``holder`` is the pid of a running writer (its
    temporaries and pending entries are then not problems), ``None`` when none runs."""
    report, _, _ = _examine_store(path, holder)
    return report


def _examine_store(
    path: Path, holder: str | None, rebuild_to: Path | None = None
) -> tuple[FsckReport, Examined | None, bool]:
    """Check the store; with ``rebuild_to``, also write a new main file there when the
    main file has damage to remove (salvaging a main file HDF5 cannot open). Return the
    report, the main file's examination (``None`` when none was possible) and whether
    it is of a salvage copy."""
    report = FsckReport(store=path)
    if holder is not None:
        report.notes.append(
            f"a writer (pid {holder}) is active: the store is checked as a reader sees it, "
            "its temporaries and pending journal entries are left out"
        )
    result, salvaged = None, False
    if not path.exists():
        report.problems.append(
            Problem(
                "file " + path.name, "missing (the journal is there)", "rebuilt from the journal"
            )
        )
    else:
        result, salvaged = _examine_main(path, report, rebuild_to)
    if result is not None and not salvaged:
        report.problems.extend(result.problems)
        report.notes.extend(result.notes)
        report.checked.update(result.checked)
    _check_journal(path, result.journal_seq if result else 0, report, writer_active=bool(holder))
    if holder is None:
        _check_temporaries(path, report, ours=rebuild_to)
    report.notes.extend(f"previous main file kept by fsck: {b.name}" for b in _backups(path))
    return report, result, salvaged


def _examine_main(
    path: Path, report: FsckReport, rebuild_to: Path | None
) -> tuple[Examined | None, bool]:
    """Examine the main file in a watched child; when HDF5 cannot open it and
    ``rebuild_to`` is given, examine (and rebuild from) a salvage copy instead."""
    result, error = _examine_watched(path, path, rebuild_to)
    if result is not None or error is None:
        return result, False
    if not error.startswith(Unopenable.__name__):
        report.problems.append(Problem("file " + path.name, error, None))
        return None, False
    report.problems.append(
        Problem(
            "file " + path.name,
            f"HDF5 cannot open it ({error.partition(': ')[2]})",
            "salvaged: every readable object copied into a new file",
        )
    )
    if rebuild_to is None:
        return None, False
    copy = path.with_name(f"{path.name}{TMP_INFIX}{os.getpid()}-salvage")
    try:
        _salvage_copy(path, copy)
        result, error = _examine_watched(copy, path, rebuild_to, always=True)
    finally:
        with contextlib.suppress(OSError):
            copy.unlink()
    if result is None:
        report.notes.append(f"the salvage failed: {error}")
    return result, result is not None


def _examine_watched(
    path: Path, store: Path, rebuild_to: Path | None, *, always: bool = False
) -> tuple[Examined | None, str | None]:
    """:func:`~zooscan.store.check.examine` in a child process, again and again, each
    time skipping the object the previous child hung (or crashed) on. Return the
    examination, or ``None`` and why there is none."""
    hung: dict[str, str] = {}
    for _ in range(MAX_DAMAGED_OBJECTS):
        options = {"hung": hung, "rebuild_to": rebuild_to, "always": always}
        outcome, value, last = _watched(examine, (path, store), options)
        if outcome == "done":
            return value, None
        if outcome == "failed":  # an object could not be copied into the rebuilt file
            last, why = value
            outcome = f"cannot be copied ({why})"
        elif outcome == "error":
            return None, value
        if last is None or last in hung:
            return None, f"HDF5 {outcome} on the file's first object"
        hung[last] = {"hung": "reading it hangs HDF5", "crashed": "reading it crashes HDF5"}.get(
            outcome, outcome
        )
    return None, f"more than {MAX_DAMAGED_OBJECTS} objects hang or crash HDF5"


def _watched(
    fn: Callable[..., Any], args: tuple[Any, ...], options: dict[str, Any]
) -> tuple[str, Any, str | None]:
    """Run ``fn(*args, progress=..., **options)`` in a forked child: ``("done",
    result, last)``, ``("error", message, last)``, ``("failed", (path, message),
    last)`` (a :class:`CopyError`), or ``("hung"|"crashed", None, last)``, where
    ``last`` is the last object the child announced. Without ``fork`` (Windows), in
    this process, unwatched."""
    if "fork" not in multiprocessing.get_all_start_methods():
        try:
            return "done", fn(*args, progress=lambda path: None, **options), None
        except CopyError as exc:
            return "failed", (exc.path, exc.message), None
        except Exception as exc:  # reported like a child's error
            return "error", _error_text(exc), None
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, fn, args, options), daemon=True)
    child.start()
    sender.close()
    last = None
    try:
        while True:
            if not receiver.poll(STALL_SECONDS):
                child.kill()
                return "hung", None, last
            try:
                kind, value = receiver.recv()
            except EOFError:
                return "crashed", None, last
            if kind == "at":
                last = value
            else:
                return kind, value, last
    finally:
        receiver.close()
        child.join(timeout=10)


def _child(sender: Any, fn: Callable[..., Any], args: tuple[Any, ...], options: dict) -> None:
    try:
        result = fn(*args, progress=lambda path: sender.send(("at", path)), **options)
        sender.send(("done", result))
    except CopyError as exc:
        sender.send(("failed", (exc.path, exc.message)))
    except Exception as exc:  # sent to the parent, which reports it
        sender.send(("error", _error_text(exc)))
    finally:
        sender.close()


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split()) or type(exc).__name__}"


# ----------------------------------------------------------------------------- repair


def _repair(path: Path) -> FsckReport:
    """Repair (module docstring); return the problems found, marked repaired."""
    lock = path.with_name(path.name + LOCK_SUFFIX)
    fd = acquire_lock(lock, path)  # refuses while a writer runs
    tmp = path.with_name(f"{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        report, result, salvaged = _examine_store(path, None, rebuild_to=tmp)
        report.repair = True
        if result is not None and result.rebuilt:
            report.backup = path.with_name(f"{path.name}{_BACKUP_INFIX}{_stamp()}.bak")
            install(tmp, path, report.backup)
            _mark_rebuilt(report, result, salvaged)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        release_lock(fd)
    try:
        Store(path, mode="a").close()  # deletes temporaries, sets aside, folds the journal
    except StoreError as exc:
        report.notes.append(f"the journal could not be folded: {exc}")
        return report
    for problem in report.problems:
        if problem.where.startswith(("journal entry", "file ")) and problem.repair:
            problem.repaired = True
    return report


def _mark_rebuilt(report: FsckReport, result: Examined, salvaged: bool) -> None:
    """Mark the problems the rebuilt main file no longer has (and, for a salvage, add
    those found in the salvage copy: the damaged file could not be read before)."""
    if salvaged:
        report.problems.extend(result.problems)
        report.checked.update(result.checked)
    for problem in report.problems:
        in_file = not problem.where.startswith(("journal entry", "file "))
        if problem.repair and (in_file or (salvaged and "HDF5" in problem.message)):
            problem.repaired = True


def _salvage_copy(path: Path, copy: Path) -> None:
    """Copy a main file HDF5 cannot open, extended with zeros to the size its
    superblock records: what truncation cut off then reads as zeros, which the digests
    catch (and the objects whose metadata was cut off hang or fail, and are skipped)."""
    shutil.copyfile(path, copy)
    eof = _superblock_eof(copy)
    if eof is not None and eof > copy.stat().st_size:
        with open(copy, "r+b") as fh:
            fh.truncate(eof)


# ----------------------------------------------------------------------------- files


def _temporaries(path: Path) -> list[Path]:
    found = sorted(path.parent.glob(f"{path.name}{TMP_INFIX}*"))
    journal_dir = path.with_name(path.name + JOURNAL_SUFFIX)
    if journal_dir.is_dir():
        found += sorted(p for p in journal_dir.iterdir() if p.name.startswith(TMP_INFIX))
    return found


def _check_temporaries(path: Path, report: FsckReport, ours: Path | None = None) -> None:
    """Report the stale temporaries (``ours``, a repair's new main file, is not one)."""
    for tmp in _temporaries(path):
        if tmp == ours:
            continue
        with contextlib.suppress(OSError):
            size = tmp.stat().st_size
            report.problems.append(
                Problem(
                    f"file {tmp.relative_to(path.parent)}",
                    f"stale temporary left by a killed writer ({size} bytes)",
                    "deleted",
                )
            )


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}{_BACKUP_INFIX}*.bak"))


def _check_journal(path: Path, base: int, report: FsckReport, *, writer_active: bool) -> None:
    journal = Journal(path.with_name(path.name + JOURNAL_SUFFIX))
    seqs = journal.seqs()
    corrupt = sorted(set(journal.seqs(include_corrupt=True)) - set(seqs))
    report.checked["journal_entries"] = len(seqs)
    pending = 0
    overlay = Overlay()
    for seq in seqs:
        where = f"journal entry {seq}"
        if seq <= base:
            if not writer_active:
                report.problems.append(
                    Problem(
                        where,
                        "already folded into the main file (left by an interrupted compaction)",
                        "deleted",
                    )
                )
            continue
        try:
            overlay.apply(journal.read(seq))
        except FileNotFoundError:  # compacted away by a writer meanwhile
            continue
        except CorruptEntry as exc:
            report.problems.append(
                Problem(where, f"damaged ({exc}); its commit is lost", "set aside as .corrupt")
            )
            continue
        pending += 1
    if pending and not writer_active:
        report.notes.append(
            f"{pending} journal entries are not folded into the main file yet (a writer "
            "stopped before compacting); readers see them, the next writer folds them"
        )
    if corrupt:
        report.notes.append(
            f"{len(corrupt)} damaged journal entries were set aside earlier (*.rec.corrupt: "
            f"{', '.join(str(s) for s in corrupt)}); a re-scan redoes their models"
        )


_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _superblock_eof(path: Path) -> int | None:
    """The end-of-file address an HDF5 superblock (version 0-3) records, or ``None``."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        offset = 0
        while offset < size:
            fh.seek(offset)
            head = fh.read(64)
            if head.startswith(_SIGNATURE):
                return _parse_eof(head, offset)
            offset = 512 if offset == 0 else offset * 2
    return None


def _parse_eof(head: bytes, offset: int) -> int | None:
    version = head[8]
    if version in (0, 1):
        width, base = head[13], 24 if version == 0 else 28
    elif version in (2, 3):
        width, base = head[9], 12
    else:
        return None
    fmt = {4: "<I", 8: "<Q"}.get(width)
    if fmt is None:
        return None
    (eof,) = struct.unpack_from(fmt, head, base + 2 * width)
    return offset + eof


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
