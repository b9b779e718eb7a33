"""Built-in patch datasets: ``synthetic`` (offline default) and ``folder:PATH``.

``synthetic[:n=2000,size=64,seed=0]``
    Procedural natural images from a dead-leaves model: opaque discs whose radii
    follow ``p(r) ~ r^-3`` between 1 pixel and the image size fall on top of each
    other, which gives the ``~1/f^2`` power spectrum, the edges and the occlusions
    of photographs. Leaf colours are correlated across channels the way real
    colours are (a luminance axis plus weaker red-green and yellow-blue opponent
    axes, a per-image exposure and white-balance cast), leaves carry a gentle
    shading gradient, and the image gets a mild optical blur (sigma 0.6 px, colour
    detail 0.8 px more), sensor noise (sigma 0.003) and 8-bit quantisation.
    Fully determined by ``(n, size, seed)`` and the generator version, which the
    key records (``synthetic:n=2000,size=64,seed=0,v=1``; the key is also a valid
    spec). The defaults (2000 images of 64x64: 6.7 M 7x7 patches, 25 MB kept in
    memory after the first pass) give a 3x7x7 basis in a few seconds on 2 cores
    and keep 3x16x16 (d = 768) feasible (tens of seconds). ``channels=3`` is RGB,
    ``1`` luminance, ``2`` the red and green channels, and ``C > 3`` adds ``C - 3``
    channels that are fixed random mixtures of the leaf colour plus an independent
    part (as multispectral bands are); the RGB channels never depend on ``C``.
``folder:PATH``
    Every image under ``PATH`` (recursively; png, jpg, jpeg, bmp, tif, tiff, webp,
    gif in any letter case), EXIF orientation applied, converted to RGB in
    ``[0, 1]`` (grayscale, palette, RGBA, CMYK and 16-bit files included; alpha is
    dropped) or to ITU-R 601 luminance for ``channels=1``. Images are used at full
    resolution unless ``$ZOOSCAN_FOLDER_MAX_SIDE`` is set, in which case larger
    images are downscaled (antialiased) to that longest side. Same-size images are
    batched together. Unreadable files are skipped with a logged warning.

Labelled splits (``dataset.labelled(split, size=None, count=None)``, what the
trainer trains and tests on; uint8 RGB, ``split`` is ``train`` or ``test``):

``synthetic``: oriented leaves, 10 classes
    The same dead-leaves machinery with elliptic leaves (aspect ratio uniform in
    [2, 3], the same area distribution ``p(r) ~ r^-3`` of the area-equivalent
    radius). In an image of class ``k`` every leaf's major axis points at
    ``k * 18`` degrees (counterclockwise from the x axis as displayed) plus a
    uniform jitter of at most 4.5 degrees, so the class is a local, learnable
    structure, while colours, shading, occlusion, optics and noise are the
    unlabelled generator's and the orientations averaged over the classes are
    uniform: the patch basis matches the unlabelled one (top components luminance
    DC, then the two gradients; 3x3x3 eigenvalue spectra correlate at r > 0.999).
    Classes are named ``orient000`` ... ``orient162`` and image ``i`` has class
    ``i % 10`` (exact balance). Defaults: 32x32, 5000 train and 1000 test images.
    A spec that sets ``n`` makes it the train count (test: ``max(10, n // 5)``);
    one that sets ``size`` makes it the default size; ``seed`` selects the images;
    the ``size`` and ``count`` arguments override. Train and test images come
    from separate seed streams (and from none the unlabelled images use). The key
    is ``synthetic-oriented:<split>,n=<count>,size=<size>,seed=<seed>,v=1``.
``folder:PATH`` with class folders (torchvision ImageFolder layout)
    ``PATH/<class>/...`` (images nested deeper belong to their top folder):
    the classes are the folder names, sorted; within a class, files are ordered
    by path and every 5th (the 5th, 10th, ...) is a test image, the others train
    images. When ``PATH`` has ``train/`` and ``test/`` folders, they are the
    splits instead (``train/<class>/...``, ``test/<class>/...``; the classes are
    those of ``train/``; other top-level folders are ignored). Images are
    converted to RGB, resized so the shorter side is ``size`` (default 32;
    bilinear, antialiased) and centre-cropped to ``size`` x ``size``. ``count``
    keeps the first ``count`` images dealt round robin over the classes (see
    :func:`balanced_subset`), in the split's order (by class, then path).
``folder:PATH`` holding images directly: the photo-crop task
    Every image under ``PATH`` (recursively) is a photo and a class, named by
    its relative path. Each photo is downscaled (never upscaled) so its shorter
    side is at most ``4 * size``; its longer side is cut at 75%: train crops lie
    before the cut, test crops after it, so test accuracy measures
    generalisation to unseen parts of the photos. A split is ``count`` random
    ``size`` x ``size`` crops (defaults 400 per photo for train, 100 for test;
    crop ``i`` is of photo ``i % n_photos``), at positions drawn from a fixed
    seed per split and photo. A photo too small for ``size`` crops in both
    regions is an error that names the largest size it allows.

Keys of folder splits are ``folder:PATH#<file fingerprint>:<task>:<split>,
size=<size>,count=<count>,v=1`` with ``<task>`` one of ``holdout``,
``train-test``, ``photo-crop``. Unreadable files are errors here (a labelled
split must be complete). Impossible requests (unknown split, fewer than two
classes, an empty split, ``count`` beyond the split, a size too large for a
photo, more than 8 GiB of pixels) raise :class:`~zooscan.errors.DatasetError`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import zooscan
from zooscan.errors import DatasetError
from zooscan.records import LabelledImages

log = logging.getLogger(__name__)

LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""ITU-R BT.601 luminance weights for R, G, B."""


