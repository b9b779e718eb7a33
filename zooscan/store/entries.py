"""Records as journal entries: validated and copied, ready for :meth:`Journal.write`."""

from __future__ import annotations

import numpy as np

from zooscan.errors import StoreError
from zooscan.records import Analysis, ModelRecord, PatchBasis
from zooscan.store.codec import BASIS_ARRAYS, basis_attrs, layer_attrs, now
from zooscan.store.journal import Entry

__all__ = ["basis_entry", "check_analysis", "model_entry"]


def model_entry(record: ModelRecord) -> Entry:
    """The ``model`` entry of a record: its weight, layer attributes and analyses."""
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
        energy, proj = check_analysis(record.name, weight.shape, analysis)
        arrays[f"energy/{analysis.basis_id}"] = energy
        arrays[f"projections/{analysis.basis_id}"] = proj
        bases.append(analysis.basis_id)
    attrs = layer_attrs(layer, record.source, record.name, record.scanned_at or now())
    fields = {"source": record.source, "name": record.name, "attrs": attrs, "bases": bases}
    return Entry("model", fields, arrays)


def check_analysis(
    name: str, shape: tuple[int, ...], analysis: Analysis
) -> tuple[np.ndarray, np.ndarray]:
    """``(energy, projections)`` as float64 copies, checked against the weight ``shape``."""
    out, d = int(shape[0]), int(np.prod(shape[1:]))
    energy = np.array(analysis.energy, dtype=np.float64, order="C")
    proj = np.array(analysis.projections, dtype=np.float64, order="C")
    if energy.shape != (d,) or proj.shape != (out, d):
        raise StoreError(
            f"model {name!r}: analysis on {analysis.basis_id!r} has energy {energy.shape} and "
            f"projections {proj.shape}, expected ({d},) and ({out}, {d})"
        )
    return energy, proj


def basis_entry(basis: PatchBasis) -> Entry:
    """The ``basis`` entry of a patch basis, its arrays checked against its dimension."""
    arrays = {
        key: np.array(getattr(basis, key), dtype=np.float64, order="C") for key in BASIS_ARRAYS
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
    return Entry("basis", {"attrs": basis_attrs(basis)}, arrays)
