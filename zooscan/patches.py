"""Patch bases: exact, streamed principal components of image patches (DESIGN §1).

A *patch* is the ``C x kh x kw`` window a first-layer filter sees, flattened in
``(c, kh, kw)`` order (the order of ``weight.reshape(out, -1)``). Every stride-1
*valid* patch of every image counts. The basis is the exact float64
eigendecomposition of the patch covariance (or of the uncentered second moment,
paper Def. 2.1), accumulated in one pass over the images as a count, a sum and a
sum of outer products: memory is ``O(d^2)`` plus one bounded tile of the current
batch, never the patch matrix.

Two exact accumulation methods give the same sums (to rounding):

``rows`` (default)
    Splits a patch into its ``kh`` rows. The block of the second moment between
    patch rows ``i`` and ``i + delta`` is a sum over output rows ``y`` of
    ``G_delta(y + i)``, where ``G_delta(u) = sum_x r_u(x) r_{u+delta}(x)^T`` pairs
    the ``(c, kw)`` row segments of image rows ``u`` and ``u + delta``. One batched
    matrix product per ``delta`` gives every ``G_delta(u)``; a cumulative sum over
    ``u`` then gives each of the ``kh - delta`` windows in O(1). This costs about
    ``H / (kh * Hout)`` of the direct method: 3-10x faster for 3x3 to 16x16 kernels.
``direct``
    Unfolds the patches (``torch.nn.functional.unfold``) and adds ``P^T P``. The
    reference implementation; kept for checks and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from zooscan.errors import DatasetError
from zooscan.records import PatchBasis, PatchDataset

__all__ = [
    "DEFAULT_TILE_BYTES",
    "METHODS",
    "PatchStats",
    "compute_basis",
    "eigh_sorted",
    "extract_patches",
    "fix_signs",
]

DEFAULT_TILE_BYTES = 64 * 2**20
"""Upper bound (bytes) on the float64 working set of one tile of images."""

METHODS = ("rows", "direct")
"""Accumulation methods: both exact, ``rows`` is the fast default."""

_SIGN_TIE_RTOL = 1e-9


def eigh_sorted(cov: np.ndarray, *, clip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of a symmetric matrix, largest eigenvalue first.

    Returns ``(eigenvalues, components)``: eigenvalues in decreasing order (clipped
    at 0 when ``clip``, as rounding can make those of a PSD matrix slightly
    negative) and the matching unit eigenvectors as *columns*, signs fixed by
    :func:`fix_signs`. Computed in float64 with ``numpy.linalg.eigh`` (exact, not
    randomised).
    """
    matrix = np.asarray(cov, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"eigh_sorted needs a square matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("eigh_sorted: the matrix has non-finite entries")
    values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    values = values[::-1].copy()
    vectors = fix_signs(vectors[:, ::-1])
    if clip:
        values = np.clip(values, 0.0, None)
    return values, vectors


def fix_signs(components: np.ndarray) -> np.ndarray:
    """Flip columns so that each one's entry of largest magnitude is positive.

    Entries within a relative ``1e-9`` of the largest magnitude count as tied, and
    the first of them decides, so exactly symmetric components get a reproducible
    sign too. Returns a new float64 array.
    """
    vectors = np.array(components, dtype=np.float64, copy=True)
    if vectors.size == 0:
        return vectors
    magnitude = np.abs(vectors)
    peak = magnitude.max(axis=0, keepdims=True)
    first_peak = np.argmax(magnitude >= peak * (1.0 - _SIGN_TIE_RTOL), axis=0)
    signs = np.sign(vectors[first_peak, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def extract_patches(images: np.ndarray | torch.Tensor, kh: int, kw: int) -> np.ndarray:
    """Every stride-1 valid patch of ``images`` ``(n, C, H, W)`` as rows of a matrix.

    Returns float64 ``(n * L, C * kh * kw)``: image by image, positions in row-major
    order, each patch flattened in ``(c, kh, kw)`` order. It materialises the patch
    matrix, so it is meant for tests and small inputs; bases use :class:`PatchStats`.
    """
    x = image_tensor(images).cpu().to(torch.float64)
    _check_kernel(x.shape[1], kh, kw)
    if x.shape[2] < kh or x.shape[3] < kw:
        return np.zeros((0, x.shape[1] * kh * kw))
    cols = F.unfold(x, (kh, kw))  # (n, d, L), d in (c, kh, kw) order
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


@dataclass
class PatchStats:
    """Streaming accumulator of patch statistics for one ``(C, kh, kw)``.

    Holds the patch count ``n``, the sum of patches ``sum`` ``(d,)`` and the sum of
    their outer products ``outer`` ``(d, d)``, all float64, plus ``n_images`` (images
    that gave at least one patch). Feed it batches with :meth:`update`, combine
    partial results with :meth:`merge`, finish with :meth:`to_basis`.
    """

    channels: int
    kh: int
    kw: int
    method: str = "rows"
    """``rows`` (fast) or ``direct`` (unfold + matrix product); both exact."""
    tile_bytes: int = DEFAULT_TILE_BYTES
    """Bound on the float64 working set of one tile (images x rows) of a batch."""
    n: int = 0
    n_images: int = 0
    sum: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _check_kernel(self.channels, self.kh, self.kw)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if self.tile_bytes <= 0:
            raise ValueError("tile_bytes must be positive")
        d = self.dim
        self.sum = np.zeros(d) if self.sum is None else np.array(self.sum, dtype=np.float64)
        self.outer = (
            np.zeros((d, d)) if self.outer is None else np.array(self.outer, dtype=np.float64)
        )
        if self.sum.shape != (d,) or self.outer.shape != (d, d):
            raise ValueError(f"sum/outer shapes {self.sum.shape}/{self.outer.shape} need d={d}")

    @property
    def dim(self) -> int:
        """``d = C * kh * kw``."""
        return self.channels * self.kh * self.kw

    def update(self, images: np.ndarray | torch.Tensor) -> None:
        """Add every valid patch of ``images`` ``(n, C, H, W)``.

        Any real dtype is accepted and promoted to float64 tile by tile. Images
        smaller than the kernel add nothing. Raises :class:`ValueError` for a wrong
        shape, a channel mismatch or non-finite pixels, leaving the stats unchanged.
        """
        x = image_tensor(images).cpu()
        if x.shape[1] != self.channels:
            raise ValueError(f"images have {x.shape[1]} channels, these stats need {self.channels}")
        n_img, _, height, width = x.shape
        if n_img == 0 or height < self.kh or width < self.kw:
            return
        accumulate = _accumulate_rows if self.method == "rows" else _accumulate_direct
        image_row, shared_row = self._row_costs(width)
        count, total, outer = 0, torch.zeros(self.dim, dtype=torch.float64), None
        for tile in _tiles(x, self.kh, image_row, shared_row, self.tile_bytes):
            tile_count, tile_sum, tile_outer = accumulate(tile.to(torch.float64), self.kh, self.kw)
            # a NaN or inf pixel reaches the sum of every patch that holds it
            if not bool(torch.isfinite(tile_sum).all()):
                raise ValueError("images contain non-finite pixel values")
            count += tile_count
            total += tile_sum
            outer = tile_outer if outer is None else outer.add_(tile_outer)
        # update only once the whole batch went through, so a bad batch changes nothing
        self.n += count
        self.sum += total.numpy()
        self.outer += outer.numpy()
        self.n_images += n_img

    def merge(self, other: PatchStats) -> PatchStats:
        """A new accumulator holding the patches of both ``self`` and ``other``."""
        if (other.channels, other.kh, other.kw) != (self.channels, self.kh, self.kw):
            raise ValueError(
                f"cannot merge stats for {other.channels}x{other.kh}x{other.kw} "
                f"into {self.channels}x{self.kh}x{self.kw}"
            )
        return PatchStats(
            self.channels,
            self.kh,
            self.kw,
            method=self.method,
            tile_bytes=self.tile_bytes,
            n=self.n + other.n,
            n_images=self.n_images + other.n_images,
            sum=self.sum + other.sum,
            outer=self.outer + other.outer,
        )

    def to_basis(
        self,
        dataset_key: str,
        channels: int | None = None,
        kh: int | None = None,
        kw: int | None = None,
        centered: bool = True,
        n_images: int | None = None,
    ) -> PatchBasis:
        """The :class:`PatchBasis` of the patches seen so far.

        ``centered`` decomposes the covariance ``E[p p^T] - m m^T``, otherwise the
        second moment ``E[p p^T]`` (paper Def. 2.1). ``channels``/``kh``/``kw``/
        ``n_images`` are optional cross-checks: when given they must match what was
        accumulated. Raises :class:`DatasetError` when no patch was seen.
        """
        self._check_expected(channels=channels, kh=kh, kw=kw, n_images=n_images)
        if self.n == 0:
            raise DatasetError(
                f"dataset {dataset_key!r} gave no {self.kh}x{self.kw} patch "
                "(no image, or every image is smaller than the kernel)"
            )
        mean = self.sum / self.n
        second = _symmetric(self.outer / self.n)
        target = _symmetric(second - np.outer(mean, mean)) if centered else second
        eigenvalues, components = eigh_sorted(target, clip=True)
        return PatchBasis(
            dataset=dataset_key,
            channels=self.channels,
            kh=self.kh,
            kw=self.kw,
            centered=bool(centered),
            components=components,
            eigenvalues=eigenvalues,
            mean=mean,
            second_moment=second,
            n_patches=int(self.n),
            n_images=int(self.n_images),
        )

    def _check_expected(self, **expected: int | None) -> None:
        for name, value in expected.items():
            if value is not None and value != getattr(self, name):
                raise ValueError(
                    f"to_basis: {name}={value} but the stats hold {getattr(self, name)}"
                )

    def _row_costs(self, width: int) -> tuple[int, int]:
        """float64 bytes of a tile per image row: for each image, and shared by all images."""
        wout = width - self.kw + 1
        if self.method == "rows":
            m = self.channels * self.kw
            return 8 * (width * self.channels + wout * m), 8 * 2 * m * m
        return 8 * (width * self.channels + 2 * wout * self.dim), 0


def compute_basis(
    dataset: PatchDataset,
    channels: int,
    kh: int,
    kw: int,
    *,
    centered: bool = True,
    progress: Callable[[int], None] | None = None,
    method: str = "rows",
) -> PatchBasis:
    """Stream ``dataset`` once and return its exact patch basis for ``(channels, kh, kw)``.

    ``progress`` is called after each batch with the number of images in it (for a
    progress bar's ``update``). ``method`` selects the accumulation (see the module
    docstring); the result does not depend on it beyond rounding.
    """
    stats = PatchStats(channels, kh, kw, method=method)
    for batch in dataset.batches(channels):
        try:
            stats.update(batch)
        except ValueError as exc:
            raise DatasetError(f"dataset {dataset.key!r}: {exc}") from exc
        if progress is not None:
            progress(int(batch.shape[0]))
    return stats.to_basis(dataset.key, centered=centered)


# --- internals -----------------------------------------------------------------------


def _check_kernel(channels: int, kh: int, kw: int) -> None:
    for name, value in (("channels", channels), ("kh", kh), ("kw", kw)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def image_tensor(
    images: np.ndarray | torch.Tensor, *, error: type[Exception] = ValueError
) -> torch.Tensor:
    """``images`` as a detached tensor on its own device (an array shares its memory
    unless read-only); ``error`` unless it is a real-valued ``(n, C, H, W)`` batch."""
    if isinstance(images, torch.Tensor):
        x = images.detach()
    else:
        array = np.asarray(images)
        x = torch.from_numpy(array if array.flags.writeable else array.copy())
    if x.ndim != 4:
        raise error(f"images must be (n, C, H, W), got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise error(f"images must be real numbers, got {x.dtype}")
    return x


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return 0.5 * (matrix + matrix.T)


def _tiles(
    x: torch.Tensor, kh: int, image_row: int, shared_row: int, budget: int
) -> Iterator[torch.Tensor]:
    """Split ``x`` into tiles of whole images or, for large images, bands of rows.

    A tile of ``g`` images and ``h`` image rows costs ``h * (g * image_row +
    shared_row)`` bytes, kept within ``budget`` where possible. Bands overlap by
    ``kh - 1`` image rows, so every valid patch falls in exactly one tile.
    """
    n, _, height, _ = x.shape
    images_per_tile = (budget // height - shared_row) // image_row
    if images_per_tile >= 1:
        for start in range(0, n, images_per_tile):
            yield x[start : start + images_per_tile]
        return
    hout = height - kh + 1
    band = max(1, budget // (image_row + shared_row) - (kh - 1))
    for i in range(n):
        for top in range(0, hout, band):
            yield x[i : i + 1, :, top : min(top + band, hout) + kh - 1]


def _window_sums(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Sum of all valid patches, ``(C * kh * kw,)`` in ``(c, kh, kw)`` order."""
    _, channels, height, width = x.shape
    hout, wout = height - kh + 1, width - kw + 1
    integral = F.pad(x.sum(0).cumsum(1).cumsum(2), (1, 0, 1, 0))  # (C, H+1, W+1)
    sums = (
        integral[:, hout : hout + kh, wout : wout + kw]
        - integral[:, :kh, wout : wout + kw]
        - integral[:, hout : hout + kh, :kw]
        + integral[:, :kh, :kw]
    )
    return sums.reshape(channels * kh * kw)


def _accumulate_direct(x: torch.Tensor, kh: int, kw: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, sum and ``P^T P`` of the unfolded patch matrix ``P`` of one tile."""
    cols = F.unfold(x, (kh, kw))  # (n, d, L)
    d = cols.shape[1]
    patches = cols.transpose(0, 1).reshape(d, -1)
    return patches.shape[1], patches.sum(1), patches @ patches.T


def _accumulate_rows(x: torch.Tensor, kh: int, kw: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, sum and sum of outer products of one tile's patches, by patch rows.

    With ``r_u(x)`` the ``(c, kw)`` segment of image row ``u`` at column ``x``, the
    second-moment block between patch rows ``i`` and ``i + delta`` is
    ``sum_{y < Hout} G_delta(y + i)`` with ``G_delta(u) = sum_{n, x} r_u r_{u+delta}^T``.
    """
    n, channels, height, width = x.shape
    hout, wout = height - kh + 1, width - kw + 1
    m = channels * kw
    segments = x.unfold(3, kw, 1).permute(2, 0, 3, 1, 4).reshape(height, n * wout, m)
    blocks = x.new_zeros(kh, m, kh, m)
    rows = torch.arange(kh)
    for delta in range(kh):
        gram = torch.bmm(segments[: height - delta].transpose(1, 2), segments[delta:])
        cumulative = F.pad(gram.cumsum(0), (0, 0, 0, 0, 1, 0))  # (height - delta + 1, m, m)
        windows = cumulative[hout : hout + kh - delta] - cumulative[: kh - delta]
        top = rows[: kh - delta]
        blocks[top, :, top + delta, :] = windows
        if delta:
            blocks[top + delta, :, top, :] = windows.transpose(1, 2)
    # (kh, c, kw) x (kh, c, kw) -> (c, kh, kw) x (c, kh, kw)
    d = channels * kh * kw
    outer = blocks.reshape(kh, channels, kw, kh, channels, kw).permute(1, 0, 2, 4, 3, 5)
    return n * hout * wout, _window_sums(x, kh, kw), outer.reshape(d, d)
