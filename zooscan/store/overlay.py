"""The overlay: the journal's effect on top of the main file, merged in sequence order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zooscan.store.journal import CorruptEntry, Entry
from zooscan.store.runs import PendingRun, pending_from_entry

__all__ = ["Key", "Overlay", "PendingModel"]

Key = tuple[str, str]
"""A model's ``(source, name)``."""


@dataclass
class PendingModel:
    """A model written by the journal: attributes (Python form), weight, analyses."""

    attrs: dict[str, Any]
    weight: np.ndarray
    analyses: dict[str, tuple[np.ndarray, np.ndarray]]
    """``(energy, projections)`` per basis id."""


@dataclass
class Overlay:
    """The journal's effect on top of the main file, merged in sequence order."""

    models: dict[Key, PendingModel] = field(default_factory=dict)
    """Models written (or replaced) since the main file."""
    analyses: dict[Key, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    """Analyses added to models of the main file."""
    bases: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = field(default_factory=dict)
    failures: dict[Key, dict[str, Any] | None] = field(default_factory=dict)
    """Failure state per model; ``None`` means cleared."""
    runs: dict[str, PendingRun] = field(default_factory=dict)
    """Trainer runs written (or replaced) since the main file, by run id. Each one's
    model view is in :attr:`models`."""

    def apply(self, entry: Entry) -> None:
        """Merge one entry; raise :class:`CorruptEntry` when its fields are malformed."""
        try:
            self._apply(entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptEntry(f"malformed {entry.op!r} entry: {exc!r}") from None

    def _apply(self, entry: Entry) -> None:
        f, arrays = entry.fields, entry.arrays
        if entry.op == "basis":
            self.bases[f["attrs"]["id"]] = (f["attrs"], arrays)
            return
        key = (f["source"], f["name"])
        if entry.op in ("model", "run"):
            run = pending_from_entry(entry) if entry.op == "run" else None
            analyses = {
                bid: (arrays[f"energy/{bid}"], arrays[f"projections/{bid}"]) for bid in f["bases"]
            }
            self.models[key] = PendingModel(f["attrs"], arrays["weight"], analyses)
            self.analyses.pop(key, None)
            self.failures[key] = None
            if run is not None:
                self.runs[f["name"]] = run
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
            raise CorruptEntry(f"unknown operation {entry.op!r}")
