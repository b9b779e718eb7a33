"""The linear CNN's exact gradient-descent dynamics (zooscan.theory), against real training.

A minimal linear CNN (``nn.Conv2d`` without bias -> spatial mean -> sum over the
filters) is trained here by full-batch gradient descent (``torch.optim.SGD``) with
``F.mse_loss`` on random crops of real photographs, normalised per channel; the
closed-form prediction must reproduce the trained first layer at every snapshot.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zooscan import theory
from zooscan.energy import energy_profile, fit_formula, pearson
from zooscan.errors import UserError
from zooscan.patches import compute_basis, extract_patches
from zooscan.records import FirstLayer, LabelledImages, PatchBasis

CROPS, SIZE, FILTERS, STEPS = 96, 24, 6, 200
SNAPSHOTS = (0, 1, 2, 5, 10, 20, 50, 100, 200)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine this trains several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class PhotoSet:
    """Random crops of the photographs: what the linear CNN is trained on."""

    labelled: LabelledImages
    """uint8 crops, label = which photograph."""
    mean: np.ndarray
    std: np.ndarray
    images: np.ndarray
    """float64 ``(n, 3, SIZE, SIZE)``: the crops as the model sees them, ``(p - mean) / std``."""
    targets: np.ndarray
    """``+1`` / ``-1`` by the parity of the photograph's index."""
    basis: PatchBasis
    """Pixel-space 3x3 basis of exactly these crops (``compute_basis``)."""


@dataclass
class Run:
    """One training run of the linear CNN."""

    init: np.ndarray
    snapshots: np.ndarray
    """float64 ``(S, K, 3, 3, 3)`` at :data:`SNAPSHOTS`."""
    losses: np.ndarray
    """Loss before each step."""
    lr: float
    moments: theory.LinearMoments


@pytest.fixture(scope="module")
def photo_set(photos) -> PhotoSet:
    rng = np.random.default_rng(0)
    names = sorted(photos)
    pictures = [np.round(photos[name] * 255).astype(np.uint8) for name in names]
    crops, labels = [], []
    for _ in range(CROPS):
        index = int(rng.integers(len(pictures)))
        picture = pictures[index]
        top = int(rng.integers(picture.shape[0] - SIZE))
        left = int(rng.integers(picture.shape[1] - SIZE))
        crops.append(picture[top : top + SIZE, left : left + SIZE].transpose(2, 0, 1))
        labels.append(index)
    labelled = LabelledImages(np.stack(crops), np.array(labels), tuple(names), "photo-crops")
    pixels = labelled.images.astype(np.float64) / 255.0
    mean, std = pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3))
    images = (pixels - mean[None, :, None, None]) / std[None, :, None, None]
    targets = np.where(labelled.labels % 2 == 0, 1.0, -1.0)
    basis = compute_basis(labelled, 3, 3, 3)
    return PhotoSet(labelled, mean, std, images, targets, basis)


