"""The scan engine: list → fetch (concurrent) → analyse → commit, resumable.

Sources fetch first layers in worker threads; everything that touches the store
(h5py runs one call at a time) happens on the calling thread, the single writer.
A model that fails is recorded in the store with its reason and the scan goes on.

Stopping early never damages the store: Ctrl-C (SIGINT) stops the scan at once except
inside a store write, which completes first; a store that cannot be written (a full
disk) stops the scan with the reason in :attr:`ScanSummary.stopped`. Either way every
model reported before is kept, and the next scan resumes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import FrameType

import numpy as np

from zooscan.energy import analyse, to_pixel_space
from zooscan.errors import DatasetError, ModelError, StoreError, UserError
from zooscan.patches import compute_basis
from zooscan.records import (
    FirstLayer,
    ModelRecord,
    ModelRef,
    PatchBasis,
    PatchDataset,
    Source,
    basis_id,
)
from zooscan.store import DAMAGED, Store

logger = logging.getLogger("zooscan.scan")

_POLL_SECONDS = 0.2
"""How often the scan loop looks up from waiting on fetches (to honour a Ctrl-C)."""


@dataclass
class ScanSummary:
    """What a scan did, for the closing report and ``--format json``."""

    listed: int = 0
    stored: int = 0
    skipped_stored: int = 0
    skipped_failed: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    """``(name, error class, message)`` of each model that failed in this run."""
    unanalysed: list[tuple[str, str]] = field(default_factory=list)
    """``(name, reason)``: stored, but no basis could be computed for its shape."""
    bases_computed: list[str] = field(default_factory=list)
    bytes_fetched: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    stopped: str | None = None
    """Why the scan stopped before the end (the store could not be written), else None."""

    @property
    def failures_by_reason(self) -> dict[str, int]:
        """Failure counts by error class."""
        return dict(Counter(error for _, error, _ in self.failed))

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "listed": self.listed,
            "stored": self.stored,
            "skipped_stored": self.skipped_stored,
            "skipped_failed": self.skipped_failed,
            "failed": [{"name": n, "error": e, "message": m} for n, e, m in self.failed],
            "failures_by_reason": self.failures_by_reason,
            "unanalysed": [{"name": n, "reason": r} for n, r in self.unanalysed],
            "bases_computed": self.bases_computed,
            "bytes_fetched": self.bytes_fetched,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "stopped": self.stopped,
        }


@dataclass
class ScanPlan:
    """What a scan would do (``--dry-run``)."""

    listed: list[ModelRef]
    todo: list[ModelRef]
    stored: list[ModelRef]
    failed_before: list[ModelRef]


def utc_now() -> str:
    """ISO-8601 UTC timestamp with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class BasisCache:
    """Patch bases by shape, from the store or computed once and stored."""

    def __init__(
        self,
        store: Store,
        dataset: PatchDataset,
        centered: bool = True,
        on_compute: Callable[[str], None] | None = None,
        progress: Callable[[tuple[int, int, int]], Callable[[int], None] | None] | None = None,
        guard: InterruptGuard | None = None,
    ):
        self.store = store
        self.dataset = dataset
        self.centered = centered
        self.on_compute = on_compute
        self.progress = progress
        self._bases: dict[tuple[int, int, int], PatchBasis] = {}
        self._unavailable: dict[tuple[int, int, int], str] = {}
        self.guard = guard
        """Storing a basis is a store write that Ctrl-C waits for (:func:`run_scan`)."""

    def get(self, shape_key: tuple[int, int, int]) -> PatchBasis:
        """The basis for ``(C, kh, kw)``; raises :class:`DatasetError` if it cannot exist."""
        if shape_key in self._unavailable:
            raise DatasetError(self._unavailable[shape_key])
        if shape_key not in self._bases:
            wanted = basis_id(self.dataset.key, shape_key, self.centered)
            basis = self.store.get_basis(wanted)
            if basis is None:
                c, kh, kw = shape_key
                report = self.progress(shape_key) if self.progress else None
                try:
                    basis = compute_basis(
                        self.dataset, c, kh, kw, centered=self.centered, progress=report
                    )
                except DatasetError as exc:
                    self._unavailable[shape_key] = str(exc)
                    raise
                finally:
                    if report is not None and hasattr(report, "close"):
                        report.close()
                with self.guard.store_write() if self.guard else contextlib.nullcontext():
                    self.store.put_basis(basis)
                if self.on_compute:
                    self.on_compute(basis.id)
            self._bases[shape_key] = basis
        return self._bases[shape_key]


