"""Figures: energy profiles, filter banks, correlation heatmaps and patch components.

Every function renders with matplotlib's Agg canvas on its own :class:`Figure` (no
pyplot state, safe in threads and headless), writes one file and returns its path.
The format follows the suffix (``.png`` by default; ``.pdf`` and ``.svg`` work too);
missing parent folders are created.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from zooscan.energy import FormulaFit, finite_float64
from zooscan.errors import UserError
from zooscan.records import PatchBasis

__all__ = ["plot_components", "plot_filters", "plot_heatmap", "plot_model", "plot_profile"]

_DPI = 100
_MAX_LEGEND_ENTRIES = 12
_MAX_TICK_LABELS = 60
_CELL_X, _CELL_Y, _LABEL_BAND = 1.15, 1.45, 0.4
"""Layout of :func:`plot_components`, in data units of a unit-sized tile."""


def plot_profile(
    path: str | Path,
    profiles: Mapping[str, Any],
    *,
    lambdas: Any | None = None,
    fit: FormulaFit | None = None,
    title: str = "",
) -> Path:
    """Energy profiles against the component index, on a linear axis as in the paper.

    Each curve is shown divided by its maximum (a no-op for stored profiles).
    ``lambdas`` adds the patch spectrum ``lambda / lambda_max`` (grey, dotted) and
    ``fit`` the fitted formula (black, dashed, with ``s`` and ``r`` in the legend). The
    legend is drawn for up to 12 curves. Raises :class:`UserError` when there is
    nothing to plot or the lengths differ.
    """
    curves = _profile_curves(profiles, lambdas, fit)
    fig, ax = _figure((7.5, 4.2))
    _draw_profiles(ax, curves, lambdas, fit)
    ax.set_title(title or _count_title(len(curves), "profile"))
    return _save(fig, path)


def plot_filters(
    path: str | Path, weight_pixel: Any, *, title: str = "", max_filters: int = 64
) -> Path:
    """The filters as a grid of small images (the first ``max_filters``).

    Each filter is min-max scaled on its own (all channels together, so colour is
    kept; a constant filter is mid-grey). ``C = 1`` is drawn in grayscale, ``C >= 3``
    from its first three channels as RGB, ``C = 2`` as red and green.
    """
    mosaic, caption = _filter_mosaic(weight_pixel, max_filters)
    fig, ax = _figure(_mosaic_size(mosaic))
    _draw_mosaic(ax, mosaic)
    ax.set_title(f"{title}\n{caption}" if title else caption, fontsize=9)
    return _save(fig, path)


def plot_model(
    path: str | Path,
    weight_pixel: Any,
    profile: Any | None = None,
    *,
    basis: PatchBasis | None = None,
    fit: FormulaFit | None = None,
    title: str = "",
    max_filters: int = 64,
) -> Path:
    """One model on one figure: its filter grid beside its energy profile.

    The left panel is :func:`plot_filters`' grid; the right one :func:`plot_profile`'s
    curve with the basis' patch spectrum (when ``basis`` is given) and the fitted
    formula (when ``fit`` is). Without a ``profile`` only the filters are drawn.
    """
    if profile is None:
        return plot_filters(path, weight_pixel, title=title, max_filters=max_filters)
    mosaic, caption = _filter_mosaic(weight_pixel, max_filters)
    lambdas = None if basis is None else basis.lambdas
    curves = _profile_curves({"energy profile": profile}, lambdas, fit)
    fig = Figure(figsize=(11.5, 4.4), dpi=_DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=(1.0, 1.9))
    filters_ax, profile_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    _draw_mosaic(filters_ax, mosaic)
    filters_ax.set_title(caption, fontsize=9)
    _draw_profiles(profile_ax, curves, lambdas, fit)
    profile_ax.set_title(
        "energy profile" + (f" on {basis.id}" if basis is not None else ""), fontsize=9
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_heatmap(path: str | Path, corr: pd.DataFrame, *, title: str = "") -> Path:
    """A Pearson-correlation heatmap on a diverging colormap fixed to ``[-1, 1]``.

    Undefined entries (NaN) are light grey. Row and column labels are shown for up to
    60 models, in a font that shrinks as the matrix grows; above that they are hidden
    (the figure would be unreadable) and the axes give the count instead.
    """
    if not isinstance(corr, pd.DataFrame) or corr.empty:
        raise UserError("no correlations to plot (an empty table)")
    values = np.ma.masked_invalid(corr.to_numpy(dtype=np.float64))
    rows, cols = values.shape
    largest = max(rows, cols)
    side = float(np.clip(3.0 + 0.15 * largest, 5.0, 12.0)) if largest <= _MAX_TICK_LABELS else 9.0
    fig, ax = _figure((side + 1.2, side))
    cmap: Colormap = _colormap("RdBu_r").with_extremes(bad="0.85")
    image = ax.imshow(values, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="Pearson r")
    _label_axis(ax, corr.index, rows, axis="y")
    _label_axis(ax, corr.columns, cols, axis="x")
    ax.set_title(title or f"energy-profile correlations ({rows} models)")
    return _save(fig, path)


def plot_components(path: str | Path, basis: PatchBasis, *, n: int = 27) -> Path:
    """The first ``n`` principal components of the patches, as image patches.

    Each component is scaled symmetrically so mid-grey is 0 (the sign of each pixel
    stays visible); titles give the index and ``lambda_i / lambda_0``. RGB bases are
    drawn in colour, ``C = 1`` in grayscale, others from their first three channels.
    """
    if n < 1:
        raise UserError(f"n must be >= 1, got {n}")
    count = min(n, basis.dim)
    shape = (basis.channels, basis.kh, basis.kw)
    lambdas = basis.lambdas
    top = lambdas[0] if lambdas[0] > 0 else 1.0
    columns = min(count, max(9, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / columns)
    width = basis.kw / max(basis.kh, basis.kw)  # tiles fit a unit cell, aspect kept
    height = basis.kh / max(basis.kh, basis.kw)
    fig, ax = _figure((0.9 * columns + 0.4, 1.15 * rows + 0.5))
    for i in range(count):
        row, column = divmod(i, columns)
        left, top_edge = column * _CELL_X, row * _CELL_Y
        image = _component_rgb(basis.components[:, i].reshape(shape))
        extent = (left, left + width, top_edge + _LABEL_BAND + height, top_edge + _LABEL_BAND)
        ax.imshow(image, interpolation="nearest", extent=extent)
        ax.text(
            left + width / 2,
            top_edge + _LABEL_BAND * 0.8,
            f"{i}: {lambdas[i] / top:.2g}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xlim(-0.1, columns * _CELL_X)
    ax.set_ylim(rows * _CELL_Y, -0.05)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(
        f"patch components {basis.channels}x{basis.kh}x{basis.kw} ({basis.dataset}), index: λ/λ0",
        fontsize=9,
    )
    return _save(fig, path)


# --------------------------------------------------------------------------- helpers


def _profile_curves(
    profiles: Mapping[str, Any], lambdas: Any | None, fit: FormulaFit | None
) -> dict[str, np.ndarray]:
    if not profiles:
        raise UserError("no energy profile to plot")
    curves = {name: _as_vector(values, f"profile {name!r}") for name, values in profiles.items()}
    _check_lengths(curves, lambdas, fit)
    return curves


def _draw_profiles(
    ax: Any, curves: Mapping[str, np.ndarray], lambdas: Any | None, fit: FormulaFit | None
) -> None:
    size = next(iter(curves.values())).size
    x = np.arange(size)
    marker = "o" if size <= 32 else None
    for name, values in curves.items():
        ax.plot(x, _unit_max(values), marker=marker, markersize=3, linewidth=1.4, label=name)
    if lambdas is not None:
        spectrum = _unit_max(_as_vector(lambdas, "lambdas"))
        ax.plot(x, spectrum, ":", color="0.45", linewidth=1.4, label="patch spectrum λ/λmax")
    if fit is not None:
        label = f"formula (s={fit.s:.3g}, r={fit.r:.3f})"
        ax.plot(x, fit.predicted, "--", color="black", linewidth=1.6, label=label)
    ax.set_xlabel("principal component index")
    ax.set_ylabel("energy / max")
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    if len(curves) + (lambdas is not None) + (fit is not None) <= _MAX_LEGEND_ENTRIES:
        ax.legend(fontsize=8, loc="best")


def _filter_mosaic(weight_pixel: Any, max_filters: int) -> tuple[np.ndarray, str]:
    """The first ``max_filters`` filters as one RGB mosaic, and a caption for it."""
    weight = finite_float64(weight_pixel, "the filter weight", error=UserError)
    if weight.ndim != 4 or weight.shape[0] == 0:
        raise UserError(f"filters must be (out, C, kh, kw), got shape {weight.shape}")
    if max_filters < 1:
        raise UserError(f"max_filters must be >= 1, got {max_filters}")
    shown = weight[:max_filters]
    total, c, kh, kw = weight.shape
    count = f"{len(shown)} of {total}" if len(shown) < total else f"{total}"
    return _mosaic([_filter_rgb(f) for f in shown], border=1.0), f"{count} filters, {c}x{kh}x{kw}"


def _draw_mosaic(ax: Any, mosaic: np.ndarray) -> None:
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()


def _figure(size: tuple[float, float]) -> tuple[Figure, Any]:
    fig = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        fig.savefig(target, dpi=_DPI)
    except ValueError as exc:  # an unknown suffix
        raise UserError(f"cannot write plot {target}: {exc}") from None
    return target


def _colormap(name: str) -> Colormap:
    from matplotlib import colormaps

    return colormaps[name]


def _as_vector(values: Any, what: str) -> np.ndarray:
    array = finite_float64(values, f"the {what}", error=UserError)
    if array.ndim != 1 or array.size == 0:
        raise UserError(f"the {what} must be a non-empty 1-D vector, got shape {array.shape}")
    return array


def _check_lengths(
    curves: Mapping[str, np.ndarray], lambdas: Any | None, fit: FormulaFit | None
) -> None:
    lengths = {name: v.size for name, v in curves.items()}
    if lambdas is not None:
        lengths["lambdas"] = np.size(lambdas)
    if fit is not None:
        lengths["fit"] = fit.predicted.size
    if len(set(lengths.values())) > 1:
        raise UserError(f"cannot plot curves of different lengths together: {lengths}")


def _unit_max(values: np.ndarray) -> np.ndarray:
    peak = np.max(np.abs(values))
    return values / peak if peak > 0 else values


def _count_title(count: int, noun: str) -> str:
    return f"energy {noun}" if count == 1 else f"energy {noun}s ({count})"


def _filter_rgb(weight: np.ndarray) -> np.ndarray:
    """One ``(C, kh, kw)`` filter as an ``(kh, kw, 3)`` image in ``[0, 1]`` (min-max)."""
    low, high = weight.min(), weight.max()
    scaled = (weight - low) / (high - low) if high > low else np.full_like(weight, 0.5)
    return _channels_to_rgb(scaled)


def _component_rgb(component: np.ndarray) -> np.ndarray:
    """A component as an image with 0 at mid-grey, scaled by its largest magnitude."""
    peak = np.max(np.abs(component))
    scaled = 0.5 + 0.5 * component / peak if peak > 0 else np.full_like(component, 0.5)
    return _channels_to_rgb(scaled)


def _channels_to_rgb(scaled: np.ndarray) -> np.ndarray:
    channels = scaled.shape[0]
    if channels == 1:
        picked = np.repeat(scaled, 3, axis=0)
    elif channels == 2:
        picked = np.concatenate([scaled, np.zeros_like(scaled[:1])], axis=0)
    else:
        picked = scaled[:3]
    return np.transpose(picked, (1, 2, 0))


def _mosaic(tiles: list[np.ndarray], border: float) -> np.ndarray:
    """Tiles of equal shape ``(h, w, 3)`` in a near-square grid, 1-pixel borders."""
    count = len(tiles)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    h, w, _ = tiles[0].shape
    mosaic = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), border)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        mosaic[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = tile
    return mosaic


def _mosaic_size(mosaic: np.ndarray) -> tuple[float, float]:
    """Figure size for a mosaic: ~0.12 inch per pixel, the long side within 3-9 inches."""
    height, width = mosaic.shape[:2]
    longest = max(height, width)
    inches = float(np.clip(0.12 * longest, 3.0, 9.0))
    return inches * width / longest, inches * height / longest + 0.6


def _label_axis(ax: Any, labels: pd.Index, count: int, *, axis: str) -> None:
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    set_label = ax.set_xlabel if axis == "x" else ax.set_ylabel
    if count > _MAX_TICK_LABELS:
        set_ticks([])
        set_label(f"{count} models")
        return
    fontsize = float(np.clip(360.0 / max(count, 1), 4.0, 9.0))
    set_ticks(np.arange(count))
    texts = [str(label) for label in labels]
    if axis == "x":
        ax.set_xticklabels(texts, rotation=90, fontsize=fontsize)
    else:
        ax.set_yticklabels(texts, fontsize=fontsize)