@zooscan.hookimpl
def register_datasets(register: Callable[[Any], None]) -> None:
    """Register ``synthetic`` and ``folder``."""
    register(SyntheticDataset)
    register(FolderDataset)


def to_luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luminance of ``(n, 3, H, W)`` RGB, as ``(n, 1, H, W)`` float32."""
    luma = np.tensordot(rgb, LUMA_601, axes=([1], [0]))
    return np.clip(luma, 0.0, 1.0).astype(np.float32)[:, None]


# --- synthetic: dead leaves ---------------------------------------------------------

GENERATOR_VERSION = 1
"""Bumped whenever the generator's images change (it is part of the dataset key)."""

RADIUS_MIN = 1.0
RADIUS_EXPONENT = 3.0
COVER_DEPTH = 5.0
"""Mean number of leaves stacked on a pixel; the rest (about e^-5) shows a background."""
BLUR_SIGMA = 0.6
CHROMA_BLUR_SIGMA = 0.8
"""Colour detail is softer than luminance detail in photographs (demosaicing, JPEG)."""
NOISE_SIGMA = 0.003
PIXELS_PER_BATCH = 2**18
MAX_SIZE = 1024
CACHE_BYTES = 256 * 2**20
"""A synthetic dataset keeps its rendered 8-bit images when they fit in this many bytes."""

_OPPONENT = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=np.float64) / np.array(
    [[math.sqrt(2.0)], [math.sqrt(6.0)]]
)
"""Red-green and yellow-blue unit directions (rows), orthogonal to grey."""