def analyse_layer(layer: FirstLayer, bases: BasisCache):
    """Project ``layer`` (in RGB pixel space) on the basis of its shape."""
    weight = to_pixel_space(layer)
    _, c, kh, kw = weight.shape
    basis = bases.get((c, kh, kw))
    return analyse(weight, basis)


def plan_scan(
    store: Store | None,
    source: Source,
    patterns: Sequence[str],
    *,
    limit: int | None = None,
    retry_failed: bool = False,
) -> ScanPlan:
    """List the source's models and split them into to-do, already stored, failed before."""
    listed = list(_limited(source.list_models(patterns), limit))
    if not listed:
        what = " ".join(patterns) if patterns else "(all)"
        raise UserError(f"source {source.name!r} has no model matching {what}")
    stored_names = {n for _, n in store.models(source.name)} if store else set()
    failures = store.failures(source.name) if store else []
    # models that `zooscan fsck --repair` dropped failed through no fault of their own
    failed_names = {f["name"] for f in failures if f["error_class"] != DAMAGED}
    todo, stored, failed_before = [], [], []
    for ref in listed:
        if ref.name in stored_names:
            stored.append(ref)
        elif ref.name in failed_names and not retry_failed:
            failed_before.append(ref)
        else:
            todo.append(ref)
    return ScanPlan(listed, todo, stored, failed_before)


@dataclass
class FetchEstimate:
    """What fetching some models would cost (``--dry-run``), from sources that can tell."""

    models: int = 0
    estimated: int = 0
    """Models whose source gave an estimate (sources without ``plan()`` give none)."""
    requests: int = 0
    bytes: int = 0
    cached: int = 0
    typical: int = 0
    """Models whose bytes are a typical size, not their own (the source could not know)."""
    errors: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "models": self.models,
            "estimated": self.estimated,
            "requests": self.requests,
            "bytes": self.bytes,
            "cached": self.cached,
            "typical": self.typical,
            "errors": [{"name": n, "message": m} for n, m in self.errors],
        }


def estimate_fetch(source: Source, refs: Sequence[ModelRef]) -> FetchEstimate:
    """Ask the source what fetching each model would take, without network access.

    Sources may implement ``plan(ref) -> {"requests": int, "bytes": int, "cached": bool}``,
    with ``"estimated": True`` when the bytes are a typical size rather than the model's own.
    """
    estimate = FetchEstimate(models=len(refs))
    plan = getattr(source, "plan", None)
    if plan is None:
        return estimate
    for ref in refs:
        try:
            cost = plan(ref)
        except Exception as exc:  # an estimate must never stop a dry run
            estimate.errors.append((ref.name, f"{type(exc).__name__}: {exc}"))
            continue
        estimate.estimated += 1
        if cost.get("estimated"):
            estimate.typical += 1
        if cost.get("cached"):
            estimate.cached += 1
        else:
            estimate.requests += int(cost.get("requests", 0))
            estimate.bytes += int(cost.get("bytes", 0))
    return estimate


def _limited(refs: Iterable[ModelRef], limit: int | None) -> Iterable[ModelRef]:
    for i, ref in enumerate(refs):
        if limit is not None and i >= limit:
            return
        yield ref


class InterruptGuard:
    """Ctrl-C for a scan running in the main thread: SIGINT raises
    :class:`KeyboardInterrupt` at once (a basis computation or a wait for fetches
    stops), except inside :meth:`store_write`, where it is held until :meth:`check`
    (a commit is never cut in half). Outside the main thread, or when SIGINT is
    ignored, it changes nothing."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._previous: Callable | int | None = None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not signal.SIG_IGN:
                self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._depth:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def store_write(self) -> Iterator[None]:
        """A block that SIGINT does not interrupt (it is held for :meth:`check`)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def check(self) -> None:
        """Raise the :class:`KeyboardInterrupt` held during a store write, if any."""
        if not self._depth and self.take():
            raise KeyboardInterrupt

    def take(self) -> bool:
        """Whether a SIGINT is being held (and forget it)."""
        pending, self._pending = self._pending, False
        return pending


