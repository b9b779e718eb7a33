"""The records that flow between sources, the analysis and the store.

A *source* lists :class:`ModelRef` s (no weights fetched) and turns one into a
:class:`FirstLayer`: the first-layer weight plus everything needed to put it in
the common pixel space (DESIGN §1) and to trace where it came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from zooscan.errors import DatasetError, UserError


@dataclass(frozen=True)
class ModelRef:
    """One model a source offers. ``name`` is unique within the source."""

    source: str
    name: str
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Source-specific details (architecture, file path, weights tag, URL...)."""


@dataclass
class Provenance:
    """Where a first-layer tensor came from, precisely enough to fetch it again."""

    repo: str | None = None
    """Hub repository, library + builder, or local directory."""
    revision: str | None = None
    """Commit sha, library version, or file modification time."""
    file: str | None = None
    """Checkpoint file name or URL."""
    tensor_key: str | None = None
    """Key of the tensor in the checkpoint (several joined by ``+`` when fused)."""
    byte_range: tuple[int, int] | None = None
    """``(start, end)`` byte offsets of the tensor data in ``file`` (end exclusive)."""
    sha256: str | None = None
    """sha256 of the raw tensor bytes as stored in the checkpoint."""
    bytes_fetched: int = 0
    """Bytes read over the network (0 for local files and caches)."""

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (for the store and JSON output)."""
        return {
            "repo": self.repo,
            "revision": self.revision,
            "file": self.file,
            "tensor_key": self.tensor_key,
            "byte_range": list(self.byte_range) if self.byte_range else None,
            "sha256": self.sha256,
            "bytes_fetched": int(self.bytes_fetched),
        }


@dataclass
class FirstLayer:
    """The first layer of one model, ready for analysis.

    ``weight`` is the kernel the model applies to its own input, shape
    ``(out, C, kh, kw)``, float32: the checkpoint tensor for a plain conv, the one
    equivalent kernel for fused multi-branch stems, the standardised weight for
    weight-standardised convs, and ``(out, C, p, p)`` for linear patch embeddings.

    The model sees ``x = (pixel - mean[c]) / std[c]`` with pixels in ``[0, 1]`` and
    channels in ``channel_order``; ``mean``/``std`` are the *effective* constants
    (including any fixed input transform inside the model, e.g. torchvision
    GoogLeNet's ``transform_input``). ``None`` means the identity (mean 0, std 1).
    """

    weight: np.ndarray
    module: str
    kind: str = "conv"
    """``conv``, ``linear`` (patch embedding) or ``fused`` (several branches summed)."""
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channel_order: str = "RGB"
    """``RGB``, ``BGR``, ``L`` (grayscale) or ``other``."""
    input_size: tuple[int, int] | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    """Special cases: ``space_to_depth`` (block size), ``fused_branches`` (count),
    ``standardized`` (bool), ``input_transform`` (description), ``random_init``."""
    provenance: Provenance = field(default_factory=Provenance)
    metadata: dict[str, Any] = field(default_factory=dict)
    """Source-specific extras (architecture, weights tag, library version...)."""

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """``(C, kh, kw)``: profiles are comparable only within one shape key."""
        _, c, kh, kw = self.weight.shape
        return int(c), int(kh), int(kw)


@runtime_checkable
class Source(Protocol):
    """A model source: lists models and loads their first layer."""

    name: str

    def list_models(self, patterns: Sequence[str]) -> Iterable[ModelRef]:
        """Yield the models matching ``patterns`` (all when empty), without fetching weights."""
        ...

    def load_first_layer(self, ref: ModelRef) -> FirstLayer:
        """Return the first layer of ``ref``. Raise :class:`zooscan.errors.ModelError`
        (or a subclass) with a clear message when it cannot."""
        ...


class SourceFactory(Protocol):
    """What ``register_sources`` registers: ``factory(options) -> Source``."""

    name: str
    description: str

    def __call__(self, options: dict[str, str]) -> Source: ...


@runtime_checkable
class PatchDataset(Protocol):
    """Images to compute patch bases from.

    ``key`` identifies the exact image set (it keys the basis cache in the store), so
    it must change whenever the images would (parameters, file list, sizes...).
    """

    key: str

    def batches(self, channels: int) -> Iterator[np.ndarray]:
        """Yield float32 arrays ``(n, channels, H, W)`` of pixels in ``[0, 1]``.

        ``channels=3`` is RGB and ``channels=1`` luminance; a dataset that cannot give
        the requested channel count raises :class:`zooscan.errors.DatasetError`.
        Image sizes may differ between batches (not within one).
        """
        ...


@dataclass
class LabelledImages:
    """One split of a labelled image set: what the trainer trains and tests on.

    A dataset plugin that can label its images gives its dataset objects a method
    ``labelled(split, *, size=None, count=None) -> LabelledImages`` (``split`` is
    ``"train"`` or ``"test"``; ``size`` the square side the images must have, or
    ``None`` for the dataset's own; ``count`` how many images to give, or ``None`` for
    the dataset's default). It raises :class:`zooscan.errors.DatasetError` when it
    cannot. The object is itself a :class:`PatchDataset` (``key`` and ``batches``), so
    the patch basis of exactly the training images can be computed from it.
    """

    images: np.ndarray
    """``(n, C, H, W)`` uint8 pixels (``C = 3``: RGB)."""
    labels: np.ndarray
    """``(n,)`` int64 class indices in ``[0, len(classes))``."""
    classes: tuple[str, ...]
    """Class names, indexed by label."""
    key: str
    """Identifies the exact images and split (it keys the training set's basis)."""

    def __post_init__(self) -> None:
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise UserError(
                f"labelled images must be uint8 (n, C, H, W), got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise UserError(f"{images.shape[0]} images but labels of shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise UserError(f"labels must lie in [0, {len(self.classes)})")
        self.images, self.labels = images, labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, channels: int, batch: int = 1024) -> Iterator[np.ndarray]:
        """The images as float32 ``[0, 1]`` batches (:class:`PatchDataset`)."""
        if channels != self.images.shape[1]:
            raise DatasetError(
                f"{self.key}: has {self.images.shape[1]} channels, {channels} were asked for"
            )
        for start in range(0, len(self), batch):
            yield self.images[start : start + batch].astype(np.float32) / np.float32(255.0)


class DatasetFactory(Protocol):
    """What ``register_datasets`` registers: ``factory(argument) -> PatchDataset``."""

    name: str
    description: str

    def __call__(self, argument: str | None) -> PatchDataset: ...


class DemoPart(Protocol):
    """What ``register_demo_parts`` registers: a section of ``zooscan demo``."""

    name: str

    def __call__(self, store: Any, out_dir: Any, *, dataset: str, quick: bool) -> dict: ...


@dataclass
class PatchBasis:
    """Principal components of the image patches of one dataset for one ``(C, kh, kw)``.

    ``components[:, i]`` is ``u_i`` (columns, as ``numpy.linalg.eigh`` returns them),
    sorted by decreasing eigenvalue, each with a fixed sign convention (its entry of
    largest absolute value is positive; entries within 1e-9 of that magnitude count as
    tied and the first of them decides) so a basis is reproducible. Patch vectors are
    flattened in ``(c, kh, kw)`` order, the order of ``weight.reshape(out, -1)``.
    ``eigenvalues[i]`` is the variance (centered) or mean square (uncentered) of the
    patches along ``u_i``; the paper's ``lambda_i = sqrt(eigenvalues[i])``.
    Pixels are RGB (or luminance for ``C=1``) in ``[0, 1]``.
    """

    dataset: str
    """The dataset's ``key`` (identifies the exact image set)."""
    channels: int
    kh: int
    kw: int
    centered: bool
    components: np.ndarray
    """``(d, d)`` float64, columns are the components."""
    eigenvalues: np.ndarray
    """``(d,)`` float64, decreasing, clipped at 0."""
    mean: np.ndarray
    """``(d,)`` float64 mean patch."""
    second_moment: np.ndarray
    """``(d, d)`` float64 ``E[p p^T]`` (uncentered), kept so other spaces can be derived."""
    n_patches: int
    n_images: int

    @property
    def dim(self) -> int:
        """``d = C * kh * kw``."""
        return self.channels * self.kh * self.kw

    @property
    def lambdas(self) -> np.ndarray:
        """The paper's patch spectrum ``lambda_i = sqrt(eigenvalue_i)`` (Def. 4.1)."""
        return np.sqrt(np.clip(self.eigenvalues, 0.0, None))

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """``(C, kh, kw)``."""
        return self.channels, self.kh, self.kw

    @property
    def id(self) -> str:
        """Stable, readable identifier: ``<dataset key>~<C>x<kh>x<kw>~centered|uncentered``.

        The store escapes it for use as an HDF5 name.
        """
        centering = "centered" if self.centered else "uncentered"
        return f"{self.dataset}~{self.channels}x{self.kh}x{self.kw}~{centering}"


def basis_id(dataset_key: str, shape_key: tuple[int, int, int], centered: bool = True) -> str:
    """The :attr:`PatchBasis.id` a basis with these parameters has (to look one up)."""
    c, kh, kw = shape_key
    return f"{dataset_key}~{c}x{kh}x{kw}~{'centered' if centered else 'uncentered'}"


@dataclass
class Analysis:
    """A first layer projected on one basis."""

    basis_id: str
    projections: np.ndarray
    """``(out, d)`` float64: each pixel-space filter's coefficients on ``u_i``."""
    energy: np.ndarray
    """``(d,)`` float64 energy profile, divided by its maximum."""


@dataclass
class ModelRecord:
    """Everything the store keeps for one scanned model."""

    source: str
    name: str
    layer: FirstLayer
    analyses: list[Analysis] = field(default_factory=list)
    scanned_at: str = ""
    """ISO-8601 UTC time of the scan."""


@dataclass
class RunRecord:
    """Everything the store keeps for one trainer run (``/runs/<run id>``).

    The store also keeps the run's final first layer as a model of source ``trainer``
    named ``run_id`` (see :meth:`zooscan.store.Store.commit_run`), so runs are listed,
    correlated and fitted exactly like scanned models.
    """

    run_id: str
    config: dict[str, Any]
    """The training configuration (JSON-ready)."""
    layer: FirstLayer
    """The final first layer: weight ``(K, C, kh, kw)`` as trained, with the input
    normalisation (``mean``, ``std``) the model was trained with."""
    steps: np.ndarray
    """``(S,)`` int64 optimiser steps of the snapshots, increasing, ``steps[0] == 0``."""
    snapshots: np.ndarray
    """``(S, K, C, kh, kw)`` float32 first-layer weights; ``snapshots[0]`` is the init."""
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    """Equal-length 1-D arrays, one entry per evaluation: ``epoch``, ``step``,
    ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``seconds``..."""
    profiles: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """``kind -> basis id -> (S, d)`` float64 profiles over the snapshots. Kinds:
    ``energy`` (init subtracted), ``energy_raw``, and for linear CNNs ``exact`` (the
    exact gradient-descent prediction) and ``closed_form`` (the paper's formula fitted
    per snapshot)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Results (JSON-ready): final accuracies, per-snapshot fits and correlations..."""
    created_at: str = ""
    """ISO-8601 UTC time the run finished."""


def check_options(owner: str, options: dict[str, str], known: dict[str, str]) -> None:
    """Reject option keys ``owner`` does not understand, listing the ``known`` ones
    (``{key: help}``) in a :class:`zooscan.errors.UserError`."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        listing = "; ".join(f"{k}: {v}" for k, v in known.items()) or "none"
        raise UserError(f"{owner}: unknown option(s) {', '.join(unknown)} (known: {listing})")
