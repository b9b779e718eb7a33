"""Energy profiles, pixel space, Pearson, and the linear-CNN formula fit (zooscan.energy).

Bases are computed here from real photographs (exact float64 eigen-decomposition of
all valid patches), so the tests do not depend on the patches module.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import minimize_scalar
from scipy.stats import ortho_group

from zooscan.energy import (
    LAMBDA_ZERO_TOL,
    FormulaFit,
    analyse,
    colour_share,
    correlation_matrix,
    energy_profile,
    fit_formula,
    formula_profile,
    pearson,
    project,
    to_pixel_space,
    whitening_index,
)
from zooscan.errors import ModelError, UserError
from zooscan.records import Analysis, FirstLayer, PatchBasis

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _images(photos: dict[str, np.ndarray], size: int = 64) -> torch.Tensor:
    """The photographs as a float64 ``(n, 3, size, size)`` batch of RGB pixels in [0, 1]."""
    resized = [
        np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize((size, size)))
        for img in photos.values()
    ]
    return torch.tensor(np.stack(resized), dtype=torch.float64).permute(0, 3, 1, 2) / 255.0


def _basis(images: torch.Tensor, kh: int, kw: int, dataset: str = "photos") -> PatchBasis:
    """Exact centered patch PCA of every valid stride-1 patch, as PatchBasis documents it."""
    patches = F.unfold(images, (kh, kw)).permute(0, 2, 1).reshape(-1, images.shape[1] * kh * kw)
    patches = patches.numpy()
    mean = patches.mean(axis=0)
    second = patches.T @ patches / len(patches)
    eigenvalues, vectors = np.linalg.eigh(second - np.outer(mean, mean))
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = np.clip(eigenvalues[order], 0, None), vectors[:, order]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    return PatchBasis(
        dataset=dataset,
        channels=images.shape[1],
        kh=kh,
        kw=kw,
        centered=True,
        components=vectors * signs,
        eigenvalues=eigenvalues,
        mean=mean,
        second_moment=second,
        n_patches=len(patches),
        n_images=images.shape[0],
    )


@pytest.fixture(scope="module")
def images(photos) -> torch.Tensor:
    return _images(photos)


@pytest.fixture(scope="module")
def basis3(images) -> PatchBasis:
    return _basis(images, 3, 3)


@pytest.fixture(scope="module")
def basis5(images) -> PatchBasis:
    return _basis(images, 5, 5)


def _random_filters(seed: int, out: int = 16, shape: tuple[int, ...] = (3, 3, 3)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((out, *shape))


# --------------------------------------------------------------------------- projection


@pytest.mark.parametrize("kernel", [(3, 3), (5, 5), (3, 5)])
def test_projection_order_matches_conv2d(images, kernel):
    """A filter's dot product with a (c, kh, kw)-flattened patch is exactly what conv2d
    computes, and the projection coefficients reproduce it through the basis."""
    kh, kw = kernel
    basis = _basis(images, kh, kw)
    weight = _random_filters(1, out=8, shape=(3, kh, kw))
    conv = F.conv2d(images, torch.tensor(weight)).numpy()
    coefficients = project(weight, basis)
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = rng.integers(images.shape[0])
        y, x = rng.integers(conv.shape[2]), rng.integers(conv.shape[3])
        patch = images[n, :, y : y + kh, x : x + kw].numpy().reshape(-1)
        np.testing.assert_allclose(weight.reshape(8, -1) @ patch, conv[n, :, y, x], atol=1e-12)
        pca_coefficients = basis.components.T @ patch
        np.testing.assert_allclose(coefficients @ pca_coefficients, conv[n, :, y, x], atol=1e-10)
    # The paper demo's (kh, kw, c) flattening gives different numbers (pitfall #1).
    wrong = weight.transpose(0, 2, 3, 1).reshape(8, -1) @ patch
    assert not np.allclose(wrong, conv[n, :, y, x])


def test_projection_accepts_tensors_and_flat_filters(basis3):
    weight = _random_filters(3)
    expected = weight.reshape(16, -1) @ basis3.components
    np.testing.assert_allclose(project(torch.tensor(weight, requires_grad=True), basis3), expected)
    np.testing.assert_allclose(project(weight.reshape(16, -1), basis3.components), expected)


def test_projection_rejects_mismatched_shapes(basis3, basis5):
    with pytest.raises(UserError, match="3x5x5"):
        project(_random_filters(4), basis5)
    with pytest.raises(UserError, match="dimension 27"):
        project(np.zeros((4, 30)), basis3)
    # Same d (27) but a different kernel shape is still refused.
    with pytest.raises(UserError, match="cannot be projected"):
        project(np.zeros((4, 3, 1, 9)), basis3)
    with pytest.raises(ModelError, match="NaN"):
        project(np.full((4, 3, 3, 3), np.nan), basis3)


# --------------------------------------------------------------------------- energy


def test_energy_is_one_hot_for_a_principal_component(basis3):
    for j in (0, 4, 26):
        weight = basis3.components[:, j].reshape(1, 3, 3, 3)
        profile = energy_profile(weight, basis3)
        expected = np.zeros(27)
        expected[j] = 1.0
        np.testing.assert_allclose(profile, expected, atol=1e-12)


def test_energy_matches_the_definition_and_the_papers_code(basis3):
    weight = _random_filters(5, out=32)
    projections = weight.reshape(32, -1) @ basis3.components
    rms = np.sqrt(np.mean(projections**2, axis=0))
    profile = energy_profile(weight, basis3)
    np.testing.assert_allclose(profile, rms / rms.max(), rtol=1e-12)
    assert profile.max() == 1.0
    # The paper's utils.calc_energy_profile uses (1/K) sqrt(sum): the same after max-normalising.
    paper = (1 / 32) * np.sqrt((projections**2).sum(0))
    np.testing.assert_allclose(profile, paper / paper.max(), rtol=1e-12)


def test_energy_invariances(basis3):
    """Paper §2: rescaling, permuting or orthogonally mixing the filters (W -> QW)."""
    weight = _random_filters(6, out=24)
    flat = weight.reshape(24, -1)
    reference = energy_profile(weight, basis3)
    q = ortho_group.rvs(24, random_state=7)
    variants = {
        "rescaled": 37.5 * weight,
        "negated": -weight,
        "permuted": weight[np.random.default_rng(8).permutation(24)],
        "mixed": (q @ flat).reshape(weight.shape),
    }
    for name, variant in variants.items():
        np.testing.assert_allclose(
            energy_profile(variant, basis3), reference, atol=1e-12, err_msg=name
        )
    # Mixing with a non-orthogonal matrix does change it: the test can fail.
    skew = np.eye(24) + np.diag(np.full(23, 3.0), 1)
    assert not np.allclose(energy_profile(skew @ flat, basis3), reference, atol=1e-3)


def test_normalize_filters_removes_per_filter_scale(basis3):
    """Pitfall #11: with a BatchNorm after the conv, per-filter norms are arbitrary."""
    weight = _random_filters(9, out=12)
    scales = np.geomspace(0.01, 100, 12)[:, None, None, None]
    rescaled = weight * scales
    assert not np.allclose(
        energy_profile(rescaled, basis3), energy_profile(weight, basis3), atol=1e-2
    )
    np.testing.assert_allclose(
        energy_profile(rescaled, basis3, normalize_filters=True),
        energy_profile(weight, basis3, normalize_filters=True),
        atol=1e-12,
    )
    # An all-zero filter stays zero instead of producing NaN.
    weight[0] = 0.0
    assert np.all(np.isfinite(energy_profile(weight, basis3, normalize_filters=True)))


