"""Plots: real PNG files written by matplotlib, read back with PIL (zooscan.plots)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from zooscan.energy import correlation_matrix, energy_profile, fit_formula, formula_profile
from zooscan.errors import UserError
from zooscan.plots import (
    _label_axis,
    plot_components,
    plot_filters,
    plot_heatmap,
    plot_model,
    plot_profile,
)
from zooscan.records import PatchBasis

PLOT_SECONDS = 2.5  # each plot takes well under 1 s here; the margin absorbs a busy machine


def _basis(photos: dict[str, np.ndarray], channels: int, k: int) -> PatchBasis:
    """Exact centered patch PCA of small versions of the photographs."""
    images = np.stack(
        [
            np.asarray(Image.fromarray((im * 255).astype(np.uint8)).resize((48, 48)))
            for im in photos.values()
        ]
    )
    x = torch.tensor(images, dtype=torch.float64).permute(0, 3, 1, 2) / 255.0
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    patches = F.unfold(x, k).permute(0, 2, 1).reshape(-1, channels * k * k).numpy()
    mean = patches.mean(axis=0)
    second = patches.T @ patches / len(patches)
    eigenvalues, vectors = np.linalg.eigh(second - np.outer(mean, mean))
    order = np.argsort(eigenvalues)[::-1]
    return PatchBasis(
        dataset="photos",
        channels=channels,
        kh=k,
        kw=k,
        centered=True,
        components=vectors[:, order],
        eigenvalues=np.clip(eigenvalues[order], 0, None),
        mean=mean,
        second_moment=second,
        n_patches=len(patches),
        n_images=len(images),
    )


@pytest.fixture(scope="module")
def rgb_basis(photos) -> PatchBasis:
    return _basis(photos, 3, 3)


def _read(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _colourful(pixels: np.ndarray, spread: int = 60) -> np.ndarray:
    """Mask of clearly coloured (not grey) pixels."""
    return pixels.max(axis=2) - pixels.min(axis=2) > spread


def _near(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    """How many pixels are within ``tol`` of the colour ``rgb`` in every channel."""
    return int(np.all(np.abs(pixels - np.array(rgb)) <= tol, axis=2).sum())


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < PLOT_SECONDS, f"{function.__name__} took {elapsed:.2f} s"
    return result


@pytest.fixture(scope="module", autouse=True)
def _warm_matplotlib(tmp_path_factory):
    """The first figure of a process loads fonts; time the plots after that."""
    plot_profile(tmp_path_factory.mktemp("warm") / "warm.png", {"a": [0.0, 1.0]})


# --------------------------------------------------------------------------- profiles


def test_plot_profile_with_spectrum_and_fit(tmp_path, rgb_basis):
    lam = rgb_basis.lambdas
    rng = np.random.default_rng(0)
    profiles = {
        "trained": formula_profile(lam, 30.0) * (1 + 0.05 * rng.standard_normal(27)),
        "random init": energy_profile(rng.standard_normal((64, 3, 3, 3)), rgb_basis),
    }
    fit = fit_formula(profiles["trained"], lam)
    path = _timed(
        plot_profile, tmp_path / "out" / "profile.png", profiles, lambdas=lam, fit=fit, title="t"
    )
    assert path == tmp_path / "out" / "profile.png" and path.is_file()
    pixels = _read(path)
    assert pixels.shape == (420, 750, 3)
    assert _near(pixels, (31, 119, 180)) > 200  # first curve: matplotlib blue
    assert _near(pixels, (255, 127, 14)) > 200  # second curve: orange
    assert _near(pixels, (0, 0, 0), tol=30) > 300  # the dashed fit, axes and text
    assert _near(pixels, (115, 115, 115), tol=15) > 50  # the grey spectrum


def test_plot_profile_without_extras_has_no_fit_colours(tmp_path):
    path = plot_profile(tmp_path / "one.png", {"only": np.linspace(1, 0, 147) ** 2})
    pixels = _read(path)
    assert _near(pixels, (31, 119, 180)) > 200
    assert _near(pixels, (255, 127, 14)) == 0
    assert (pixels.reshape(-1, 3) != 255).any(axis=1).mean() > 0.02  # not blank


def test_plot_profile_many_models_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    many = {f"model-{i}": rng.random(27) for i in range(40)}
    assert _timed(plot_profile, tmp_path / "many.png", many).is_file()
    with pytest.raises(UserError, match="different lengths"):
        plot_profile(tmp_path / "bad.png", {"a": np.ones(27)}, lambdas=np.ones(147))
    with pytest.raises(UserError, match="no energy profile"):
        plot_profile(tmp_path / "bad.png", {})
    with pytest.raises(UserError, match="cannot write plot"):
        plot_profile(tmp_path / "bad.nosuchformat", {"a": np.ones(27)})


def test_plot_profile_follows_the_suffix(tmp_path):
    path = plot_profile(tmp_path / "profile.svg", {"a": np.arange(27.0)})
    assert "<svg" in path.read_text()


# --------------------------------------------------------------------------- filters


def test_plot_filters_rgb_shows_colour(tmp_path, rgb_basis):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((96, 3, 7, 7))
    weight[0] = -1.0
    weight[0, 0] = 1.0  # a pure red filter: after min-max scaling it is (1, 0, 0)
    path = _timed(plot_filters, tmp_path / "filters.png", weight, title="conv1")
    pixels = _read(path)
    assert pixels.shape[0] > 250 and pixels.shape[1] > 250
    assert _colourful(pixels).mean() > 0.2
    assert _near(pixels, (255, 0, 0), tol=5) >= 49  # the red filter, at least 7x7 pixels


def test_plot_filters_grayscale_has_no_colour(tmp_path):
    weight = np.random.default_rng(3).standard_normal((20, 1, 5, 5))
    pixels = _read(plot_filters(tmp_path / "gray.png", weight))
    assert not _colourful(pixels, spread=2).any()
    assert pixels.std() > 20  # not blank


def test_plot_filters_limits_the_count(tmp_path):
    weight = np.random.default_rng(4).standard_normal((256, 3, 3, 3))
    few = _read(plot_filters(tmp_path / "few.png", weight, max_filters=4))
    many = _read(plot_filters(tmp_path / "many.png", weight))
    # 4 filters make a 2x2 mosaic of big pixels; 64 make 8x8 smaller ones: different images.
    assert few.shape != many.shape or not np.array_equal(few, many)
    two_channel = np.random.default_rng(5).standard_normal((9, 2, 3, 3))
    pixels = _read(plot_filters(tmp_path / "two.png", two_channel))
    assert _colourful(pixels).any() and np.all(pixels[_colourful(pixels)][:, 2] < 60)
    with pytest.raises(UserError, match="out, C, kh, kw"):
        plot_filters(tmp_path / "bad.png", np.zeros((3, 3, 3)))


# --------------------------------------------------------------------------- one model


def test_plot_model_puts_filters_beside_the_profile(tmp_path, rgb_basis):
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((32, 3, 3, 3))
    profile = energy_profile(weight, rgb_basis)
    fit = fit_formula(profile, rgb_basis.lambdas)
    path = _timed(
        plot_model, tmp_path / "model.png", weight, profile, basis=rgb_basis, fit=fit, title="m"
    )
    pixels = _read(path)
    assert pixels.shape == (440, 1150, 3)
    left, right = pixels[:, :380], pixels[:, 380:]
    assert _colourful(left).mean() > 0.1  # the colour filter grid
    assert _near(right, (31, 119, 180)) > 200  # the profile curve
    assert _near(right, (115, 115, 115), tol=15) > 50  # the basis' spectrum
    only_filters = _read(plot_model(tmp_path / "filters.png", weight))
    np.testing.assert_array_equal(only_filters, _read(plot_filters(tmp_path / "f.png", weight)))
    with pytest.raises(UserError, match="different lengths"):
        plot_model(tmp_path / "bad.png", weight, np.ones(147), basis=rgb_basis)


# --------------------------------------------------------------------------- heatmap


def test_plot_heatmap_diverging_colours_and_nan(tmp_path, rgb_basis):
    lam = rgb_basis.lambdas
    profiles = {f"early-{i}": formula_profile(lam, 0.5 + i) for i in range(5)}
    profiles.update({f"late-{i}": formula_profile(lam, 1e5 * (i + 1)) for i in range(5)})
    profiles["flat"] = np.ones(27)  # undefined correlations: NaN
    corr = correlation_matrix(profiles)
    assert (corr.to_numpy() < -0.2).any() and corr.isna().any().any()
    path = _timed(plot_heatmap, tmp_path / "heat.png", corr, title="test zoo")
    pixels = _read(path)
    reds = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
    blues = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
    assert reds.sum() > 500 and blues.sum() > 500
    assert _near(pixels, (217, 217, 217), tol=3) > 300  # the NaN row and column


def test_plot_heatmap_scales_to_200_models(tmp_path):
    rng = np.random.default_rng(6)
    names = [f"timm/model_{i:03d}.some_long_tag" for i in range(200)]
    corr = correlation_matrix({name: rng.random(27) for name in names})
    pixels = _read(_timed(plot_heatmap, tmp_path / "big.png", corr))
    assert pixels.shape[0] >= 800 and _colourful(pixels, spread=30).mean() > 0.2
    with pytest.raises(UserError, match="empty"):
        plot_heatmap(tmp_path / "none.png", pd.DataFrame())


@pytest.mark.parametrize(("count", "labelled"), [(10, True), (60, True), (61, False), (200, False)])
def test_heatmap_tick_labels_are_hidden_above_60(count, labelled):
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = pd.Index([f"m{i}" for i in range(count)])
    _label_axis(ax, labels, count, axis="x")
    _label_axis(ax, labels, count, axis="y")
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert (shown == list(labels)) is labelled
    assert (len(ax.get_yticks()) == count) is labelled
    assert ax.get_xlabel() == ("" if labelled else f"{count} models")


# --------------------------------------------------------------------------- components


def test_plot_components_rgb(tmp_path, rgb_basis):
    path = _timed(plot_components, tmp_path / "components.png", rgb_basis)
    pixels = _read(path)
    assert pixels.shape[1] > 500
    assert _colourful(pixels, spread=40).sum() > 100  # colour-opponent components


def test_plot_components_grayscale_and_n(tmp_path, photos):
    basis = _basis(photos, 1, 5)
    pixels = _read(plot_components(tmp_path / "gray.png", basis, n=12))
    assert not _colourful(pixels, spread=2).any() and pixels.std() > 20
    wide = _read(plot_components(tmp_path / "all.png", basis, n=1000))  # capped at d = 25
    assert wide.shape != pixels.shape
    with pytest.raises(UserError, match="n must be"):
        plot_components(tmp_path / "bad.png", basis, n=0)