def run_scan(
    store: Store,
    source: Source,
    plan: ScanPlan,
    dataset: PatchDataset,
    *,
    workers: int = 1,
    centered: bool = True,
    on_model: Callable[[ModelRef, str], None] | None = None,
    basis_progress=None,
) -> ScanSummary:
    """Fetch, analyse and commit every model in ``plan.todo``.

    ``on_model(ref, outcome)`` is called once per model with ``"stored"`` or
    ``"failed"``, after the outcome is durable in the store. Ctrl-C stops cleanly: what
    was committed stays, the summary says ``interrupted``. A store write that fails
    (:class:`StoreError`, e.g. a full disk) stops the scan: the summary's ``stopped``
    holds the reason, and the models stored before are kept.
    """
    summary = ScanSummary(
        listed=len(plan.listed),
        skipped_stored=len(plan.stored),
        skipped_failed=len(plan.failed_before),
    )
    started = time.monotonic()
    guard = InterruptGuard()
    bases = BasisCache(
        store,
        dataset,
        centered,
        on_compute=summary.bases_computed.append,
        progress=basis_progress,
        guard=guard,
    )
    pending = list(reversed(plan.todo))
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="zooscan-fetch")
    running: dict[Future, ModelRef] = {}
    with guard:
        try:
            while pending or running:
                while pending and len(running) < max(1, workers) * 2:
                    ref = pending.pop()
                    running[pool.submit(source.load_first_layer, ref)] = ref
                done, _ = wait(running, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
                for future in done:
                    ref = running.pop(future)
                    outcome = _commit_one(store, source.name, ref, future, bases, summary, guard)
                    if on_model:
                        on_model(ref, outcome)
                    guard.check()
                guard.check()
        except KeyboardInterrupt:
            summary.interrupted = True
        except StoreError as exc:
            summary.stopped = str(exc)
        finally:
            with guard.store_write():  # a Ctrl-C now is noted, the flush still completes
                early = summary.interrupted or summary.stopped is not None
                for future in running:
                    future.cancel()
                pool.shutdown(wait=not early, cancel_futures=True)
                if summary.stopped is None:  # else the store cannot be written: keep the journal
                    _flush(store)
            summary.interrupted = summary.interrupted or guard.take()
            summary.seconds = time.monotonic() - started
    return summary


def _flush(store: Store) -> None:
    """Compact the store's journal; a failure (a full disk) loses nothing: warn."""
    try:
        store.flush()
    except StoreError as exc:
        logger.warning("%s (the journal keeps every commit; the next scan compacts it)", exc)


def _commit_one(
    store: Store,
    source_name: str,
    ref: ModelRef,
    future: Future,
    bases: BasisCache,
    summary: ScanSummary,
    guard: InterruptGuard,
) -> str:
    try:
        layer = future.result()
        _check_layer(layer)
        analyses = []
        try:
            analyses.append(analyse_layer(layer, bases))
        except DatasetError as exc:
            summary.unanalysed.append((ref.name, str(exc)))
        record = ModelRecord(source_name, ref.name, layer, analyses, scanned_at=utc_now())
    except StoreError:
        raise  # the store cannot be written: that stops the scan, it is not this model's fault
    except Exception as exc:  # one failing model never stops the scan
        error = type(exc).__name__
        message = str(exc) or repr(exc)
        if not isinstance(exc, ModelError):
            message = f"unexpected {error}: {message}"
        with guard.store_write():
            store.record_failure(source_name, ref.name, error, message)
        summary.failed.append((ref.name, error, message))
        return "failed"
    with guard.store_write():
        store.commit_model(record)
    summary.stored += 1
    summary.bytes_fetched += int(layer.provenance.bytes_fetched or 0)
    return "stored"


def _check_layer(layer: FirstLayer) -> None:
    weight = np.asarray(layer.weight)
    if weight.ndim != 4:
        raise ModelError(
            f"first-layer weight must be 4-D (out, C, kh, kw), got shape {weight.shape}"
        )
    if not np.isfinite(weight).all():
        raise ModelError("first-layer weight contains NaN or Inf")
