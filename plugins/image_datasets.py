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
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import os
from collections.abc import Callable, Iterator
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
        self._cache: dict[int, list[np.ndarray]] = {}

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
    shade: np.ndarray
    """(n, 2) shading gradient (per unit of radius) along y and x."""


def _sample_leaves(rng: np.random.Generator, count: int, size: int) -> _Leaves:
    per_image = leaves_per_image(size)
    total = count * per_image
    low, high = RADIUS_MIN**-2, float(size) ** -2
    radius = (low - rng.random(total) * (low - high)) ** -0.5  # p(r) ~ r^-3
    cy = rng.random(total) * (size + 2 * radius) - radius
    cx = rng.random(total) * (size + 2 * radius) - radius
    image = np.repeat(np.arange(count), per_image)
    half = size / 2.0
    background = np.full(count, float(size))
    return _Leaves(
        image=np.concatenate([image, np.arange(count)]),
        cy=np.concatenate([cy, np.full(count, half)]),
        cx=np.concatenate([cx, np.full(count, half)]),
        radius=np.concatenate([radius, background]),
        shade=rng.normal(0.0, 0.12, size=(total + count, 2)),
    )


def _leaf_map(leaves: _Leaves, count: int, size: int) -> np.ndarray:
    """Index of the visible (top-most) leaf at every pixel, ``(count, size, size)``."""
    n_front = len(leaves.radius) - count
    owner = torch.full((count * size * size,), -1, dtype=torch.int64)
    r = leaves.radius[:n_front]
    cy, cx = leaves.cy[:n_front], leaves.cx[:n_front]
    y0 = np.floor(cy - r).astype(np.int64)
    x0 = np.floor(cx - r).astype(np.int64)
    span = np.maximum(
        np.floor(cy + r).astype(np.int64) - y0, np.floor(cx + r).astype(np.int64) - x0
    )
    span += 1
    leaf_ids = np.arange(n_front)
    for width in np.unique(span):
        sel = np.nonzero(span == width)[0]
        offsets = np.arange(width)
        iy = y0[sel, None] + offsets
        ix = x0[sel, None] + offsets
        inside = ((iy + 0.5 - cy[sel, None]) ** 2)[:, :, None] + ((ix + 0.5 - cx[sel, None]) ** 2)[
            :, None, :
        ] <= (r[sel, None, None] ** 2)
        inside &= ((iy >= 0) & (iy < size))[:, :, None] & ((ix >= 0) & (ix < size))[:, None, :]
        k, a, b = np.nonzero(inside)
        pixel = leaves.image[sel][k] * (size * size) + iy[k, a] * size + ix[k, b]
        owner.scatter_reduce_(
            0, torch.from_numpy(pixel), torch.from_numpy(leaf_ids[sel][k]), reduce="amax"
        )
    result = owner.numpy().reshape(count, size, size)
    uncovered = np.nonzero(result < 0)
    result[uncovered] = n_front + uncovered[0]
    return result


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
        for k, weight in enumerate(taps):
            out += weight * np.take(padded, np.arange(k, k + length), axis=axis)
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

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            rel = path.relative_to(self.root).as_posix()
            digest.update(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        if self.max_side:
            digest.update(f"max_side={self.max_side}\n".encode())
        return digest.hexdigest()[:16]

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
