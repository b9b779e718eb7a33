"""What readers get back: :class:`StoredModel` (in full) and :class:`ModelSummary` (cheap)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from zooscan.records import Analysis, FirstLayer, ModelRecord

__all__ = ["SUMMARY_KEYS", "ModelSummary", "StoredModel", "make_summary"]

SUMMARY_KEYS = (
    "module",
    "kind",
    "stride",
    "channel_order",
    "flags",
    "bytes_fetched",
    "scanned_at",
)
"""The model attributes a :class:`ModelSummary` reads."""


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


def make_summary(
    source: str,
    name: str,
    attrs: Mapping[str, Any],
    shape: tuple[int, ...],
    bases: Iterable[str],
) -> ModelSummary:
    """A :class:`ModelSummary` from a model's attributes (Python form), weight shape and
    basis ids."""
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