@dataclass(frozen=True)
class SyntheticParams:
    """The parameters that determine the synthetic images."""

    n: int = 2000
    size: int = 64
    seed: int = 0

    @classmethod
    def parse(cls, argument: str | None) -> SyntheticParams:
        """Parse ``n=2000,size=64,seed=0`` (any subset, any order)."""
        values: dict[str, int] = {}
        for item in (argument or "").split(","):
            if not item.strip():
                continue
            name, sep, raw = item.partition("=")
            name = name.strip()
            if not sep or name not in ("n", "size", "seed", "v"):
                raise DatasetError(
                    f"synthetic: bad option {item.strip()!r} (use n=INT,size=INT,seed=INT)"
                )
            try:
                values[name] = int(raw.strip())
            except ValueError:
                raise DatasetError(f"synthetic: {name} must be an integer, got {raw!r}") from None
        if values.pop("v", GENERATOR_VERSION) != GENERATOR_VERSION:
            raise DatasetError(f"synthetic: this zooscan makes generator v={GENERATOR_VERSION}")
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        """Raise :class:`DatasetError` for values outside the supported range."""
        if self.n < 1:
            raise DatasetError(f"synthetic: n must be >= 1, got {self.n}")
        if not 8 <= self.size <= MAX_SIZE:
            raise DatasetError(f"synthetic: size must be in [8, {MAX_SIZE}], got {self.size}")
        if self.seed < 0:
            raise DatasetError(f"synthetic: seed must be >= 0, got {self.seed}")

    @property
    def key(self) -> str:
        """The dataset key: every parameter plus the generator version."""
        return f"synthetic:n={self.n},size={self.size},seed={self.seed},v={GENERATOR_VERSION}"

    @property
    def batch_size(self) -> int:
        """Images per batch (fixed by ``size``, so batches do not depend on channels)."""
        return max(1, PIXELS_PER_BATCH // (self.size * self.size))


class SyntheticDataset:
    """Deterministic dead-leaves images (see the module docstring).

    The rendered 8-bit images are kept in memory after the first full pass (up to
    ``CACHE_BYTES``), so computing several bases from one dataset renders once.
    """

    name = "synthetic"
    description = (
        "procedural natural images (dead leaves, 1/f^2 spectrum), offline default; "
        "options n=2000,size=64,seed=0"
    )

    def __init__(self, argument: str | None = None) -> None:
        self.params = SyntheticParams.parse(argument)
        self.key = self.params.key
        self._given = _given_options(argument)
        self._cache: dict[int, list[np.ndarray]] = {}
        self._labelled: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"SyntheticDataset({self.key!r})"

    def batches(self, channels: int) -> Iterator[np.ndarray]:
        """Yield float32 ``(n, channels, size, size)`` batches in ``[0, 1]``."""
        try:
            channels = operator.index(channels)
        except TypeError:
            channels = 0
        if channels < 1:
            raise DatasetError("synthetic: channels must be a positive integer")
        for stack in self._stacks(max(3, channels)):
            yield _select_channels(stack, channels)

    def labelled(
        self, split: str, *, size: int | None = None, count: int | None = None
    ) -> LabelledImages:
        """One split of the 10-class oriented-leaves task (see the module docstring).

        ``size`` defaults to the spec's ``size`` when the spec gives one, else 32;
        ``count`` defaults to the spec's ``n`` for ``train`` (``max(10, n // 5)`` for
        ``test``) when the spec gives one, else 5000 / 1000. Image ``i`` has class
        ``i % 10``. Train and test come from disjoint seed streams. Splits up to
        ``CACHE_BYTES`` are kept, so asking again does not render again.
        """
        split = check_split("synthetic", split)
        size = self._labelled_size(size)
        count = self._labelled_count(split, count)
        check_labelled_bytes("synthetic", count, size)
        p = self.params
        key = f"synthetic-oriented:{split},n={count},size={size},seed={p.seed},v={LABELLED_VERSION}"
        images = self._labelled.get(key)
        if images is None:
            images = _render_labelled(count, size, (p.seed, _LABELLED_STREAM, SPLITS.index(split)))
            if images.nbytes + sum(kept.nbytes for kept in self._labelled.values()) > CACHE_BYTES:
                self._labelled.clear()
            if images.nbytes <= CACHE_BYTES:
                self._labelled[key] = images
        return LabelledImages(
            images=images.copy(),
            labels=oriented_leaves_labels(count),
            classes=orientation_classes(),
            key=key,
        )

    def _labelled_size(self, size: int | None) -> int:
        if size is None:
            return self.params.size if "size" in self._given else LABELLED_SIZE
        size = positive_int("synthetic", "size", size)
        if not 8 <= size <= MAX_SIZE:
            raise DatasetError(f"synthetic: size must be in [8, {MAX_SIZE}], got {size}")
        return size

    def _labelled_count(self, split: str, count: int | None) -> int:
        if count is not None:
            return positive_int("synthetic", "count", count)
        if "n" not in self._given:
            return LABELLED_COUNTS[split]
        n = self.params.n
        return n if split == "train" else max(N_ORIENTATIONS, n // 5)

    def _stacks(self, n_colour: int) -> Iterator[np.ndarray]:
        """The uint8 ``(n, n_colour, size, size)`` batches, rendered or cached."""
        if n_colour in self._cache:
            yield from self._cache[n_colour]
            return
        p = self.params
        keep = p.n * n_colour * p.size * p.size <= CACHE_BYTES
        rendered = []
        for index, start in enumerate(range(0, p.n, p.batch_size)):
            count = min(p.batch_size, p.n - start)
            stack = _render_uint8(count, p.size, (p.seed, index), n_colour)
            if keep:
                rendered.append(stack)
            yield stack
        if keep:
            self._cache[n_colour] = rendered


def _given_options(argument: str | None) -> frozenset[str]:
    """The option names a ``synthetic:...`` argument sets explicitly."""
    items = (item.partition("=")[0].strip() for item in (argument or "").split(","))
    return frozenset(name for name in items if name)


@lru_cache(maxsize=64)
def leaves_per_image(size: int) -> int:
    """Leaves per image so that on average ``COVER_DEPTH`` leaves cover each pixel.

    A leaf of radius ``r`` has its centre uniform over ``[-r, size + r]^2``, so it
    covers a given pixel with probability about ``pi r^2 / (size + 2r)^2``.
    """
    radii = np.geomspace(RADIUS_MIN, float(size), 4001)
    weights = np.gradient(radii) * radii**-RADIUS_EXPONENT
    cover = np.minimum(1.0, np.pi * radii**2 / (size + 2.0 * radii) ** 2)
    return int(math.ceil(COVER_DEPTH * weights.sum() / float((weights * cover).sum())))


def render_dead_leaves(
    count: int, size: int, seed: tuple[int, ...], channels: int = 3
) -> np.ndarray:
    """Render ``count`` dead-leaves images, float32 ``(count, channels, size, size)``.

    Deterministic in ``(size, seed)``; the first three channels (RGB) do not depend
    on ``channels``, and ``channels=1`` is the ITU-R 601 luminance of the RGB images.
    """
    return _select_channels(_render_uint8(count, size, seed, max(3, channels)), channels)


def _select_channels(stack: np.ndarray, channels: int) -> np.ndarray:
    """float32 pixels in ``[0, 1]``: luminance for 1 channel, else the first ``channels``."""
    pixels = stack.astype(np.float32) / np.float32(255.0)
    return to_luminance(pixels[:, :3]) if channels == 1 else pixels[:, :channels]


def _render_uint8(count: int, size: int, seed: tuple[int, ...], n_colour: int) -> np.ndarray:
    """Render ``n_colour >= 3`` channels (RGB first) as uint8 ``(count, n_colour, size, size)``."""
    rng = np.random.default_rng(list(seed))
    leaves = _sample_leaves(rng, count, size)
    owner = _leaf_map(leaves, count, size)
    colours = _colour_leaves(rng, leaves, count)
    if n_colour > 3:
        colours = np.concatenate([colours, _extra_channels(colours, n_colour - 3, seed)], 1)
    return _finish(_paint(owner, leaves, colours, size), seed)


@dataclass
class _Leaves:
    """Leaf geometry of one batch; leaf ``i`` belongs to image ``image[i]``.

    The last ``count`` leaves are the per-image backgrounds; among the others a
    later leaf lies on top of an earlier one.
    """

    image: np.ndarray
    cy: np.ndarray
    cx: np.ndarray
    radius: np.ndarray
    """Disc radius, or the semi-major axis of an elliptic leaf."""
    shade: np.ndarray
    """(n, 2) shading gradient (per unit of radius) along y and x."""
    minor: np.ndarray | None = None
    """Semi-minor axes of elliptic leaves (``None``: every leaf is a disc)."""
    angle: np.ndarray | None = None
    """Orientation of each ellipse's major axis, radians counterclockwise from the
    image's x axis as displayed (rows run downwards)."""

    def extent(self, axis: int) -> np.ndarray:
        """Half the extent of each leaf along ``axis`` (0: y, 1: x)."""
        if self.minor is None:
            return self.radius
        along = np.sin(self.angle) if axis == 0 else np.cos(self.angle)
        return np.sqrt((self.radius * along) ** 2 + (self.minor) ** 2 * (1.0 - along**2))


def _sample_leaves(rng: np.random.Generator, count: int, size: int) -> _Leaves:
    per_image = leaves_per_image(size)
    total = count * per_image
    radius = _leaf_radii(rng, total, size)
    cy = rng.random(total) * (size + 2 * radius) - radius
    cx = rng.random(total) * (size + 2 * radius) - radius
    image = np.repeat(np.arange(count), per_image)
    return _with_backgrounds(rng, count, size, image, cy, cx, radius)


def _leaf_radii(rng: np.random.Generator, total: int, size: int) -> np.ndarray:
    """``total`` radii with ``p(r) ~ r^-3`` between :data:`RADIUS_MIN` and ``size``."""
    low, high = RADIUS_MIN**-2, float(size) ** -2
    return (low - rng.random(total) * (low - high)) ** -0.5


def _with_backgrounds(
    rng: np.random.Generator,
    count: int,
    size: int,
    image: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    radius: np.ndarray,
    minor: np.ndarray | None = None,
    angle: np.ndarray | None = None,
) -> _Leaves:
    """The sampled leaves plus one background disc per image (last), with shading."""
    half = size / 2.0
    background = np.full(count, float(size))
    return _Leaves(
        image=np.concatenate([image, np.arange(count)]),
        cy=np.concatenate([cy, np.full(count, half)]),
        cx=np.concatenate([cx, np.full(count, half)]),
        radius=np.concatenate([radius, background]),
        shade=rng.normal(0.0, 0.12, size=(len(image) + count, 2)),
        minor=None if minor is None else np.concatenate([minor, background]),
        angle=None if angle is None else np.concatenate([angle, np.zeros(count)]),
    )


def _leaf_map(leaves: _Leaves, count: int, size: int) -> np.ndarray:
    """Index of the visible (top-most) leaf at every pixel, ``(count, size, size)``.

    Each leaf is tested on a square window covering its bounding box clipped to the
    image; leaves with equal windows are tested together.
    """
    n_front = len(leaves.radius) - count
    owner = torch.full((count * size * size,), -1, dtype=torch.int64)
    (y0, height), (x0, width) = (
        _clipped_span(centre[:n_front], extent[:n_front], size)
        for centre, extent in ((leaves.cy, leaves.extent(0)), (leaves.cx, leaves.extent(1)))
    )
    side = np.where((height > 0) & (width > 0), np.maximum(height, width), 0)
    leaf_ids = np.arange(n_front)
    for window in np.unique(side[side > 0]):
        sel = np.nonzero(side == window)[0]
        iy = y0[sel, None] + np.arange(window)
        ix = x0[sel, None] + np.arange(window)
        inside = _inside(leaves, sel, iy, ix)
        inside &= (iy < size)[:, :, None] & (ix < size)[:, None, :]
        k, a, b = np.nonzero(inside)
        pixel = leaves.image[sel][k] * (size * size) + iy[k, a] * size + ix[k, b]
        owner.scatter_reduce_(
            0, torch.from_numpy(pixel), torch.from_numpy(leaf_ids[sel][k]), reduce="amax"
        )
    result = owner.numpy().reshape(count, size, size)
    uncovered = np.nonzero(result < 0)
    result[uncovered] = n_front + uncovered[0]
    return result


def _clipped_span(
    centre: np.ndarray, extent: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """First pixel and pixel count of ``[centre - extent, centre + extent]`` within the image.

    A pixel ``i`` (centre ``i + 0.5``) within ``extent`` of ``centre`` lies in
    ``[floor(centre - extent), floor(centre + extent)]``; the count is <= 0 off the image.
    """
    first = np.clip(np.floor(centre - extent).astype(np.int64), 0, size)
    last = np.clip(np.floor(centre + extent).astype(np.int64), -1, size - 1)
    return first, last - first + 1


def _inside(leaves: _Leaves, sel: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Which pixel centres of the ``(len(sel), w, w)`` windows lie inside leaves ``sel``."""
    cy, cx = leaves.cy[sel, None], leaves.cx[sel, None]
    if leaves.minor is None:
        r2 = leaves.radius[sel, None, None] ** 2
        return ((iy + 0.5 - cy) ** 2)[:, :, None] + ((ix + 0.5 - cx) ** 2)[:, None, :] <= r2
    # (along / a)^2 + (across / b)^2 as a quadratic form in (dx, dy); rows run downwards
    # (float32: the (n, w, w) terms dominate the cost; a boundary pixel may flip, harmlessly)
    dy, dx = iy + 0.5 - cy, ix + 0.5 - cx
    cos, sin = np.cos(leaves.angle[sel])[:, None], np.sin(leaves.angle[sel])[:, None]
    inv_a2, inv_b2 = leaves.radius[sel, None] ** -2, leaves.minor[sel, None] ** -2
    xx = (dx**2 * (cos**2 * inv_a2 + sin**2 * inv_b2)).astype(np.float32)
    yy = (dy**2 * (sin**2 * inv_a2 + cos**2 * inv_b2)).astype(np.float32)
    xy = (dy * (2.0 * cos * sin * (inv_b2 - inv_a2))).astype(np.float32)
    quadratic = xy[:, :, None] * dx.astype(np.float32)[:, None, :]
    quadratic += xx[:, None, :]
    quadratic += yy[:, :, None]
    return quadratic <= 1.0


def _colour_leaves(rng: np.random.Generator, leaves: _Leaves, count: int) -> np.ndarray:
    """RGB colour of every leaf, ``(n_leaves, 3)``: luminance plus opponent chroma."""
    n = len(leaves.radius)
    exposure = rng.uniform(-0.8, 0.8, size=count)  # per image, in logit units
    cast = rng.normal(0.0, 0.2, size=(count, 2))  # per-image white balance
    luminance = 1.0 / (1.0 + np.exp(-(exposure[leaves.image] + rng.normal(0.0, 1.1, size=n))))
    chroma = rng.normal(0.0, [0.25, 0.2], size=(n, 2)) + cast[leaves.image]
    headroom = np.minimum(luminance, 1.0 - luminance)[:, None]
    rgb = luminance[:, None] + headroom * (chroma @ _OPPONENT)
    return np.clip(rgb, 0.0, 1.0)


def _extra_channels(rgb: np.ndarray, extra: int, seed: tuple[int, ...]) -> np.ndarray:
    """``extra`` more channels per leaf: a fixed mixture of RGB plus an own component.

    Channel ``k`` has its own random streams, so it does not depend on ``extra``.
    """
    columns = []
    for k in range(extra):
        mixing = np.random.default_rng([seed[0], 7, k]).dirichlet(np.ones(3))  # sums to 1
        own = np.random.default_rng([*seed, 1, k]).normal(0.0, 0.15, size=len(rgb))
        columns.append(rgb @ mixing + own)
    return np.clip(np.stack(columns, 1), 0.0, 1.0)


def _paint(owner: np.ndarray, leaves: _Leaves, colours: np.ndarray, size: int) -> np.ndarray:
    """Images ``(count, C, size, size)`` float32 from the leaf map, with per-leaf shading."""

    def per_pixel(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float32).take(owner)

    grid = np.arange(size, dtype=np.float32) + 0.5
    radius = per_pixel(leaves.radius)
    gain = (
        1.0 + per_pixel(leaves.shade[:, 0]) * (grid[None, :, None] - per_pixel(leaves.cy)) / radius
    )
    gain += per_pixel(leaves.shade[:, 1]) * (grid[None, None, :] - per_pixel(leaves.cx)) / radius
    images = np.empty((owner.shape[0], colours.shape[1], size, size), dtype=np.float32)
    for c in range(colours.shape[1]):
        images[:, c] = per_pixel(colours[:, c]) * gain
    return images


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes (reflected borders, 3 sigma)."""
    radius = max(1, math.ceil(3.0 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (-2, -1):
        pad = [(0, 0)] * images.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(images, pad, mode="reflect")
        length = images.shape[axis]
        out = np.zeros_like(images)
        window = [slice(None)] * images.ndim
        for k, weight in enumerate(taps):
            window[axis] = slice(k, k + length)
            out += weight * padded[tuple(window)]
        images = out
    return images


def _finish(images: np.ndarray, seed: tuple[int, ...]) -> np.ndarray:
    """Optics and sensor: blur (chroma blurred more), noise, clipping, 8-bit quantisation."""
    images = _blur(images, BLUR_SIGMA)
    luma = np.tensordot(images[:, :3], LUMA_601, axes=([1], [0]))[:, None]
    # chroma = RGB minus luminance has zero luminance, so blurring it keeps luminance
    images[:, :3] = luma + _blur(images[:, :3] - luma, CHROMA_BLUR_SIGMA)
    for channel in range(images.shape[1]):  # one noise stream per channel
        rng = np.random.default_rng([*seed, 2, channel])
        noise = rng.normal(0.0, NOISE_SIGMA, size=images[:, channel].shape)
        images[:, channel] += noise.astype(np.float32)
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


# --- synthetic, labelled: oriented leaves ----------------------------------------

LABELLED_VERSION = 1
"""Bumped whenever the labelled synthetic images change (part of their key)."""
N_ORIENTATIONS = 10
"""Classes of the labelled synthetic task: leaf orientation ``k * pi / 10``."""
ASPECT_RANGE = (2.0, 3.0)
"""Leaf aspect ratios (major / minor axis), uniform in this range."""
ORIENTATION_JITTER = math.pi / 40
"""Each leaf's orientation is its class's ``k * pi / 10`` plus uniform noise within this."""
LABELLED_SIZE = 32
LABELLED_COUNTS = {"train": 5000, "test": 1000}
SPLITS = ("train", "test")
_LABELLED_STREAM = 0x1ABE1
"""Seed-stream tag of the labelled images (the unlabelled batches use ``(seed, index)``)."""
RENDER_THREADS = 8
"""At most this many threads render a labelled split."""
MAX_LABELLED_BYTES = 8 * 2**30
"""A labelled split larger than this (as uint8) is refused rather than swapped."""


def check_split(owner: str, split: str) -> str:
    """``split`` if it is ``"train"`` or ``"test"``, else a :class:`DatasetError`."""
    if split not in SPLITS:
        raise DatasetError(f"{owner}: unknown split {split!r} (use train or test)")
    return split


def positive_int(owner: str, name: str, value: Any) -> int:
    """``value`` as a positive ``int`` (not a bool), else a :class:`DatasetError`."""
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise DatasetError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return number


def check_labelled_bytes(owner: str, count: int, size: int) -> None:
    """A :class:`DatasetError` when ``count`` RGB images of ``size`` x ``size`` would
    take more than ``MAX_LABELLED_BYTES``."""
    if count * 3 * size * size > MAX_LABELLED_BYTES:
        raise DatasetError(
            f"{owner}: {count} images of {size}x{size} need more than "
            f"{MAX_LABELLED_BYTES // 2**30} GiB; ask for fewer (count) or smaller (size)"
        )


def oriented_leaves_labels(count: int) -> np.ndarray:
    """The labels of a labelled synthetic split: image ``i`` has class ``i % 10``."""
    return np.arange(count, dtype=np.int64) % N_ORIENTATIONS


def orientation_classes() -> tuple[str, ...]:
    """Class names of the labelled synthetic task: ``orient000`` ... ``orient162`` (degrees)."""
    return tuple(f"orient{180 * k // N_ORIENTATIONS:03d}" for k in range(N_ORIENTATIONS))


def render_oriented_leaves(labels: np.ndarray, size: int, seed: tuple[int, ...]) -> np.ndarray:
    """Render one dead-leaves image per label, uint8 RGB ``(len(labels), 3, size, size)``.

    The leaves of an image of class ``k`` are ellipses (aspect ratio uniform in
    ``ASPECT_RANGE``) whose major axes point at ``k * pi / N_ORIENTATIONS`` (plus a
    jitter within ``ORIENTATION_JITTER``), counterclockwise from the x axis as
    displayed. Everything else (area distribution, colours, shading, optics, noise)
    is the unlabelled generator's. Deterministic in ``(labels, size, seed)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(list(seed))
    leaves = _sample_oriented_leaves(rng, labels, size)
    owner = _leaf_map(leaves, len(labels), size)
    colours = _colour_leaves(rng, leaves, len(labels))
    return _finish(_paint(owner, leaves, colours, size), seed)


def _render_labelled(count: int, size: int, stream: tuple[int, ...]) -> np.ndarray:
    """``count`` oriented-leaves images, uint8 ``(count, 3, size, size)``, labels ``i % 10``.

    Rendered in batches of ``PIXELS_PER_BATCH`` pixels, batch ``b`` from the seed
    ``(*stream, b)``, on a few threads (numpy and torch release the GIL); the result
    does not depend on the thread count.
    """
    step = max(1, PIXELS_PER_BATCH // (size * size))
    labels = oriented_leaves_labels(count)
    starts = range(0, count, step)

    def render(index: int) -> np.ndarray:
        start = starts[index]
        return render_oriented_leaves(labels[start : start + step], size, (*stream, index))

    workers = max(1, min(len(starts), os.cpu_count() or 1, RENDER_THREADS))
    if workers == 1:
        return np.concatenate([render(index) for index in range(len(starts))])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.concatenate(list(pool.map(render, range(len(starts)))))


def _sample_oriented_leaves(rng: np.random.Generator, labels: np.ndarray, size: int) -> _Leaves:
    """Elliptic leaves whose area-equivalent radius ``r`` has ``p(r) ~ r^-3``."""
    count = len(labels)
    per_image = leaves_per_image(size)
    total = count * per_image
    radius = _leaf_radii(rng, total, size)
    stretch = np.sqrt(rng.uniform(*ASPECT_RANGE, size=total))
    major, minor = radius * stretch, radius / stretch
    cy = rng.random(total) * (size + 2 * major) - major
    cx = rng.random(total) * (size + 2 * major) - major
    image = np.repeat(np.arange(count), per_image)
    jitter = rng.uniform(-ORIENTATION_JITTER, ORIENTATION_JITTER, size=total)
    angle = labels[image] * (math.pi / N_ORIENTATIONS) + jitter
    return _with_backgrounds(rng, count, size, image, cy, cx, major, minor, angle)


# --- folder:PATH -------------------------------------------------------------------

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
MAX_SIDE_ENV = "ZOOSCAN_FOLDER_MAX_SIDE"
FOLDER_BATCH_PIXELS = 2**22
"""Pixels per batch of same-size images (about 48 MB of float32 RGB)."""


class FolderDataset:
    """Every image under a folder (see the module docstring)."""

    name = "folder"
    description = (
        "every image under PATH, recursively (png/jpg/bmp/tif/webp/gif): folder:PATH; "
        f"${MAX_SIDE_ENV} downscales larger images"
    )

    def __init__(self, argument: str | None = None) -> None:
        if not argument:
            raise DatasetError("folder: give a path, e.g. --dataset folder:/data/photos")
        root = Path(argument).expanduser()
        if not root.exists():
            raise DatasetError(f"folder: {root} does not exist")
        if not root.is_dir():
            raise DatasetError(f"folder: {root} is not a directory")
        self.root = root.resolve()
        self.max_side = _max_side_from_env()
        self.files = _list_images(self.root)
        if not self.files:
            raise DatasetError(
                f"folder: no images under {self.root} "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)"
            )
        self.key = f"folder:{self.root}#{self._fingerprint()}"

    def __repr__(self) -> str:
        return f"FolderDataset({self.key!r})"

    def _fingerprint(self, *, with_max_side: bool = True) -> str:
        digest = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            rel = path.relative_to(self.root).as_posix()
            digest.update(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        if self.max_side and with_max_side:
            digest.update(f"max_side={self.max_side}\n".encode())
        return digest.hexdigest()[:16]

    def labelled(
        self, split: str, *, size: int | None = None, count: int | None = None
    ) -> LabelledImages:
        """One split of the folder's classification task (see the module docstring).

        Class folders (ImageFolder layout, optionally under ``train/`` and ``test/``)
        give their images, shorter side resized to ``size`` (default 32) and
        centre-cropped; ``count`` takes the first images of a class-balanced subset.
        A folder with images directly in it is the photo-crop task: each photo is a
        class and ``count`` (default 400 per photo for train, 100 for test) random
        ``size`` x ``size`` crops come from disjoint regions of the photos. Raises
        :class:`DatasetError` when the folder cannot give that split.
        """
        split = check_split("folder", split)
        size = LABELLED_SIZE if size is None else positive_int("folder", "size", size)
        if count is not None:
            count = positive_int("folder", "count", count)
        stem = f"folder:{self.root}#{self._fingerprint(with_max_side=False)}"
        if any(path.parent == self.root for path in self.files):
            return _photo_crops(self.root, self.files, split, size, count, stem)
        return _class_images(_class_folders(self.root, self.files), split, size, count, stem)

    def batches(self, channels: int) -> Iterator[np.ndarray]:
        """Yield float32 ``(n, channels, H, W)`` batches of same-size images in ``[0, 1]``."""
        if channels not in (1, 3):
            raise DatasetError(
                f"folder: images give 3 (RGB) or 1 (luminance) channels, not {channels}"
            )
        for group in self._groups():
            batch = [image for image in map(self._load, group) if image is not None]
            for shape in dict.fromkeys(image.shape for image in batch):
                same = np.stack([image for image in batch if image.shape == shape])
                yield to_luminance(same) if channels == 1 else same

    def _groups(self) -> Iterator[list[Path]]:
        """Files grouped by their (final) size, in batches of at most ~4 M pixels."""
        by_size: dict[tuple[int, int], list[Path]] = {}
        for path in self.files:
            size = self._final_size(path)
            if size is not None:
                by_size.setdefault(size, []).append(path)
        for (width, height), paths in by_size.items():
            step = max(1, FOLDER_BATCH_PIXELS // (width * height))
            for start in range(0, len(paths), step):
                yield paths[start : start + step]

    def _final_size(self, path: Path) -> tuple[int, int] | None:
        try:
            with Image.open(path) as img:
                width, height = img.size
                if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation: rotated
                    width, height = height, width
        except Exception as exc:  # any decoder error: skip the file, keep going
            log.warning("folder: skipping unreadable image %s: %s", path, exc)
            return None
        return _fit(width, height, self.max_side)

    def _load(self, path: Path) -> np.ndarray | None:
        try:
            with Image.open(path) as img:
                rgb = _rgb_array(ImageOps.exif_transpose(img))
        except Exception as exc:  # truncated or corrupt data shows up only when decoding
            log.warning("folder: skipping unreadable image %s: %s", path, exc)
            return None
        height, width = rgb.shape[1:]
        target = _fit(width, height, self.max_side)
        if target != (width, height):
            resized = F.interpolate(
                torch.from_numpy(rgb)[None],
                size=(target[1], target[0]),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            rgb = resized[0].clamp(0.0, 1.0).numpy()
        return rgb


# --- folder:PATH, labelled ---------------------------------------------------------

FOLDER_LABELLED_VERSION = 1
"""Bumped whenever the labelled folder images change for the same files (part of the key)."""
HOLDOUT_EVERY = 5
"""Without ``train/`` and ``test/``, every 5th image of a class (by path) is a test image."""
PHOTO_SCALE = 4
"""Photo-crop: photos are downscaled so their shorter side is ``PHOTO_SCALE * size``."""
PHOTO_TRAIN_FRACTION = 0.75
"""Photo-crop: train crops lie in this leading fraction of the longer side, test crops after it."""
PHOTO_CROPS = {"train": 400, "test": 100}
"""Photo-crop: default crops per photo."""
_PHOTO_STREAM = 0xC409
"""Seed-stream tag of the photo-crop positions."""


@dataclass(frozen=True)
class _ClassFolders:
    """An ImageFolder tree: class names and, per split, its files with their labels."""

    layout: str
    """``train-test`` (``train/<class>/``, ``test/<class>/``) or ``holdout`` (``<class>/``)."""
    classes: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]
    """Per split, ``(path, label)`` ordered by label, then relative path."""


def balanced_subset(labels: np.ndarray, count: int, owner: str) -> np.ndarray:
    """Indices (increasing) of ``count`` images forming a class-balanced subset.

    Images are dealt class by class, round robin: the first image of every class
    (lowest label first), then the second of every class, and so on, skipping
    classes that ran out; the first ``count`` dealt are kept, in their original order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if count > len(labels):
        raise DatasetError(f"{owner}: {count} images asked for, but the split has {len(labels)}")
    by_class = np.argsort(labels, kind="stable")
    ordered = labels[by_class]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - np.searchsorted(ordered, ordered, side="left")
    dealt = np.lexsort((labels, rank))
    return np.sort(dealt[:count])


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize float32 ``(n, 3, H, W)`` in ``[0, 1]`` so the shorter side is ``size``
    (bilinear, antialiased), centre-crop to ``size`` x ``size``; uint8 pixels."""
    height, width = rgb.shape[-2:]
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    tensor = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))
    if target != (height, width):
        tensor = F.interpolate(
            tensor, size=target, mode="bilinear", antialias=True, align_corners=False
        )
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    return _to_uint8(tensor[..., top : top + size, left : left + size])


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


def _read_rgb(path: Path) -> np.ndarray:
    """Float32 ``(3, H, W)`` RGB of an image file (EXIF orientation applied)."""
    try:
        with Image.open(path) as img:
            return _rgb_array(ImageOps.exif_transpose(img))
    except Exception as exc:  # any decoder error: a labelled split must be complete
        raise DatasetError(f"folder: cannot read {path} ({exc}); fix or remove it") from exc


def _class_folders(root: Path, files: list[Path]) -> _ClassFolders:
    """Class names and per-split files of an ImageFolder tree under ``root``."""
    relative = [path.relative_to(root).parts for path in files]
    if {"train", "test"} <= {parts[0] for parts in relative}:
        layout = "train-test"
        by_split = {split: _by_class(files, relative, split) for split in SPLITS}
        classes = tuple(sorted(by_split["train"]))
        stray = sorted(set(by_split["test"]) - set(classes))
        if stray:
            raise DatasetError(
                f"folder: {root / 'test'} has classes with no train folder: {', '.join(stray)}"
            )
    else:
        layout = "holdout"
        by_class = _by_class(files, relative, None)
        classes = tuple(sorted(by_class))
        by_split = {
            split: {
                name: [
                    path
                    for index, path in enumerate(paths)
                    if (index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == (split == "test")
                ]
                for name, paths in by_class.items()
            }
            for split in SPLITS
        }
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DatasetError(f"folder: {root} needs at least 2 class folders, found {found}")
    return _ClassFolders(
        layout,
        classes,
        {
            split: [
                (path, label)
                for label, name in enumerate(classes)
                for path in by_split[split].get(name, [])
            ]
            for split in SPLITS
        },
    )


def _by_class(
    files: list[Path], relative: list[tuple[str, ...]], split: str | None
) -> dict[str, list[Path]]:
    """Files grouped by class folder (``<class>/...`` or ``<split>/<class>/...``), in order.

    Images outside class folders (and, with ``split``, outside ``<split>/``) are ignored.
    """
    prefix = () if split is None else (split,)
    depth = len(prefix)
    grouped: dict[str, list[Path]] = {}
    for path, parts in zip(files, relative, strict=True):
        if parts[:depth] == prefix and len(parts) > depth + 1:
            grouped.setdefault(parts[depth], []).append(path)
    return grouped


def _class_images(
    folders: _ClassFolders, split: str, size: int, count: int | None, stem: str
) -> LabelledImages:
    """The ImageFolder task's ``split``: every image, or a balanced subset of ``count``."""
    entries = folders.files[split]
    if not entries:
        rule = (
            f"every {HOLDOUT_EVERY}th image of a class is a test image"
            if folders.layout == "holdout"
            else f"{split}/<class>/ holds none"
        )
        raise DatasetError(f"folder: no {split} images ({rule})")
    labels = np.array([label for _, label in entries], dtype=np.int64)
    chosen = np.arange(len(entries)) if count is None else balanced_subset(labels, count, "folder")
    check_labelled_bytes("folder", len(chosen), size)
    images = np.empty((len(chosen), 3, size, size), dtype=np.uint8)
    for slot, index in enumerate(chosen):
        images[slot] = resize_square(_read_rgb(entries[index][0])[None], size)[0]
    tag = f"{folders.layout}:{split},size={size},count={len(chosen)},v={FOLDER_LABELLED_VERSION}"
    return LabelledImages(images, labels[chosen], folders.classes, f"{stem}:{tag}")


def _photo_crops(
    root: Path, files: list[Path], split: str, size: int, count: int | None, stem: str
) -> LabelledImages:
    """The photo-crop task's ``split``: crop ``i`` shows photo ``i % len(files)``."""
    classes = tuple(path.relative_to(root).as_posix() for path in files)
    if len(classes) < 2:
        raise DatasetError(
            f"folder: {root} holds one photo; the photo-crop task (each photo a class) needs 2"
        )
    total = PHOTO_CROPS[split] * len(classes) if count is None else count
    check_labelled_bytes("folder", total, size)
    labels = np.arange(total, dtype=np.int64) % len(classes)
    images = np.empty((total, 3, size, size), dtype=np.uint8)
    for label, (path, name) in enumerate(zip(files, classes, strict=True)):
        slots = slice(label, total, len(classes))
        wanted = len(range(total)[slots])
        if wanted:
            photo = _photo_for_crops(path, name, size)
            rng = np.random.default_rng([_PHOTO_STREAM, SPLITS.index(split), label])
            images[slots] = _crops(
                photo, _crop_origins(rng, photo.shape[1:], size, split, wanted), size
            )
    tag = f"photo-crop:{split},size={size},count={total},v={FOLDER_LABELLED_VERSION}"
    return LabelledImages(images, labels, classes, f"{stem}:{tag}")


def _photo_for_crops(path: Path, name: str, size: int) -> np.ndarray:
    """The photo as uint8 ``(3, H, W)``, downscaled so its shorter side is at most
    ``PHOTO_SCALE * size``; a :class:`DatasetError` if it cannot give ``size`` crops
    in both regions."""
    rgb = _read_rgb(path)
    height, width = rgb.shape[1:]
    short, long = min(height, width), max(height, width)
    cut = int(long * PHOTO_TRAIN_FRACTION)
    largest = max(short // PHOTO_SCALE, min(short, cut, long - cut))
    if size > largest:
        raise DatasetError(
            f"folder: size {size} is too large for photo {name} ({width}x{height}); "
            f"at most {largest}"
        )
    scale = PHOTO_SCALE * size / short
    tensor = torch.from_numpy(rgb)[None]
    if scale < 1.0:
        target = (round(height * scale), round(width * scale))
        tensor = F.interpolate(
            tensor, size=target, mode="bilinear", antialias=True, align_corners=False
        )
    return _to_uint8(tensor[0])


def _crop_origins(
    rng: np.random.Generator, shape: tuple[int, int], size: int, split: str, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of ``count`` crops inside the ``split`` region of a photo.

    The longer side is cut at ``PHOTO_TRAIN_FRACTION``: train crops lie before the
    cut, test crops after it, so the two never share a pixel.
    """
    long_axis = 1 if shape[1] >= shape[0] else 0
    length, across = shape[long_axis], shape[1 - long_axis]
    cut = int(length * PHOTO_TRAIN_FRACTION)
    low, high = (0, cut - size) if split == "train" else (cut, length - size)
    along = rng.integers(low, high, size=count, endpoint=True)
    other = rng.integers(0, across - size, size=count, endpoint=True)
    return (other, along) if long_axis == 1 else (along, other)


def _crops(photo: np.ndarray, origins: tuple[np.ndarray, np.ndarray], size: int) -> np.ndarray:
    """``(n, 3, size, size)`` crops of ``photo`` ``(3, H, W)`` at ``origins`` (tops, lefts)."""
    windows = np.lib.stride_tricks.sliding_window_view(photo, (size, size), axis=(1, 2))
    tops, lefts = origins
    return np.ascontiguousarray(windows[:, tops, lefts].transpose(1, 0, 2, 3))


def _max_side_from_env() -> int | None:
    raw = os.environ.get(MAX_SIDE_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise DatasetError(f"{MAX_SIDE_ENV} must be an integer, got {raw!r}") from None
    if value < 1:
        raise DatasetError(f"{MAX_SIDE_ENV} must be positive, got {value}")
    return value


def _list_images(root: Path) -> list[Path]:
    found = [
        path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _fit(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Size after downscaling so the longest side is at most ``max_side``."""
    longest = max(width, height)
    if not max_side or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _rgb_array(img: Image.Image) -> np.ndarray:
    """Float32 ``(3, H, W)`` RGB in ``[0, 1]`` from any PIL image mode."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(img, dtype=np.float64) / 65535.0
        return np.repeat(np.clip(gray, 0.0, 1.0)[None], 3, 0).astype(np.float32)
    if img.mode == "F":
        gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[None], 3, 0)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))
