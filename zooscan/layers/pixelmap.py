"""Derive an :class:`~zooscan.layers.InputMap` from probe outputs.

Given what the first layer receives for each probe image, find for every value it
reads the image pixel it comes from and the per-channel affine applied to it, or, for
an input resampled first, at least which image channel each consumed channel reads.
"""

from __future__ import annotations

import numpy as np
import torch

from zooscan.layers.parts import InputMap, Pair


class MapError(Exception):
    """The probe could not map the consumed tensor onto image pixels."""


def _features_view(t: np.ndarray, kind: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(features, positions)`` view of the consumed tensor and its position grid shape."""
    if kind == "conv":
        if t.ndim != 4 or t.shape[0] != 1:
            raise MapError(f"unexpected shape {t.shape} of the convolution input")
        return t[0].reshape(t.shape[1], -1), t.shape[2:]
    flat = t.reshape(-1, t.shape[-1]).T
    grid = tuple(s for s in t.shape[:-1] if s != 1)
    return flat, grid


def derive_input_map(
    outs: dict[str, np.ndarray], images: dict[str, torch.Tensor], kind: str
) -> tuple[InputMap, np.ndarray, np.ndarray]:
    """Map the probed tensor onto the image; returns the map and per-channel scale/offset."""
    shapes = {v.shape for v in outs.values()}
    if len(shapes) != 1:
        raise MapError("the consumed tensor's shape depends on the pixel values")
    tz, to = outs["zeros"], outs["ones"]
    a = to - tz
    tol = 1e-6 * max(1.0, float(np.abs(a).max(initial=0.0)))
    valid = np.abs(a) > tol
    try:
        return _gather_map(outs, images, kind, a, valid)
    except MapError as gather_error:
        if kind != "conv":
            raise
        try:
            return _resampled_map(outs, images, a, valid)
        except MapError:
            raise gather_error from None


def _gather_map(
    outs: dict[str, np.ndarray],
    images: dict[str, torch.Tensor],
    kind: str,
    a: np.ndarray,
    valid: np.ndarray,
) -> tuple[InputMap, np.ndarray, np.ndarray]:
    """The map when every consumed value is one image pixel under a per-channel affine."""
    _, c_img, h_img, w_img = images["index"].shape
    idx = _pixel_indices(outs, images, a, valid)
    feat_idx, grid_shape = _features_view(idx, kind)
    feat_valid = feat_idx >= 0
    chan = np.where(feat_valid, feat_idx // (h_img * w_img), -1)
    hh = np.where(feat_valid, (feat_idx // w_img) % h_img, 0)
    ww = np.where(feat_valid, feat_idx % w_img, 0)
    channels = _feature_channels(chan, feat_valid)
    ref = np.flatnonzero(feat_valid.all(axis=0))
    if ref.size == 0:
        raise MapError("no position of the consumed tensor reads only image pixels")
    dy = hh[:, ref[0]] - hh[:, ref[0]].min()
    dx = ww[:, ref[0]] - ww[:, ref[0]].min()
    footprint = (int(dy.max()) + 1, int(dx.max()) + 1)
    oh = _position_origins(hh, dy, feat_valid)
    ow = _position_origins(ww, dx, feat_valid)
    grid, origin, oh, ow = _fit_grid(oh, ow, grid_shape, footprint)
    _check_padding(oh, ow, dy, dx, feat_valid, (h_img, w_img))
    features = tuple((int(c), int(y), int(x)) for c, y, x in zip(channels, dy, dx, strict=True))
    scale, offset = _channel_affine(a, outs["zeros"], kind, chan, c_img)
    size = (int(grid_shape[0]), int(grid_shape[1])) if kind == "conv" else None
    imap = InputMap(features=features, footprint=footprint, grid=grid, origin=origin, size=size)
    return imap, scale, offset


def _pixel_indices(
    outs: dict[str, np.ndarray], images: dict[str, torch.Tensor], a: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """For each consumed value, the flat index of the image pixel it reads (-1: constant).

    The pixel-index probe names the pixel; the random probe then checks that the value
    really is ``offset + scale * pixel`` (a value mixing several pixels can mimic an
    index, it cannot mimic random content).
    """
    tz = outs["zeros"]
    n = int(np.prod(images["index"].shape))
    ratio = (outs["index"] - tz) / np.where(valid, a, 1.0)
    if not np.all(np.isfinite(ratio)) or not np.all(np.isfinite(outs["random"])):
        raise MapError("the consumed values are not finite functions of the image")
    idx = np.rint(ratio).astype(np.int64) - 1
    if np.any(valid & ((np.abs(ratio - np.rint(ratio)) > 0.1) | (idx < 0) | (idx >= n))):
        raise MapError("the consumed values are not single image pixels (mixing or resampling)")
    rand = images["random"].to(torch.float64).numpy().reshape(-1)
    expected = tz + a * rand[np.where(valid, idx, 0)]
    random_ok = np.abs(outs["random"] - expected) <= 1e-4 * (np.abs(tz) + np.abs(a) + 1.0)
    probes = ("index", "random", "channel")
    const_ok = np.all([np.abs(outs[k] - tz) <= 1e-6 * (np.abs(tz) + 1.0) for k in probes], axis=0)
    if not np.all(np.where(valid, random_ok, const_ok)):
        raise MapError("the consumed values are not a per-pixel affine function of the image")
    return np.where(valid, idx, -1)


def _feature_channels(chan: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The one image channel each consumed channel/feature reads."""
    lo = np.where(valid, chan, np.iinfo(np.int64).max).min(axis=1)
    hi = np.where(valid, chan, -1).max(axis=1)
    if np.any(hi < 0) or np.any(lo != hi):
        raise MapError("a consumed channel reads different image channels at different positions")
    return hi


def _position_origins(coord: np.ndarray, offset: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per position, the image coordinate of its offset-0 pixel (NaN if it reads none)."""
    base = np.where(valid, coord - offset[:, None], 0).astype(np.float64)
    lo = np.where(valid, base, np.inf).min(axis=0)
    hi = np.where(valid, base, -np.inf).max(axis=0)
    known = np.isfinite(lo)
    if np.any(lo[known] != hi[known]):
        raise MapError("the consumed positions do not all read the same pixel pattern")
    return np.where(known, lo, np.nan)


def _fit_grid(
    oh: np.ndarray, ow: np.ndarray, grid_shape: tuple[int, ...], footprint: Pair
) -> tuple[Pair, Pair, np.ndarray, np.ndarray]:
    """Fit ``origin + (Y, X) * grid`` to the position origins; fill unknown positions."""
    if len(grid_shape) == 2:
        rows, cols = np.meshgrid(np.arange(grid_shape[0]), np.arange(grid_shape[1]), indexing="ij")
        rows, cols = rows.ravel(), cols.ravel()
    else:
        known = np.isfinite(oh)
        if not known.all():
            raise MapError("some tokens read no image pixel")
        uh, uw = np.unique(oh), np.unique(ow)
        if (
            uh.size * uw.size != oh.size
            or len({(y, x) for y, x in zip(oh, ow, strict=True)}) != oh.size
        ):
            raise MapError("the tokens do not tile the image on a regular grid")
        rows, cols = np.searchsorted(uh, oh), np.searchsorted(uw, ow)
    gh, o_h = _fit_axis(oh, rows, footprint[0])
    gw, o_w = _fit_axis(ow, cols, footprint[1])
    return (gh, gw), (o_h, o_w), o_h + rows * gh, o_w + cols * gw


def _fit_axis(origin: np.ndarray, along: np.ndarray, default: int) -> Pair:
    """``(step, start)`` with ``origin = start + along * step`` at every known position."""
    known = np.isfinite(origin)
    o, a = origin[known], along[known]
    if a.size == 0:
        raise MapError("no position reads the image")
    if np.unique(a).size < 2:
        step = default
    else:
        i, j = np.argmin(a), np.argmax(a)
        step_f = (o[j] - o[i]) / (a[j] - a[i])
        if step_f != round(step_f) or step_f <= 0:
            raise MapError("the consumed positions are not on a regular grid")
        step = int(step_f)
    start = o - a * step
    if np.any(start != start[0]):
        raise MapError("the consumed positions are not on a regular grid")
    return step, int(start[0])


def _check_padding(
    oh: np.ndarray, ow: np.ndarray, dy: np.ndarray, dx: np.ndarray, valid: np.ndarray, size: Pair
) -> None:
    """Values that read no pixel must sit outside the image (padding)."""
    ys = oh[None, :] + dy[:, None]
    xs = ow[None, :] + dx[:, None]
    inside = (ys >= 0) & (ys < size[0]) & (xs >= 0) & (xs < size[1])
    if np.any(inside & ~valid) or np.any(~inside & valid):
        raise MapError("some consumed values inside the image do not read their pixel")


def _channel_affine(
    a: np.ndarray, b: np.ndarray, kind: str, chan: np.ndarray, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per image channel, the scale and offset of the values reading it (one affine map)."""
    fa, _ = _features_view(a, kind)
    fb, _ = _features_view(b, kind)
    scale, offset = np.ones(channels), np.zeros(channels)
    for c in range(channels):
        sel = chan == c
        if not sel.any():
            continue
        va, vb = fa[sel], fb[sel]
        if not (np.allclose(va, va[0], rtol=1e-5, atol=1e-7) and np.allclose(vb, vb[0], atol=1e-5)):
            raise MapError(f"the input transform of image channel {c} is not one affine map")
        scale[c], offset[c] = va[0], vb[0]
    return scale, offset


def _mode(values: np.ndarray) -> float:
    """The most frequent value (to 6 decimals), averaged at full precision."""
    rounded = np.round(values, 6)
    uniq, counts = np.unique(rounded, return_counts=True)
    return float(values[rounded == uniq[np.argmax(counts)]].mean())


def _resampled_map(
    outs: dict[str, np.ndarray], images: dict[str, torch.Tensor], a: np.ndarray, valid: np.ndarray
) -> tuple[InputMap, np.ndarray, np.ndarray]:
    """Channel-level map of a convolution input that was resampled (e.g. resized) first."""
    channels = images["index"].shape[1]
    tz = outs["zeros"]
    if tz.ndim != 4 or tz.shape[:2] != (1, channels):
        raise MapError("the resampled input does not keep the image channels")
    ratio = (outs["channel"] - tz) / np.where(valid, a, 1.0)
    scale, offset = np.ones(channels), np.zeros(channels)
    features = []
    for f in range(channels):
        sel = valid[0, f]
        if not sel.any():
            raise MapError("a channel of the resampled input reads no image value")
        c = int(round(_mode(ratio[0, f][sel]))) - 1
        if not 0 <= c < channels:
            raise MapError("the resampled input mixes image channels")
        features.append((c, 0, 0))
        scale[c], offset[c] = _mode(a[0, f][sel]), _mode(tz[0, f][sel])
    if sorted(c for c, _, _ in features) != list(range(channels)):
        raise MapError("the resampled input does not read each image channel once")
    return InputMap(features=tuple(features), exact=False), scale, offset