def _linear_cnn(padding: int, dtype: torch.dtype, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    # PyTorch's default init: U(-1/sqrt(27), 1/sqrt(27)) = +-0.19, far from negligible.
    return nn.Conv2d(3, FILTERS, 3, padding=padding, bias=False).to(dtype)


def _train(
    photo_set: PhotoSet, *, padding: int, dtype: torch.dtype, lr_fraction: float, steps: int
) -> Run:
    """Full-batch GD on the MSE; ``lr = lr_fraction * critical_lr``."""
    moments = theory.linear_moments(photo_set.images, photo_set.targets, 3, 3, padding=padding)
    lr = lr_fraction * theory.critical_lr(moments, FILTERS)
    conv = _linear_cnn(padding, dtype)
    init = conv.weight.detach().to(torch.float64).numpy().copy()
    optimizer = torch.optim.SGD(conv.parameters(), lr=lr)
    x = torch.tensor(photo_set.images, dtype=dtype)
    y = torch.tensor(photo_set.targets, dtype=dtype)
    snapshots, losses = [], []
    for step in range(steps + 1):
        if step in SNAPSHOTS or step == steps:
            snapshots.append(conv.weight.detach().to(torch.float64).numpy().copy())
        if step == steps:
            break
        optimizer.zero_grad()
        loss = F.mse_loss(conv(x).mean(dim=(2, 3)).sum(dim=1), y)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    return Run(init, np.stack(snapshots), np.array(losses), lr, moments)


@pytest.fixture(scope="module")
def runs(photo_set) -> Callable[[int, torch.dtype], Run]:
    """Training runs, trained once per module and keyed by ``(padding, dtype name)``."""
    cache: dict[tuple[int, str], Run] = {}

    def get(padding: int, dtype: torch.dtype) -> Run:
        key = (padding, str(dtype))
        if key not in cache:
            cache[key] = _train(
                photo_set, padding=padding, dtype=dtype, lr_fraction=0.4, steps=STEPS
            )
        return cache[key]

    return get


def _layer(photo_set: PhotoSet, weight: np.ndarray) -> FirstLayer:
    return FirstLayer(
        weight=weight.astype(np.float32),
        module="conv",
        mean=tuple(photo_set.mean),
        std=tuple(photo_set.std),
    )


def _iterate(moments: theory.LinearMoments, init: np.ndarray, lr: float, steps: int) -> np.ndarray:
    """The GD recurrence ``delta <- delta - 2 lr (A (S0 + K delta) - b)``, step by step."""
    filters, s0 = init.shape[0], init.sum(axis=0).reshape(-1)
    delta, out = np.zeros_like(s0), [np.zeros_like(s0)]
    for _ in range(steps):
        delta = delta - 2 * lr * (moments.A @ (s0 + filters * delta) - moments.b)
        out.append(delta)
    return np.stack(out)


# --------------------------------------------------------------------------- mean patches


@pytest.mark.parametrize("padding", [(0, 0), (1, 2), 2])
def test_mean_patches_order_matches_conv2d(photo_set, padding, monkeypatch):
    """``mean_patches(x) @ w.reshape(K, -1).T`` is the spatial mean of ``conv2d``: the
    ``(c, kh, kw)`` order of the weight, for a non-square kernel, with padding, across
    several chunks."""
    monkeypatch.setattr(theory, "CHUNK_BYTES", 40_000)  # a few images per chunk
    x = torch.tensor(photo_set.images[:20, :, :, :21])  # non-square images
    weight = torch.randn(
        5, 3, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    pad = (padding, padding) if isinstance(padding, int) else padding
    expected = F.conv2d(x, weight, padding=pad).mean(dim=(2, 3)).numpy()
    means = theory.mean_patches(x.numpy(), 3, 5, padding=padding)
    assert means.shape == (20, 45) and means.dtype == np.float64
    np.testing.assert_allclose(means @ weight.reshape(5, -1).numpy().T, expected, atol=1e-12)
    np.testing.assert_array_equal(theory.mean_patches(x, 3, 5, padding=padding), means)


def test_mean_patches_is_the_mean_of_all_windows(photo_set):
    """Without padding it is the mean of ``extract_patches``' rows; with padding, of the
    unfolded windows of the zero-padded image."""
    x = photo_set.images[:7]
    windows = extract_patches(x, 3, 3).reshape(7, -1, 27)
    np.testing.assert_allclose(theory.mean_patches(x, 3, 3), windows.mean(axis=1), atol=1e-13)
    unfolded = F.unfold(torch.tensor(x), (2, 3), padding=(1, 1))  # (n, d, L)
    np.testing.assert_allclose(
        theory.mean_patches(x, 2, 3, padding=1), unfolded.mean(dim=2).numpy(), atol=1e-13
    )


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize("padding", [0, 1])
def test_moments_give_the_autograd_gradient_and_the_loss(photo_set, padding):
    """Every factor: ``dL/dw_k = 2 (A S - b)`` for each ``k``, and ``L = S'AS - 2b'S + E[y^2]``."""
    moments = theory.linear_moments(photo_set.images, photo_set.targets, 3, 3, padding=padding)
    assert moments.shape == (3, 3, 3) and moments.padding == (padding, padding)
    assert moments.windows == (SIZE + 2 * padding - 2) ** 2 and moments.n_images == CROPS
    conv = _linear_cnn(padding, torch.float64, seed=3)
    x, y = torch.tensor(photo_set.images), torch.tensor(photo_set.targets)
    loss = F.mse_loss(conv(x).mean(dim=(2, 3)).sum(dim=1), y)
    loss.backward()
    total = conv.weight.detach().sum(dim=0).reshape(-1).numpy()
    gradient = 2 * (moments.A @ total - moments.b)
    for k in range(FILTERS):
        np.testing.assert_allclose(conv.weight.grad[k].reshape(-1).numpy(), gradient, atol=1e-12)
    assert moments.loss(total) == pytest.approx(loss.item(), rel=1e-12)
    assert moments.target_mean_square == pytest.approx(1.0)


def test_moments_of_a_tensor_equal_those_of_an_array(photo_set):
    x, y = photo_set.images[:30], photo_set.targets[:30]
    from_array = theory.linear_moments(x, y, 3, 3, padding=1)
    from_tensor = theory.linear_moments(torch.tensor(x), torch.tensor(y), 3, 3, padding=1)
    np.testing.assert_allclose(from_tensor.A, from_array.A, atol=1e-14)
    np.testing.assert_allclose(from_tensor.b, from_array.b, atol=1e-14)
    np.testing.assert_array_equal(from_array.A, from_array.A.T)


# --------------------------------------------------------------------------- vs training


@pytest.mark.parametrize("padding", [0, 1])
def test_prediction_equals_float64_training(photo_set, runs, padding):
    """The closed form is the trained update to rounding, every filter moves by the same
    vector, the profiles agree at every snapshot, and the init term ``A S0`` matters."""
    run = runs(padding, torch.float64)
    updates = run.snapshots - run.snapshots[0]
    predicted = theory.gd_trajectory(run.moments, run.init, run.lr, SNAPSHOTS)
    assert predicted.shape == (len(SNAPSHOTS), 3, 3, 3)
    scale = np.abs(predicted).max()
    np.testing.assert_allclose(updates, np.broadcast_to(predicted[:, None], updates.shape),
                               rtol=0, atol=1e-10 * scale)  # fmt: skip
    agreement = theory.trajectory_agreement(
        updates, predicted, photo_set.basis, layer=_layer(photo_set, run.snapshots[-1])
    )
    assert np.isnan(agreement.r[0]) and agreement.relative_error[0] == 0
    assert np.all(agreement.r[1:] >= 0.999) and np.all(agreement.r[1:] > 1 - 1e-9)
    assert np.all(agreement.relative_error < 1e-9) and np.all(agreement.filter_spread[1:] < 1e-9)
    # the same, through the plain energy pipeline on pixel-space weights
    std = photo_set.std[None, :, None, None]
    for i in range(1, len(SNAPSHOTS)):
        trained = energy_profile(run.snapshots[i] / std, photo_set.basis, init=run.init / std)
        alone = energy_profile(predicted[i][None] / std, photo_set.basis)
        assert pearson(trained, alone) > 1 - 1e-9
    # the losses GD went through
    losses = theory.predicted_loss(run.moments, run.init, theory.gd_trajectory(
        run.moments, run.init, run.lr, range(STEPS)))  # fmt: skip
    np.testing.assert_allclose(losses, run.losses, rtol=1e-10)
    # ignoring the non-negligible init (S0 = 0) gives a clearly different update
    no_init = theory.gd_trajectory(run.moments, np.zeros_like(run.init), run.lr, SNAPSHOTS)
    assert np.linalg.norm(no_init - predicted) > 0.3 * np.linalg.norm(predicted)
    wrong = theory.trajectory_agreement(updates, no_init, photo_set.basis)
    assert np.nanmin(wrong.r) < 0.9


@pytest.mark.parametrize("padding", [0, 1])
def test_prediction_matches_float32_training(photo_set, runs, padding):
    run = runs(padding, torch.float32)
    updates = run.snapshots - run.snapshots[0]
    predicted = theory.gd_trajectory(run.moments, run.init, run.lr, SNAPSHOTS)
    agreement = theory.trajectory_agreement(
        updates, predicted, photo_set.basis, layer=_layer(photo_set, run.snapshots[-1])
    )
    assert np.all(agreement.r[1:] >= 0.999)
    assert np.all(agreement.relative_error < 1e-3) and np.all(agreement.filter_spread[1:] < 1e-3)
    as_json = json.loads(json.dumps(agreement.as_dict()))
    assert as_json["r"][0] is None and as_json["r"][-1] == pytest.approx(1.0, abs=1e-3)


def test_oscillating_but_convergent_lr_matches_training(photo_set):
    """``1/(2 K alpha_max) < lr < 1/(K alpha_max)``: the top direction overshoots every
    step (``1 - x < 0``); the closed form follows, without a warning."""
    run = _train(photo_set, padding=0, dtype=torch.float64, lr_fraction=0.9, steps=20)
    steps = [s for s in SNAPSHOTS if s <= 20]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predicted = theory.gd_trajectory(run.moments, run.init, run.lr, steps)
    updates = run.snapshots - run.snapshots[0]
    np.testing.assert_allclose(updates, np.broadcast_to(predicted[:, None], updates.shape),
                               rtol=0, atol=1e-10 * np.abs(predicted).max())  # fmt: skip


def test_divergent_lr_warns_and_still_follows_gradient_descent(photo_set):
    moments = theory.linear_moments(photo_set.images, photo_set.targets, 3, 3)
    init = _linear_cnn(0, torch.float64).weight.detach().numpy()
    lr = 1.2 * theory.critical_lr(moments, FILTERS)
    with pytest.warns(theory.DivergenceWarning, match="diverges"):
        predicted = theory.gd_trajectory(moments, init, lr, range(31))
    iterated = _iterate(moments, init, lr, 30)
    np.testing.assert_allclose(predicted.reshape(31, -1), iterated, rtol=1e-8, atol=1e-12)
    assert np.linalg.norm(iterated[-1]) > 1e3 * np.linalg.norm(iterated[1])
    with pytest.warns(theory.DivergenceWarning), np.errstate(all="ignore"):
        far = theory.gd_trajectory(moments, init, lr, [100_000])
    assert not np.all(np.isfinite(far))  # the overflow is shown, not hidden


def test_zero_eigenvalues_grow_linearly_and_tiny_ones_continuously():
    """A singular ``A`` with ``b`` outside its range: GD moves those coordinates by the
    same amount every step, which the closed form must give (``t c_i``), and an
    eigenvalue of 1e-13 must give the same to first order."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    b, init = rng.normal(size=4), rng.normal(size=(2, 4, 1, 1))
    for alphas in ([3.0, 1.0, 0.0, 0.0], [3.0, 1.0, 1e-13, 0.0]):
        moments = theory.LinearMoments(
            A=q @ np.diag(alphas) @ q.T, b=b, target_mean_square=1.0, n_images=1,
            windows=1, shape=(4, 1, 1), padding=(0, 0),
        )  # fmt: skip
        lr = 0.05
        predicted = theory.gd_trajectory(moments, init, lr, range(401)).reshape(401, 4)
        iterated = _iterate(moments, init, lr, 400)
        np.testing.assert_allclose(predicted, iterated, rtol=1e-9, atol=1e-9)
        null = q[:, 3]
        increment = 2 * lr * null @ b
        np.testing.assert_allclose(predicted @ null, increment * np.arange(401), rtol=1e-9)


def test_long_runs_reach_the_least_squares_filter():
    """For a full-rank ``A`` and ``t -> inf`` the filters' sum reaches ``A^-1 b``: the
    update is ``(A^-1 b - S0) / K``, computed without overflow at ``t = 10^12``."""
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    moments = theory.LinearMoments(
        A=q @ np.diag([3.0, 1.0, 0.5, 1e-3]) @ q.T, b=rng.normal(size=4), target_mean_square=1.0,
        n_images=1, windows=1, shape=(4, 1, 1), padding=(0, 0),
    )  # fmt: skip
    init = rng.normal(size=(3, 4, 1, 1))
    delta = theory.gd_trajectory(moments, init, 0.1, [10**12]).reshape(4)
    expected = (np.linalg.solve(moments.A, moments.b) - init.sum(axis=0).reshape(4)) / 3
    np.testing.assert_allclose(delta, expected, rtol=1e-9)
    residual = theory.predicted_loss(moments, init, delta.reshape(1, 4, 1, 1))[0]
    assert residual == pytest.approx(1.0 - moments.b @ np.linalg.solve(moments.A, moments.b))


def test_t0_is_zero_and_steps_may_repeat(photo_set, runs):
    run = runs(0, torch.float64)
    predicted = theory.gd_trajectory(run.moments, run.init, run.lr, [5, 0, 5])
    assert np.all(predicted[1] == 0)
    np.testing.assert_array_equal(predicted[0], predicted[2])
    snapshots = theory.predicted_snapshots(run.init, predicted)
    assert snapshots.shape == (3, FILTERS, 3, 3, 3)
    np.testing.assert_allclose(snapshots[0], run.snapshots[SNAPSHOTS.index(5)], atol=1e-12)


# --------------------------------------------------------------------------- spectra and s


@pytest.mark.parametrize("centered", [True, False])
def test_input_space_basis_is_the_basis_of_the_normalised_images(photo_set, centered):
    class Normalised:
        key = "normalised"

        def batches(self, channels):
            yield photo_set.images.astype(np.float32)

    pixel = compute_basis(photo_set.labelled, 3, 3, 3, centered=centered)
    derived = theory.input_space_basis(pixel, mean=photo_set.mean, std=photo_set.std)
    direct = compute_basis(Normalised(), 3, 3, 3, centered=centered)
    np.testing.assert_allclose(derived.eigenvalues, direct.eigenvalues, rtol=1e-5, atol=1e-9)
    # well-separated leading components agree, signs included (same convention)
    np.testing.assert_allclose(derived.components[:, :4], direct.components[:, :4], atol=1e-4)
    assert derived.id.startswith("photo-crops@norm(") and derived.centered == centered
    unchanged = theory.input_space_basis(pixel)
    np.testing.assert_allclose(unchanged.eigenvalues, pixel.eigenvalues, rtol=1e-12)


def test_implied_s_equals_s_from_moments_when_windows_are_uncorrelated():
    """With 1x1 windows of white noise the paper's assumption holds (``A = Sigma / J``
    up to sampling): both ways of computing ``s`` agree."""
    rng = np.random.default_rng(7)
    sigma = np.array([2.0, 1.0, 0.5])
    images = rng.normal(size=(400, 3, 12, 12)) * sigma[None, :, None, None]
    moments = theory.linear_moments(images, rng.normal(size=400), 1, 1)
    assert moments.windows == 144
    from_moments = theory.s_from_moments(moments, 1e-3, 8, [10, 1000])
    implied = theory.implied_s(1e-3, 8, [10, 1000], patch_eigenvalue_max=4.0, windows=144)
    np.testing.assert_allclose(implied, [2e-3 * 8 * 10 * 4 / 144, 2e-3 * 8 * 1000 * 4 / 144])
    np.testing.assert_allclose(from_moments, implied, rtol=0.15)
    assert isinstance(theory.implied_s(1e-3, 8, 10, patch_eigenvalue_max=4.0, windows=144), float)


def test_formula_fit_of_the_trained_linear_cnn_on_photographs(photo_set, runs):
    """The paper's one-parameter closed form against the trained profile, per snapshot.

    Measured (printed with ``-s``): early snapshots are fitted at r >= 0.9 (the profile
    still follows the patch spectrum); later the fit degrades, because overlapping
    windows of natural images are strongly correlated, so ``A`` is far from ``Sigma/J``
    — which shows as ``s_from_moments >> implied_s``.
    """
    run = runs(0, torch.float64)
    model_basis = theory.input_space_basis(photo_set.basis, mean=photo_set.mean, std=photo_set.std)
    updates = run.snapshots - run.snapshots[0]
    profiles = {
        "pixel": theory.update_profiles(
            updates, photo_set.basis, layer=_layer(photo_set, run.init)
        ),
        "model": theory.update_profiles(updates, model_basis),
    }
    spaces = {"pixel": photo_set.basis, "model": model_basis}
    rows = []
    for space, basis in spaces.items():
        fits = [fit_formula(profile, basis.lambdas) for profile in profiles[space][1:]]
        implied = theory.implied_s(
            run.lr, FILTERS, SNAPSHOTS[1:],
            patch_eigenvalue_max=model_basis.eigenvalues[0], windows=run.moments.windows,
        )  # fmt: skip
        from_moments = theory.s_from_moments(run.moments, run.lr, FILTERS, SNAPSHOTS[1:])
        for t, fit, s_implied, s_moments in zip(SNAPSHOTS[1:], fits, implied, from_moments,
                                               strict=True):  # fmt: skip
            rows.append((space, t, fit.r, fit.r_lambda, fit.r_inv_lambda, fit.s, s_implied,
                         s_moments))  # fmt: skip
        early = [fit.r for t, fit in zip(SNAPSHOTS[1:], fits, strict=True) if t <= 10]
        assert min(early) >= 0.9
        # the fit's s range ends at S_MIN, where the formula equals lambda to 5e-5
        assert all(fit.r >= max(fit.r_lambda, fit.r_inv_lambda) - 1e-4 for fit in fits)
        assert np.all(from_moments > 10 * implied)  # correlated windows: A >> Sigma / J
    print("\nspace   t     r  r(lam) r(1/lam)   s_fit   implied  from_moments")
    for row in rows:
        print("{:5s} {:4d} {:6.3f} {:6.3f} {:7.3f} {:8.3g} {:9.3g} {:9.3g}".format(*row))


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_user_errors(photo_set):
    x, y = photo_set.images[:4], photo_set.targets[:4]
    moments = theory.linear_moments(x, y, 3, 3)
    init = np.zeros((2, 3, 3, 3))
    cases = [
        lambda: theory.mean_patches(x[0], 3, 3),
        lambda: theory.mean_patches(x, 3, 3, padding=-1),
        lambda: theory.mean_patches(x[:, :, :2], 3, 3),
        lambda: theory.linear_moments(x, y[:3], 3, 3),
        lambda: theory.linear_moments(x, np.full(4, np.nan), 3, 3),
        lambda: theory.gd_trajectory(moments, np.zeros((2, 3, 5, 5)), 0.1, [1]),
        lambda: theory.gd_trajectory(moments, init, 0.0, [1]),
        lambda: theory.gd_trajectory(moments, init, 0.1, [-1]),
        lambda: theory.gd_trajectory(moments, init, 0.1, [1.5]),
        lambda: theory.implied_s(0.1, 0, 10, patch_eigenvalue_max=1.0, windows=9),
        lambda: theory.input_space_basis(photo_set.basis, std=(1.0, 0.0, 1.0)),
        lambda: theory.update_profiles(np.zeros((2, 27)), photo_set.basis),
    ]
    for case in cases:
        with pytest.raises(UserError):
            case()
    # padding=1 makes 2x2 images big enough for a 3x3 kernel
    assert theory.mean_patches(x[:, :, :2, :2], 3, 3, padding=1).shape == (4, 27)