def test_init_subtraction_isolates_the_learned_update(basis3):
    """Linear theory: every filter moves by the same vector; subtracting the init shows it."""
    init = _random_filters(10, out=64)
    update = 0.05 * basis3.components[:, 7].reshape(3, 3, 3)
    trained = init + update[None]
    with_init = energy_profile(trained, basis3)
    learned = energy_profile(trained, basis3, init=init)
    assert np.argmax(learned) == 7 and np.sort(learned)[-2] < 1e-10
    assert np.sort(with_init)[-2] > 0.3  # dominated by the random init without subtraction
    with pytest.raises(UserError, match="initial weight"):
        energy_profile(trained, basis3, init=init[:10])


def test_zero_weight_gives_zero_profile(basis3):
    weight = _random_filters(11)
    profile = energy_profile(weight, basis3, init=weight)
    assert profile.shape == (27,) and not profile.any()


def test_analyse_returns_recomputable_projections(basis3):
    weight = _random_filters(12)
    init = _random_filters(13)
    result = analyse(weight, basis3, init=init, normalize_filters=True)
    assert isinstance(result, Analysis)
    assert result.basis_id == basis3.id
    assert result.projections.shape == (16, 27)
    np.testing.assert_allclose(np.linalg.norm(result.projections, axis=1), 1.0)
    recomputed = np.sqrt(np.mean(result.projections**2, axis=0))
    np.testing.assert_allclose(result.energy, recomputed / recomputed.max())
    np.testing.assert_allclose(
        result.energy, energy_profile(weight, basis3, init=init, normalize_filters=True)
    )


