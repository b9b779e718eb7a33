"""Patch bases (zooscan.patches): order, exactness, streaming, signs, memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zooscan.errors import DatasetError
from zooscan.patches import (
    METHODS,
    PatchStats,
    compute_basis,
    eigh_sorted,
    extract_patches,
    fix_signs,
)


def _chw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1))


@pytest.fixture(scope="module")
def crops(photos) -> list[np.ndarray]:
    """Real photographs as (1, 3, H, W) batches of different, non-square sizes."""
    sizes = [(40, 56), (48, 48), (37, 61), (64, 40), (52, 33), (45, 45), (30, 70)]
    out = []
    for image, (h, w) in zip([photos[k] for k in sorted(photos)], sizes, strict=False):
        top, left = image.shape[0] // 3, image.shape[1] // 4
        out.append(_chw(image[top : top + h, left : left + w])[None])
    return out


def _reference(batches: list[np.ndarray], kh: int, kw: int) -> np.ndarray:
    return np.concatenate([extract_patches(batch, kh, kw) for batch in batches])


def _stats(batches, channels, kh, kw, **kwargs) -> PatchStats:
    stats = PatchStats(channels, kh, kw, **kwargs)
    for batch in batches:
        stats.update(batch)
    return stats


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


class ListDataset:
    """A PatchDataset over in-memory batches."""

    def __init__(self, batches, key="list"):
        self._batches = batches
        self.key = key

    def batches(self, channels):
        yield from self._batches


# --- patch order ------------------------------------------------------------------


@pytest.mark.parametrize(("kh", "kw"), [(3, 3), (4, 6), (7, 7)])
def test_patch_order_is_the_order_conv2d_uses(crops, kh, kw):
    images = np.concatenate([crop[:, :, :30, :30] for crop in crops[:4]])
    weight = torch.randn(
        5, 3, kh, kw, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    response = F.conv2d(torch.from_numpy(images).double(), weight)  # (n, out, Ho, Wo)
    expected = response.flatten(2).transpose(1, 2).reshape(-1, 5).numpy()
    patches = extract_patches(images, kh, kw)
    assert patches.shape == (4 * (31 - kh) * (31 - kw), 3 * kh * kw)
    np.testing.assert_allclose(patches @ weight.reshape(5, -1).numpy().T, expected, atol=1e-10)


def test_energy_needs_the_c_kh_kw_flatten(crops):
    """Filter-response variance w^T cov w = sum_i (w . u_i)^2 eigenvalue_i ties the basis to
    conv2d; the paper demo's (kh, kw, c) flatten breaks it and changes the energy profile."""
    kh = kw = 5
    basis = compute_basis(ListDataset(crops), 3, kh, kw)
    weight = torch.randn(
        8, 3, kh, kw, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    weight[:, 0] *= 3.0  # a red-heavy bank, so colour and space are not interchangeable
    responses = np.concatenate(
        [F.conv2d(torch.from_numpy(c).double(), weight).transpose(0, 1).flatten(1) for c in crops],
        axis=1,
    )
    measured = responses.var(axis=1)

    def response_variance(flat: np.ndarray) -> np.ndarray:
        return ((flat @ basis.components) ** 2 * basis.eigenvalues).sum(axis=1)

    def energy(flat: np.ndarray) -> np.ndarray:
        e = np.sqrt(((flat @ basis.components) ** 2).mean(axis=0))
        return e / e.max()

    ours = weight.reshape(8, -1).numpy()
    demo = weight.permute(0, 2, 3, 1).reshape(8, -1).numpy()  # (kh, kw, c) order
    np.testing.assert_allclose(response_variance(ours), measured, rtol=1e-9)
    assert np.abs(response_variance(demo) / measured - 1).max() > 0.05
    assert np.abs(energy(ours) - energy(demo)).max() > 0.1


# --- exactness of the streamed basis --------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tile_bytes", [64 * 2**20, 40_000])
def test_streamed_basis_equals_the_full_patch_matrix(crops, method, tile_bytes):
    kh, kw = 5, 3
    patches = _reference(crops, kh, kw)
    basis = _stats(crops, 3, kh, kw, method=method, tile_bytes=tile_bytes).to_basis("photos")

    cov = np.cov(patches, rowvar=False, bias=True)
    assert basis.n_patches == patches.shape[0]
    assert basis.n_images == len(crops)
    np.testing.assert_allclose(basis.mean, patches.mean(axis=0), rtol=0, atol=1e-12)
    reconstructed = basis.components @ np.diag(basis.eigenvalues) @ basis.components.T
    assert _relative(reconstructed, cov) < 1e-10
    assert _relative(basis.second_moment, patches.T @ patches / len(patches)) < 1e-10
    reference_values = np.sort(np.linalg.eigvalsh(cov))[::-1]
    np.testing.assert_allclose(
        basis.eigenvalues, np.clip(reference_values, 0, None), atol=1e-10 * cov.max()
    )
    # well-separated components match the reference eigenvectors up to sign
    values, vectors = np.linalg.eigh(cov)
    for i in range(4):
        ref = vectors[:, ::-1][:, i]
        assert abs(abs(ref @ basis.components[:, i]) - 1) < 1e-8


@pytest.mark.parametrize(("channels", "kh", "kw"), [(1, 3, 5), (5, 2, 2), (2, 1, 1)])
def test_any_channel_count_and_kernel_shape(crops, channels, kh, kw):
    rng = np.random.default_rng(0)
    mixing = rng.random((channels, 3))  # channels made from real photographs
    batches = [np.einsum("kc,nchw->nkhw", mixing, crop) for crop in crops[:3]]
    patches = _reference(batches, kh, kw)
    basis = _stats(batches, channels, kh, kw).to_basis("mix")
    assert basis.components.shape == (channels * kh * kw,) * 2
    reconstructed = basis.components @ np.diag(basis.eigenvalues) @ basis.components.T
    assert _relative(reconstructed, np.cov(patches, rowvar=False, bias=True)) < 1e-10


@pytest.mark.parametrize(("kh", "kw"), [(16, 16), (5, 9), (9, 2)])
def test_row_method_equals_direct_method(crops, kh, kw):
    rows = _stats(crops[:4], 3, kh, kw, method="rows", tile_bytes=300_000)
    direct = _stats(crops[:4], 3, kh, kw, method="direct")
    assert rows.n == direct.n
    assert _relative(rows.outer, direct.outer) < 1e-10
    assert _relative(rows.sum, direct.sum) < 1e-12


def test_basis_fields_orthonormality_and_lambdas(crops):
    basis = compute_basis(ListDataset(crops, key="photos"), 3, 3, 3)
    d = 27
    assert (basis.dataset, basis.channels, basis.kh, basis.kw, basis.centered) == (
        "photos",
        3,
        3,
        3,
        True,
    )
    assert basis.components.dtype == np.float64 and basis.components.shape == (d, d)
    np.testing.assert_allclose(basis.components.T @ basis.components, np.eye(d), atol=1e-12)
    assert np.all(np.diff(basis.eigenvalues) <= 0) and basis.eigenvalues.min() >= 0
    np.testing.assert_allclose(basis.lambdas, np.sqrt(basis.eigenvalues))
    assert basis.n_patches == sum((c.shape[2] - 2) * (c.shape[3] - 2) for c in crops)
    # the top component of photographs is the mean-luminance (DC) one
    top = basis.components[:, 0]
    assert top.min() > 0 and top.sum() / np.sqrt(d) > 0.95


def test_signs_are_reproducible_across_batching(crops):
    first = _stats(crops, 3, 3, 3).to_basis("p")
    rebatched = [crop[:, :, :, :] for crop in reversed(crops)]
    second = _stats(rebatched, 3, 3, 3, method="direct", tile_bytes=10_000).to_basis("p")
    np.testing.assert_allclose(first.components, second.components, atol=1e-8)
    peak = np.abs(first.components).argmax(axis=0)
    assert np.all(first.components[peak, np.arange(27)] > 0)
    values, flipped = eigh_sorted(
        first.components @ np.diag(first.eigenvalues) @ first.components.T
    )
    np.testing.assert_allclose(flipped, first.components, atol=1e-8)


def test_centered_and_uncentered_differ_by_the_mean(crops):
    stats = _stats(crops, 3, 3, 3)
    centered = stats.to_basis("p", centered=True)
    uncentered = stats.to_basis("p", centered=False)
    assert uncentered.centered is False
    np.testing.assert_array_equal(centered.second_moment, uncentered.second_moment)

    def matrix(basis):
        return basis.components @ np.diag(basis.eigenvalues) @ basis.components.T

    mean = centered.mean
    np.testing.assert_allclose(
        matrix(centered) + np.outer(mean, mean), matrix(uncentered), atol=1e-12
    )
    patches = _reference(crops, 3, 3)
    assert _relative(matrix(uncentered), patches.T @ patches / len(patches)) < 1e-10
    # the uncentered top eigenvalue carries the mean patch (paper Def. 2.1)
    assert uncentered.eigenvalues[0] > centered.eigenvalues[0] + 0.9 * mean @ mean
    assert centered.id.endswith("~centered") and uncentered.id.endswith("~uncentered")


def test_to_basis_cross_checks_its_arguments(crops):
    stats = _stats(crops[:2], 3, 3, 3)
    basis = stats.to_basis("p", 3, 3, 3, False, 2)
    assert basis.n_images == 2 and not basis.centered
    with pytest.raises(ValueError, match="kh=5"):
        stats.to_basis("p", 3, 5, 3)
    with pytest.raises(ValueError, match="n_images=9"):
        stats.to_basis("p", n_images=9)


# --- streaming mechanics ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_tiles_of_several_images(crops, method):
    batch = np.concatenate([crop[:, :, :30, :30] for crop in crops[:6]])
    stats = PatchStats(3, 3, 3, method=method)
    image_row, shared_row = stats._row_costs(30)
    stats.tile_bytes = 30 * (2 * image_row + shared_row)  # two images per tile
    stats.update(batch)
    patches = extract_patches(batch, 3, 3)
    assert stats.n == len(patches) == 6 * 28 * 28
    assert _relative(stats.outer, patches.T @ patches) < 1e-12
    np.testing.assert_allclose(stats.sum, patches.sum(axis=0), rtol=1e-12)


def test_merge_equals_one_pass(crops):
    whole = _stats(crops, 3, 4, 4)
    merged = _stats(crops[:3], 3, 4, 4).merge(_stats(crops[3:], 3, 4, 4))
    assert (merged.n, merged.n_images) == (whole.n, whole.n_images)
    assert _relative(merged.outer, whole.outer) < 1e-13
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(PatchStats(3, 3, 3))


def test_compute_basis_reports_progress_and_accepts_torch_and_uint8(crops):
    seen: list[int] = []
    batches = [torch.from_numpy(np.concatenate([c[:, :, :30, :30] for c in crops[:3]]))]
    batches.append(np.concatenate([c[:, :, :30, :30] for c in crops[3:]]))
    basis = compute_basis(ListDataset(batches), 3, 3, 3, progress=seen.append)
    assert seen == [3, len(crops) - 3] and basis.n_images == len(crops)
    as_uint8 = [np.round(np.asarray(b) * 255).astype(np.uint8) for b in batches]
    stats = _stats(as_uint8, 3, 3, 3)
    expected = _reference([b.astype(np.float64) for b in as_uint8], 3, 3)
    assert _relative(stats.outer, expected.T @ expected) < 1e-12


def test_small_images_give_no_patches_and_a_clear_error():
    tiny = np.zeros((4, 3, 5, 5), dtype=np.float32)
    stats = PatchStats(3, 7, 7)
    stats.update(tiny)
    assert stats.n == 0 and stats.n_images == 0
    with pytest.raises(DatasetError, match="no 7x7 patch"):
        compute_basis(ListDataset([tiny], key="tiny"), 3, 7, 7)


def test_bad_input_is_rejected_and_leaves_the_stats_unchanged(crops):
    stats = _stats(crops[:1], 3, 3, 3, tile_bytes=20_000)
    before = (stats.n, stats.sum.copy(), stats.outer.copy())
    poisoned = crops[1].copy()
    poisoned[0, 1, -1, -1] = np.nan  # in the last tile
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(poisoned)
    assert stats.n == before[0]
    np.testing.assert_array_equal(stats.outer, before[2])
    with pytest.raises(ValueError, match="channels"):
        stats.update(np.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        stats.update(np.zeros((3, 8, 8)))
    with pytest.raises(DatasetError, match="non-finite"):
        compute_basis(ListDataset([poisoned], key="bad"), 3, 3, 3)
    with pytest.raises(ValueError, match="kh must be a positive integer"):
        PatchStats(3, 0, 3)
    with pytest.raises(ValueError, match="unknown method"):
        PatchStats(3, 3, 3, method="pca_lowrank")


def test_eigh_sorted_and_fix_signs():
    rotation = np.linalg.qr(np.random.default_rng(3).normal(size=(4, 4)))[0]
    matrix = rotation @ np.diag([1.0, 4.0, 0.0, 2.0]) @ rotation.T
    values, vectors = eigh_sorted(matrix)
    np.testing.assert_allclose(values, [4.0, 2.0, 1.0, 0.0], atol=1e-12)
    assert values.min() >= 0.0
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, matrix, atol=1e-12)
    assert np.all(vectors[np.abs(vectors).argmax(axis=0), range(4)] > 0)
    # exact ties: the first of the largest entries decides
    tied = fix_signs(np.array([[-0.5, 0.6], [0.5, -0.8]]))
    np.testing.assert_array_equal(tied, [[0.5, -0.6], [-0.5, 0.8]])
    with pytest.raises(ValueError, match="square"):
        eigh_sorted(np.zeros((2, 3)))


# --- memory -------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from zooscan.patches import compute_basis

    class Stream:
        key = "stream"
        def __init__(self, n):
            self.n = n
        def batches(self, channels):
            rng = np.random.default_rng(0)
            for _ in range(self.n // 50):
                yield rng.random((50, 3, 64, 64), dtype=np.float32)

    compute_basis(Stream(50), 3, 7, 7)  # warm up allocators and libraries
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    basis = compute_basis(Stream(int(sys.argv[1])), 3, 7, 7)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(basis.n_patches, (peak - base) // 1024)
    """
)


def test_memory_does_not_grow_with_the_number_of_images():
    """Peak memory for 4x the images stays flat; their patch matrix would be 1.7 GB more."""
    results = {}
    for n in (150, 600):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(n)], capture_output=True, text=True, check=True
        )
        patches, growth_mb = map(int, out.stdout.split())
        assert patches == n * 58 * 58
        results[n] = growth_mb
    patch_matrix_mb = 450 * 58 * 58 * 147 * 8 / 2**20
    assert results[600] - results[150] < 32, (results, patch_matrix_mb)
    assert results[600] < 200