# --------------------------------------------------------------------------- pixel space


def _layer(weight, **kwargs) -> FirstLayer:
    return FirstLayer(weight=np.asarray(weight, dtype=np.float32), module="conv1", **kwargs)


def _normalized(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """``(pixels - mean[c]) / std[c]``: what a model with these constants sees."""
    mean_t = torch.tensor(np.asarray(mean, dtype=np.float64))[None, :, None, None]
    std_t = torch.tensor(np.asarray(std, dtype=np.float64))[None, :, None, None]
    return (pixels - mean_t) / std_t


def _bias_for(weight: np.ndarray, mean, std) -> torch.Tensor:
    """The bias that makes ``conv((p - mean)/std, w) + bias == conv(p, w/std)``."""
    shift = (np.asarray(mean) / np.asarray(std))[None, :, None, None]
    return torch.tensor((weight * shift).sum(axis=(1, 2, 3)))


def test_pixel_space_maps_equivalent_models_to_the_same_filters(images, basis3):
    """A BGR model with ImageNet constants and an RGB model with other constants, built to
    compute the same function of the pixels, get identical pixel-space weights."""
    pixel_weight = _random_filters(14, out=8)
    std_bgr = np.array(IMAGENET_STD[::-1])
    mean_bgr = np.array(IMAGENET_MEAN[::-1])
    weight_bgr = np.ascontiguousarray(pixel_weight[:, ::-1]) * std_bgr[None, :, None, None]
    std_rgb, mean_rgb = np.array([0.5, 0.25, 0.125]), np.array([0.5, 0.5, 0.5])
    weight_rgb = pixel_weight * std_rgb[None, :, None, None]

    # The two models really compute the same function on real photographs.
    x_bgr = _normalized(images.flip(1), mean_bgr, std_bgr)
    x_rgb = _normalized(images, mean_rgb, std_rgb)
    out_bgr = F.conv2d(x_bgr, torch.tensor(weight_bgr), _bias_for(weight_bgr, mean_bgr, std_bgr))
    out_rgb = F.conv2d(x_rgb, torch.tensor(weight_rgb), _bias_for(weight_rgb, mean_rgb, std_rgb))
    out_pixels = F.conv2d(images, torch.tensor(pixel_weight))
    torch.testing.assert_close(out_bgr, out_pixels)
    torch.testing.assert_close(out_rgb, out_pixels)

    layer_bgr = _layer(weight_bgr, mean=tuple(mean_bgr), std=tuple(std_bgr), channel_order="BGR")
    layer_rgb = _layer(weight_rgb, mean=tuple(mean_rgb), std=tuple(std_rgb), channel_order="RGB")
    pixel_bgr, pixel_rgb = to_pixel_space(layer_bgr), to_pixel_space(layer_rgb)
    assert pixel_bgr.dtype == np.float64 and pixel_bgr.shape == (8, 3, 3, 3)
    np.testing.assert_allclose(pixel_bgr, pixel_weight, rtol=1e-6)
    np.testing.assert_allclose(pixel_rgb, pixel_weight, rtol=1e-6)
    np.testing.assert_allclose(
        energy_profile(pixel_bgr, basis3), energy_profile(pixel_rgb, basis3), atol=1e-6
    )
    # In the models' own input spaces the two layers look different.
    model_bgr = to_pixel_space(layer_bgr, space="model")
    np.testing.assert_array_equal(model_bgr, layer_bgr.weight.astype(np.float64))
    assert (
        pearson(
            energy_profile(model_bgr, basis3),
            energy_profile(to_pixel_space(layer_rgb, space="model"), basis3),
        )
        < 0.99
    )


def test_pixel_space_identity_and_grayscale():
    weight = _random_filters(15, out=4, shape=(1, 5, 5))
    np.testing.assert_allclose(to_pixel_space(_layer(weight, channel_order="L")), weight, rtol=1e-6)
    scaled = to_pixel_space(_layer(weight, std=(0.5,), channel_order="L"))
    np.testing.assert_allclose(scaled, weight / 0.5, rtol=1e-6)
    other = _random_filters(16, out=4, shape=(4, 3, 3))
    std = (0.1, 0.2, 0.3, 0.4)
    result = to_pixel_space(_layer(other, std=std, channel_order="other"))
    np.testing.assert_allclose(result, other / np.array(std)[None, :, None, None], rtol=1e-6)


def _space_to_depth(x: torch.Tensor, block: int, layout: str) -> torch.Tensor:
    if layout == "channel_major":
        return F.pixel_unshuffle(x, block)
    n, c, h, w = x.shape  # timm's SpaceToDepth: channel = (row * block + col) * c + colour
    x = x.view(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, c * block * block, h // block, w // block)


@pytest.mark.parametrize("layout", ["position_major", "channel_major"])
def test_pixel_space_for_space_to_depth_stems(images, layout):
    """A BGR space-to-depth stem maps to the filter applied to space-to-depth RGB pixels."""
    block = 2
    weight = _random_filters(17, out=6, shape=(12, 3, 3))
    std_bgr, mean_bgr = np.array([0.3, 0.2, 0.1]), np.array([0.4, 0.5, 0.6])
    normalized = _normalized(images.flip(1), mean_bgr, std_bgr)
    layer = _layer(
        weight,
        mean=tuple(mean_bgr),
        std=tuple(std_bgr),
        channel_order="BGR",
        flags={"space_to_depth": block, "space_to_depth_layout": layout},
    )
    pixel_weight = to_pixel_space(layer)
    model_out = F.conv2d(_space_to_depth(normalized, block, layout), torch.tensor(weight))
    pixel_out = F.conv2d(_space_to_depth(images, block, layout), torch.tensor(pixel_weight))
    offset = (model_out - pixel_out).flatten(2)
    # Equal up to a per-filter constant (the bias that absorbs the mean).
    torch.testing.assert_close(
        offset - offset[..., :1], torch.zeros_like(offset), atol=1e-5, rtol=0
    )


def test_pixel_space_errors():
    weight = _random_filters(18, out=2)
    with pytest.raises(ModelError, match="3 input channels but 2 std"):
        to_pixel_space(_layer(weight, std=(0.2, 0.2)))
    with pytest.raises(ModelError, match="finite and positive"):
        to_pixel_space(_layer(weight, std=(0.2, 0.0, 0.2)))
    with pytest.raises(ModelError, match="expected 3"):
        to_pixel_space(_layer(_random_filters(18, out=2, shape=(4, 3, 3)), channel_order="BGR"))
    with pytest.raises(ModelError, match="expected \\(out, C, kh, kw\\)"):
        to_pixel_space(_layer(np.zeros((2, 27))))
    with pytest.raises(UserError, match="unknown input space"):
        to_pixel_space(_layer(weight), space="imagenet")


# --------------------------------------------------------------------------- comparison


def test_pearson_matches_numpy_and_is_nan_safe():
    rng = np.random.default_rng(20)
    a, b = rng.random(27), rng.random(27)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert pearson(a, 3 * a + 1) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert math.isnan(pearson(np.full(27, 0.3), b))
    assert math.isnan(pearson(np.zeros(27), np.zeros(27)))
    with_nan = a.copy()
    with_nan[3] = np.nan
    assert math.isnan(pearson(with_nan, b))
    assert math.isnan(pearson([1.0], [2.0]))
    with pytest.raises(UserError, match="same \\(C, kh, kw\\)"):
        pearson(a, rng.random(147))


def test_correlation_matrix_matches_pandas():
    rng = np.random.default_rng(21)
    profiles = {f"model/{i}": rng.random(27) for i in range(6)}
    matrix = correlation_matrix(profiles)
    assert list(matrix.index) == list(profiles) == list(matrix.columns)
    expected = pd.DataFrame(profiles).corr()
    np.testing.assert_allclose(matrix.to_numpy(), expected.to_numpy(), atol=1e-12)
    profiles["flat"] = np.ones(27)
    matrix = correlation_matrix(profiles)
    assert matrix.loc["flat"].isna().all() and matrix["flat"].isna().all()
    assert matrix.loc["model/0", "model/0"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="different lengths"):
        correlation_matrix({"a": np.ones(27), "b": np.ones(147)})
    assert correlation_matrix({}).empty


# --------------------------------------------------------------------------- formula


def test_formula_small_s_follows_the_spectrum(basis5):
    lam = basis5.lambdas
    np.testing.assert_allclose(formula_profile(lam, 0.0), lam / lam.max(), rtol=1e-15)
    np.testing.assert_allclose(formula_profile(lam, 1e-6), lam / lam.max(), rtol=1e-6)
    np.testing.assert_allclose(formula_profile(lam, 1e-3), lam / lam.max(), rtol=1e-3)
    assert not np.allclose(formula_profile(lam, 1.0), lam / lam.max(), rtol=1e-2)


def test_formula_large_s_whitens(basis5):
    lam = basis5.lambdas
    inverse = (1 / lam) / (1 / lam).max()
    x_min = (lam.min() / lam.max()) ** 2
    np.testing.assert_allclose(formula_profile(lam, np.inf), inverse, rtol=1e-12)
    np.testing.assert_allclose(formula_profile(lam, 50 / x_min), inverse, rtol=1e-12)
    np.testing.assert_allclose(formula_profile(lam, 1e3 / x_min), inverse, rtol=1e-12)
    assert not np.allclose(formula_profile(lam, 1 / x_min), inverse, rtol=1e-2)


def test_formula_peak_moves_to_smaller_lambdas_as_s_grows():
    """The peak sits where s (lambda/lambda_max)^2 ≈ 1.2564 (root of 2y = e^y - 1)."""
    lam = np.geomspace(1.0, 1e-3, 2001)
    peaks = []
    for s in (10.0, 1e2, 1e3, 1e4):
        profile = formula_profile(lam, s)
        peak = lam[np.argmax(profile)]
        assert s * peak**2 == pytest.approx(1.2564, rel=2e-2)
        peaks.append(peak)
    assert peaks == sorted(peaks, reverse=True)


def test_formula_finite_steps_agree_with_the_exponential_limit(basis5):
    """(1 - (1 - a lambda^2)^t) vs 1 - exp(-a t lambda^2): negligible for t >= 10^4."""
    lam = basis5.lambdas
    for s in (0.1, 3.0, 100.0, 5000.0):
        for steps in (10_000, 1_000_000):
            exact = formula_profile(lam, s, rate=s / steps)
            np.testing.assert_allclose(exact, formula_profile(lam, s), rtol=1e-4, atol=1e-12)
    # The finite form is the literal (1 - (1 - a lambda^2)^t) / lambda.
    a, steps = 0.9 / lam.max() ** 2, 5
    literal = (1 - (1 - a * lam**2) ** steps) / lam
    np.testing.assert_allclose(formula_profile(lam, 4.5, rate=0.9), literal / literal.max())
    # With few large steps the forms do differ: the test can fail.
    assert not np.allclose(literal / literal.max(), formula_profile(lam, 4.5), rtol=1e-2)


def test_formula_handles_zero_lambdas_of_a_rank_deficient_basis(photos):
    """Uniform-colour images: patches span only 3 directions, the other 24 lambdas are 0
    up to rounding. Their energy is 0 for every s, never inf/NaN."""
    colours = np.stack([img.reshape(-1, 3).mean(axis=0) for img in photos.values()])
    flat_images = torch.tensor(colours, dtype=torch.float64)[:, :, None, None].expand(-1, 3, 16, 16)
    basis = _basis(flat_images.contiguous(), 3, 3, dataset="uniform")
    lam = basis.lambdas
    assert np.count_nonzero(lam / lam.max() > LAMBDA_ZERO_TOL) <= 3
    for s in (0.0, 1.0, 1e6, np.inf):
        profile = formula_profile(lam, s)
        assert np.all(np.isfinite(profile)) and profile.max() == 1.0
        assert not profile[3:].any()
    fit = fit_formula(formula_profile(lam, 20.0), lam)
    assert fit.r > 0.9999 and np.isfinite(fit.r_inv_lambda)
    # The s -> 0 limit of (1 - exp(-s lambda^2)) / lambda at lambda -> 0 is 0, not 1/lambda.
    np.testing.assert_array_equal(formula_profile([1.0, 0.5, 0.0], 1e3)[2], 0.0)


def test_formula_rejects_bad_input():
    with pytest.raises(UserError, match="non-negative"):
        formula_profile([1.0, -0.1], 1.0)
    with pytest.raises(UserError, match="all zero"):
        formula_profile([0.0, 0.0], 1.0)
    with pytest.raises(UserError, match="s must be"):
        formula_profile([1.0, 0.5], -1.0)
    with pytest.raises(UserError, match="rate"):
        formula_profile([1.0, 0.5], 10.0, rate=1.5)


# --------------------------------------------------------------------------- fit


@pytest.mark.parametrize("s_true", [0.3, 12.0, 400.0, 20_000.0])
def test_fit_recovers_a_known_s_from_a_noisy_profile(basis5, s_true):
    lam = basis5.lambdas
    rng = np.random.default_rng(int(s_true))
    profile = formula_profile(lam, s_true) * (1 + 0.01 * rng.standard_normal(lam.size))
    fit = fit_formula(profile, lam)
    assert isinstance(fit, FormulaFit)
    assert fit.r >= 0.999
    assert fit.s == pytest.approx(s_true, rel=0.04)
    assert fit.at_limit is None
    assert fit.r >= max(fit.r_lambda, fit.r_inv_lambda)
    np.testing.assert_allclose(fit.predicted, formula_profile(lam, fit.s))
    assert fit.eta_t == pytest.approx(fit.s / lam.max() ** 2)
    assert fit.r == pytest.approx(pearson(profile, fit.predicted), abs=1e-12)


def test_fit_s_is_dimensionless(basis5):
    """Scaling the spectrum (e.g. pixel units 0-255 vs 0-1) leaves s unchanged; eta*t scales."""
    lam = basis5.lambdas
    profile = formula_profile(lam, 50.0)
    fit, scaled = fit_formula(profile, lam), fit_formula(profile, 255 * lam)
    assert scaled.s == pytest.approx(fit.s, rel=1e-6)
    assert scaled.eta_t == pytest.approx(fit.eta_t / 255**2, rel=1e-6)


def test_fit_baselines_and_limits(basis5):
    lam = basis5.lambdas
    spectrum = fit_formula(lam, lam)
    assert spectrum.at_limit == "spectrum"
    assert spectrum.r_lambda == pytest.approx(1.0) and spectrum.r == pytest.approx(1.0)
    inverse = fit_formula(1 / lam, lam)
    assert inverse.at_limit == "whitening"
    assert inverse.r_inv_lambda == pytest.approx(1.0) and inverse.r == pytest.approx(1.0)
    record = inverse.as_dict()
    assert set(record) >= {"s", "eta_t", "r", "r_lambda", "r_inv_lambda", "whitening_index"}
    assert len(record["predicted"]) == lam.size


def _dense_log_grid_best(profile, lam, fit: FormulaFit, points: int = 20_000) -> float:
    grid = np.geomspace(*fit.s_range, points)
    return max(pearson(profile, formula_profile(lam, s)) for s in grid)


def test_fit_finds_the_global_optimum_a_local_search_misses():
    """A profile mixing an early (s=0.3) and a late (s=3e4) stage has two local maxima of
    r(s). A bounded Brent search over the whole range stops at the wrong one; the fit
    matches the best of a dense 20 000-point log grid."""
    lam = 1.0 / np.arange(1, 28) ** 0.9  # 1/f-like spectrum of 27 components
    profile = formula_profile(lam, 0.3) + formula_profile(lam, 3e4)
    fit = fit_formula(profile, lam)
    lo, hi = (math.log(v) for v in fit.s_range)
    naive = minimize_scalar(
        lambda x: -pearson(profile, formula_profile(lam, math.exp(x))),
        bounds=(lo, hi),
        method="bounded",
    )
    assert fit.r > -naive.fun + 0.05
    assert fit.r >= _dense_log_grid_best(profile, lam, fit) - 1e-12


def _paper_grid_best(profile: np.ndarray, lam: np.ndarray, rate: float) -> float:
    """The paper's fit_formula_to_model, vectorised: for t in range(10000, 5000000, 250),
    sol = |(1 - (1 - a_i)^t) / a_i * lambda_i| with a_i = rate (lambda_i/lambda_max)^2,
    normalised; the best Pearson r over the 19 960 steps."""
    steps = np.arange(10_000, 5_000_000, 250, dtype=np.float64)[:, None]
    a = rate * (lam / lam.max()) ** 2
    sols = np.abs(-np.expm1(steps * np.log1p(-a)) / a * lam)
    sols /= sols.max(axis=1, keepdims=True)
    centered = sols - sols.mean(axis=1, keepdims=True)
    target = profile - profile.mean()
    r = centered @ target / (np.linalg.norm(centered, axis=1) * np.linalg.norm(target))
    assert steps.size == 19_960
    return float(r.max())


def test_fit_beats_the_papers_20000_step_grid(basis3):
    """Given the grid's rate, the fit searches the very same finite-step family and
    reaches at least the best r of the paper's 19 960 steps; the default t -> inf form
    is within 1e-6 of it; and both find an s outside the grid's fixed range."""
    lam = basis3.lambdas
    rng = np.random.default_rng(22)
    rate = 1e-4  # the paper's a * lambda_max^2: its grid covers s = rate * t in [1, 500]
    for s_true in (3.0, 80.0, 5e4):
        profile = formula_profile(lam, s_true) * (1 + 0.05 * rng.standard_normal(lam.size))
        fit = fit_formula(profile, lam, rate=rate)
        best_grid = _paper_grid_best(profile, lam, rate)
        assert fit.r >= best_grid - 1e-12
        assert fit.steps == pytest.approx(fit.s / rate)
        assert fit_formula(profile, lam).r >= best_grid - 1e-6
    assert fit.r > best_grid + 0.01  # s_true = 5e4 lies outside the grid's reach


def test_fit_rejects_degenerate_input(basis3):
    lam = basis3.lambdas
    with pytest.raises(UserError, match="constant"):
        fit_formula(np.ones(27), lam)
    with pytest.raises(UserError, match="27 components but the spectrum 147"):
        fit_formula(np.ones(27), np.ones(147))
    with pytest.raises(UserError, match="not identifiable"):
        fit_formula(np.arange(27.0), np.ones(27))
    with pytest.raises(UserError, match="NaN"):
        fit_formula(np.full(27, np.nan), lam)


# --------------------------------------------------------------------------- whitening index


def test_whitening_index_limits_and_flat(basis5):
    lam = basis5.lambdas
    assert whitening_index(formula_profile(lam, 1e-6), lam) == pytest.approx(-1.0, abs=1e-5)
    assert whitening_index(formula_profile(lam, np.inf), lam) == pytest.approx(1.0, abs=1e-12)
    x_min = (lam.min() / lam.max()) ** 2
    assert whitening_index(formula_profile(lam, 1e3 / x_min), lam) == pytest.approx(1.0, abs=1e-9)
    assert whitening_index(np.ones(lam.size), lam) == pytest.approx(0.0, abs=1e-12)
    # Intermediate training: partial whitening, between the limits and increasing with s.
    indices = [whitening_index(formula_profile(lam, s), lam) for s in (1.0, 30.0, 1e3)]
    assert -1 < indices[0] < indices[1] < indices[2] < 1
    # Power laws give their exponent exactly, whatever the scale.
    assert whitening_index(5 * lam**-0.4, lam) == pytest.approx(0.4)


def test_whitening_index_undefined_cases():
    assert math.isnan(whitening_index([1.0, 0.0, 0.0], [1.0, 0.5, 0.2]))
    assert math.isnan(whitening_index([1.0, 0.5], [1.0, 1.0]))
    # Components with lambda = 0 are left out, not log(0).
    assert whitening_index([1.0, 0.5, 0.7], [1.0, 2.0, 0.0]) == pytest.approx(1.0)


def test_energy_profile_of_huge_finite_weights_does_not_overflow():
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(8, 3, 3, 3))
    components = np.linalg.qr(rng.normal(size=(27, 27)))[0]
    expected = energy_profile(weight, components)
    huge = energy_profile(weight * 1e200, components)
    assert np.all(np.isfinite(huge))
    np.testing.assert_allclose(huge, expected, rtol=1e-12)


def test_analyse_refuses_projections_that_overflow():
    """One ModelError, from analyse and energy_profile alike, and no RuntimeWarning
    printed before it."""
    d = 27
    basis = PatchBasis(
        dataset="t", channels=3, kh=3, kw=3, centered=True,
        components=np.full((d, d), 1 / np.sqrt(d)),
        eigenvalues=np.ones(d), mean=np.zeros(d), second_moment=np.eye(d),
        n_patches=1, n_images=1,
    )  # every column sums all 27 entries: 27 * 1e308 overflows
    huge = np.full((2, 3, 3, 3), 1e308)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModelError, match="overflow"):
            analyse(huge, basis)
        with pytest.raises(ModelError, match="overflow"):
            energy_profile(huge, basis)


def test_colour_share_separates_luminance_from_colour_filters():
    """Filters equal across R, G, B carry no colour energy, colour-opponent filters
    (summing to zero over the channels at every pixel) carry nothing else, and random
    filters split 1/3 : 2/3 like the directions they span."""
    rng = np.random.default_rng(0)
    spatial = rng.standard_normal((16, 1, 3, 3))
    luminance = np.repeat(spatial, 3, axis=1)
    opponent = spatial * np.array([1.0, -2.0, 1.0])[None, :, None, None]
    assert colour_share(luminance) == pytest.approx(0, abs=1e-12)
    assert colour_share(opponent) == pytest.approx(1)
    both = colour_share(luminance + opponent)
    expected = (opponent**2).sum() / ((luminance**2).sum() + (opponent**2).sum())
    assert both == pytest.approx(expected)  # the two parts are orthogonal
    assert colour_share(rng.standard_normal((4096, 3, 3, 3))) == pytest.approx(2 / 3, abs=0.01)
    assert colour_share(np.zeros((4, 3, 3, 3))) is None
    assert colour_share(spatial) is None  # grayscale: no colour to share
