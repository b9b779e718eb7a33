"""The paper's linear CNN: its exact gradient-descent dynamics and the implied ``s``.

The model (Chowers & Weiss, ICML 2023, §4 / App. A). ``K`` filters ``w_k`` of shape
``(C, kh, kw)`` (stride 1, zero padding ``padding``, no bias) are applied to all ``J``
windows of an image ``x``, followed by global average pooling and a *fixed* (untrained)
sum over the ``K`` channels::

    y_hat(x) = sum_k (1/J) sum_j p_j(x) . w_k = p_bar(x) . S,      S = sum_k w_k,

where ``p_j(x)`` is the ``j``-th window flattened in ``(c, kh, kw)`` order (the order of
``weight.reshape(K, -1)``) and ``p_bar(x)`` their mean (:func:`mean_patches`). The loss
is the mean squared error over the ``N`` training images (``torch.nn.functional.
mse_loss``, mean reduction), ``L = (1/N) sum_x (y_hat(x) - y(x))^2``, minimised by
full-batch gradient descent with learning rate ``eta``: ``w_k <- w_k - eta dL/dw_k``.

Derivation. ``dL/dw_k = (2/N) sum_x (p_bar . S - y) p_bar = 2 (A S - b)`` with::

    A = (1/N) sum_x p_bar(x) p_bar(x)^T,     b = (1/N) sum_x p_bar(x) y(x)

(:func:`linear_moments`). The gradient does not depend on ``k``, so every filter moves
by the same vector ``delta(t) = w_k(t) - w_k(0)`` (the learned update is rank one), and
``S(t) = S0 + K delta(t)`` with ``S0 = sum_k w_k(0)``. Hence::

    delta(t+1) = (I - 2 eta K A) delta(t) + 2 eta (b - A S0),   delta(0) = 0,
    delta(t)   = sum_{n<t} (I - 2 eta K A)^n  2 eta (b - A S0).

With ``A = Q diag(alpha) Q^T`` and ``c = Q^T 2 eta (b - A S0)`` this is, coordinate by
coordinate, ``delta_i(t) = c_i (1 - (1 - x_i)^t) / x_i`` with ``x_i = 2 eta K alpha_i``
(``t c_i`` when ``alpha_i = 0``): :func:`gd_trajectory`. The factor 2 of the squared
error, ``K`` and the init term ``A S0`` are all kept; the paper drops the 2, absorbs
``K`` into ``eta`` and takes ``S0 -> 0``.

GD converges iff ``eta < 1 / (K alpha_max)`` (:func:`critical_lr`), and every
coordinate approaches its limit monotonically (without alternating sign) iff
``eta <= 1 / (2 K alpha_max)``.

The paper's closed form (Eq. 3, :func:`zooscan.energy.formula_profile`) further
assumes zero-mean patches that are uncorrelated within an image, so that
``A ~= Sigma / J`` with ``Sigma`` the patch covariance in the model's input space
(eigenvalues ``lambda_i^2``): then ``x_i = 2 eta K lambda_i^2 / J`` and the
dimensionless ``s = a t lambda_max^2`` of the formula is :func:`implied_s`. Natural
images violate the assumption (overlapping windows are strongly correlated, and image
means vary), so :func:`s_from_moments` gives the same quantity from ``A``'s own top
eigenvalue; their ratio ``J alpha_max / lambda_max^2`` measures the violation.

Only torch and numpy are used; the module knows no model library.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zooscan.energy import energy_profile, finite_float64, pearson, to_pixel_space
from zooscan.errors import UserError
from zooscan.patches import eigh_sorted, image_tensor
from zooscan.records import FirstLayer, PatchBasis

__all__ = [
    "DivergenceWarning",
    "LinearMoments",
    "TrajectoryAgreement",
    "critical_lr",
    "gd_trajectory",
    "implied_s",
    "input_space_basis",
    "linear_moments",
    "mean_patches",
    "predicted_loss",
    "predicted_snapshots",
    "s_from_moments",
    "trajectory_agreement",
    "update_profiles",
]

CHUNK_BYTES = 32 * 2**20
"""Upper bound (bytes) on the float64 working set of one chunk of images in
:func:`mean_patches` and :func:`linear_moments`."""


class DivergenceWarning(RuntimeWarning):
    """Gradient descent with this learning rate does not converge (``eta >= 1/(K alpha_max)``)."""


# --------------------------------------------------------------------------- mean patches


def mean_patches(
    images: np.ndarray | torch.Tensor,
    kh: int,
    kw: int,
    *,
    padding: int | tuple[int, int] = (0, 0),
) -> np.ndarray:
    """The mean window ``p_bar(x)`` of each image: float64 ``(n, C * kh * kw)``.

    The mean over all stride-1 ``kh x kw`` windows of the image zero-padded by
    ``padding = (ph, pw)`` (an ``int`` pads both sides equally), flattened in
    ``(c, kh, kw)`` order, the order of ``weight.reshape(K, -1)``: so
    ``mean_patches(x) @ w.reshape(-1)`` is the spatial mean of ``conv2d(x, w,
    padding=padding)``. Entry ``(c, i, j)`` is a box sum of the image (through an
    integral image), so no patch is ever materialised; images are processed in chunks
    of at most :data:`CHUNK_BYTES`. ``images`` is a real array or tensor ``(n, C, H,
    W)`` (a tensor stays on its device), exactly as the model sees it.
    """
    parts = [chunk.cpu().numpy() for chunk in _mean_patch_chunks(images, kh, kw, padding)]
    channels = _image_tensor(images).shape[1]
    return np.concatenate(parts) if parts else np.zeros((0, channels * kh * kw))


def _mean_patch_chunks(
    images: np.ndarray | torch.Tensor, kh: int, kw: int, padding: int | tuple[int, int]
) -> Iterator[torch.Tensor]:
    """:func:`mean_patches` chunk by chunk, as float64 tensors on the images' device."""
    x = _image_tensor(images)
    ph, pw = _padding(padding)
    _check_kernel(kh, kw)
    n, channels, height, width = x.shape
    hout, wout = height + 2 * ph - kh + 1, width + 2 * pw - kw + 1
    if hout < 1 or wout < 1:
        raise UserError(
            f"a {kh}x{kw} kernel does not fit {height}x{width} images padded by ({ph}, {pw})"
        )
    per_image = 3 * 8 * channels * (height + 2 * ph + 1) * (width + 2 * pw + 1)
    chunk = max(1, CHUNK_BYTES // per_image)
    for start in range(0, n, chunk):
        tile = x[start : start + chunk].to(torch.float64)
        if not bool(torch.isfinite(tile).all()):
            raise UserError("images contain NaN or infinite values")
        padded = F.pad(tile, (pw, pw, ph, ph))
        integral = F.pad(padded.cumsum(2).cumsum(3), (1, 0, 1, 0))  # (n, C, H'+1, W'+1)
        sums = (
            integral[:, :, hout : hout + kh, wout : wout + kw]
            - integral[:, :, :kh, wout : wout + kw]
            - integral[:, :, hout : hout + kh, :kw]
            + integral[:, :, :kh, :kw]
        )
        yield sums.reshape(tile.shape[0], channels * kh * kw) / (hout * wout)


# --------------------------------------------------------------------------- moments


@dataclass(frozen=True)
class LinearMoments:
    """What the linear CNN's gradient-descent dynamics depend on (float64).

    ``A = (1/N) sum_x p_bar p_bar^T`` and ``b = (1/N) sum_x p_bar y`` over the ``N``
    training images (see the module docstring), in the model's input space.
    """

    A: np.ndarray
    """``(d, d)`` second moment of the mean windows."""
    b: np.ndarray
    """``(d,)`` cross moment of the mean windows with the targets."""
    target_mean_square: float
    """``(1/N) sum_x y(x)^2``: with ``A`` and ``b`` it gives the loss exactly."""
    n_images: int
    """``N``."""
    windows: int
    """``J``: windows per image (``Hout * Wout``)."""
    shape: tuple[int, int, int]
    """``(C, kh, kw)`` of the filters."""
    padding: tuple[int, int]
    """``(ph, pw)`` zero padding of the convolution."""

    @property
    def dim(self) -> int:
        """``d = C * kh * kw``."""
        c, kh, kw = self.shape
        return c * kh * kw

    @property
    def alpha_max(self) -> float:
        """The largest eigenvalue of ``A``."""
        return float(np.linalg.eigvalsh(self.A)[-1])

    def loss(self, total_filter: np.ndarray) -> float:
        """The training loss ``S^T A S - 2 b^T S + E[y^2]`` of filters summing to ``S``."""
        s = np.asarray(total_filter, dtype=np.float64).reshape(self.dim)
        return float(s @ self.A @ s - 2.0 * self.b @ s + self.target_mean_square)


def linear_moments(
    images: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    kh: int,
    kw: int,
    *,
    padding: int | tuple[int, int] = (0, 0),
) -> LinearMoments:
    """``A``, ``b`` and ``E[y^2]`` of a training set for the linear CNN, in float64.

    ``images`` ``(N, C, H, W)`` are exactly what the model sees (already normalised),
    ``targets`` ``(N,)`` the scalar labels it regresses. Streams the images in chunks
    (see :func:`mean_patches`); a tensor is processed on its own device.
    """
    x = _image_tensor(images)
    y = _target_tensor(targets)
    if y.shape[0] != x.shape[0]:
        raise UserError(f"{x.shape[0]} images but {y.shape[0]} targets (one scalar per image)")
    if x.shape[0] == 0:
        raise UserError("no training images: the moments are undefined")
    if not bool(torch.isfinite(y).all()):
        raise UserError("targets contain NaN or infinite values")
    ph, pw = _padding(padding)
    _, channels, height, width = x.shape
    d = channels * kh * kw
    second = torch.zeros((d, d), dtype=torch.float64, device=x.device)
    cross = torch.zeros(d, dtype=torch.float64, device=x.device)
    start = 0
    for chunk in _mean_patch_chunks(x, kh, kw, (ph, pw)):
        labels = y[start : start + chunk.shape[0]].to(x.device)
        second += chunk.T @ chunk
        cross += chunk.T @ labels
        start += chunk.shape[0]
    n = x.shape[0]
    a = second.cpu().numpy() / n
    return LinearMoments(
        A=0.5 * (a + a.T),
        b=cross.cpu().numpy() / n,
        target_mean_square=float((y @ y).item() / n),
        n_images=int(n),
        windows=int((height + 2 * ph - kh + 1) * (width + 2 * pw - kw + 1)),
        shape=(int(channels), int(kh), int(kw)),
        padding=(ph, pw),
    )


# --------------------------------------------------------------------------- dynamics


def critical_lr(moments: LinearMoments, filters: int) -> float:
    """``1 / (K alpha_max)``: full-batch GD converges iff ``lr`` is below it.

    Below half of it every coordinate of ``delta`` also moves monotonically (no
    alternating overshoot). ``inf`` when ``A = 0``.
    """
    _check_filters(filters)
    return _critical(moments.alpha_max, filters)


def _critical(alpha_max: float, filters: int) -> float:
    return math.inf if alpha_max <= 0 else 1.0 / (filters * alpha_max)


def gd_trajectory(
    moments: LinearMoments,
    init_weight: np.ndarray | torch.Tensor,
    lr: float,
    steps: Sequence[int],
) -> np.ndarray:
    """The exact update ``delta(t) = w_k(t) - w_k(0)`` (the same for every ``k``).

    Returns float64 ``(len(steps), C, kh, kw)``, one row per requested step count ``t``
    (any order, repeats allowed), in the model's input space. ``init_weight`` is the
    initial ``(K, C, kh, kw)`` weight (its sum ``S0`` enters through ``A S0``), ``lr``
    the learning rate ``eta``. Closed form through the eigendecomposition of ``A``
    (module docstring): ``delta_i(t) = c_i (1 - (1 - x_i)^t) / x_i``, evaluated as
    ``-expm1(t log1p(-x_i)) / x_i`` (accurate for tiny ``x_i``) and as ``t c_i`` for
    ``alpha_i = 0`` (the exact limit: those coordinates grow linearly in ``t``).

    For ``lr >= critical_lr(moments, K)`` gradient descent diverges; the trajectory is
    still computed (it grows like ``|1 - x_max|^t`` and may overflow to ``inf``/``nan``,
    as the trained weights would) and a :class:`DivergenceWarning` is issued.
    """
    init = finite_float64(init_weight, "init_weight", error=UserError)
    if init.ndim != 4 or tuple(init.shape[1:]) != moments.shape:
        c, kh, kw = moments.shape
        raise UserError(
            f"init_weight must be (K, {c}, {kh}, {kw}) for these moments, got {init.shape}"
        )
    filters = init.shape[0]
    _check_filters(filters)
    eta = _check_lr(lr)
    t = _check_steps(steps)
    alpha, q = np.linalg.eigh(moments.A)
    limit = _critical(float(alpha[-1]), filters)
    if eta >= limit:
        warnings.warn(
            f"learning rate {eta:g} >= 1/(K alpha_max) = {limit:g}: "
            "gradient descent on the linear CNN diverges",
            DivergenceWarning,
            stacklevel=2,
        )
    s0 = init.sum(axis=0).reshape(moments.dim)
    coefficients = q.T @ (2.0 * eta * (moments.b - moments.A @ s0))
    gains = _geometric_sums(2.0 * eta * filters * alpha, t)  # (S, d)
    with np.errstate(over="ignore", invalid="ignore"):
        delta = (gains * coefficients[None, :]) @ q.T
    return delta.reshape((t.size, *moments.shape))


def _geometric_sums(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``G[s, i] = sum_{n < t_s} (1 - x_i)^n``, accurately for every real ``x_i``."""
    steps = t.astype(np.float64)[:, None]
    x = x[None, :]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        below = x < 1.0
        log_ratio = np.log1p(-np.where(below, x, 0.0))  # log(1 - x) where it is defined
        small = -np.expm1(steps * log_ratio) / x
        large = (1.0 - np.power(1.0 - x, steps)) / x
        gains = np.where(below, small, large)
    return np.where(x == 0.0, steps, gains)


def predicted_snapshots(
    init_weight: np.ndarray | torch.Tensor, trajectory: np.ndarray
) -> np.ndarray:
    """The predicted weights ``w_k(t) = w_k(0) + delta(t)``: float64 ``(S, K, C, kh, kw)``."""
    init = finite_float64(init_weight, "init_weight", error=UserError)
    delta = np.asarray(trajectory, dtype=np.float64)
    if delta.ndim != 4 or delta.shape[1:] != init.shape[1:]:
        raise UserError(f"trajectory {delta.shape} does not fit init_weight {init.shape}")
    return init[None] + delta[:, None]


def predicted_loss(
    moments: LinearMoments, init_weight: np.ndarray | torch.Tensor, trajectory: np.ndarray
) -> np.ndarray:
    """The training loss at each snapshot of ``trajectory`` (from :func:`gd_trajectory`)."""
    init = finite_float64(init_weight, "init_weight", error=UserError)
    totals = init.sum(axis=0)[None] + init.shape[0] * np.asarray(trajectory, dtype=np.float64)
    return np.array([moments.loss(total) for total in totals])


# --------------------------------------------------------------------------- implied s


def implied_s(
    lr: float, filters: int, steps: Any, *, patch_eigenvalue_max: float, windows: int
) -> float | np.ndarray:
    """The formula's ``s`` implied by the paper's assumptions: ``2 eta K t lambda_max^2 / J``.

    :func:`zooscan.energy.formula_profile` is ``e_i ∝ (1 - exp(-s (lambda_i /
    lambda_max)^2)) / lambda_i`` with ``s = a t lambda_max^2``. With zero-mean patches
    uncorrelated within an image, ``A = Sigma / J``, so the per-step rate on component
    ``i`` is ``x_i = 2 eta K lambda_i^2 / J`` and ``a = 2 eta K / J``.

    ``patch_eigenvalue_max`` is ``lambda_max^2``: the largest eigenvalue of the
    covariance of the ``(C, kh, kw)`` patches *in the model's input space* (the
    normalised images the model sees, as ``A`` is), i.e. ``input_space_basis(basis,
    mean=..., std=...).eigenvalues[0]`` for a pixel-space ``basis`` — not the
    eigenvalue of a pixel-space basis, unless the model sees raw pixels. ``s`` itself
    is dimensionless and the same in any space related by a uniform scale. ``windows``
    is ``J`` and ``steps`` a step count or an array of them (the result has its shape).
    """
    _check_filters(filters)
    eta = _check_lr(lr)
    if not (math.isfinite(patch_eigenvalue_max) and patch_eigenvalue_max >= 0):
        raise UserError(f"patch_eigenvalue_max must be finite and >= 0, got {patch_eigenvalue_max}")
    if windows < 1:
        raise UserError(f"windows (J) must be >= 1, got {windows}")
    value = (
        2.0 * eta * filters * np.asarray(steps, dtype=np.float64) * patch_eigenvalue_max / windows
    )
    return float(value) if value.ndim == 0 else value


def s_from_moments(
    moments: LinearMoments, lr: float, filters: int, steps: Any
) -> float | np.ndarray:
    """``2 eta K t alpha_max``: the same rate as :func:`implied_s` from ``A`` itself.

    Needs no assumption on the patches: ``x_max = 2 eta K alpha_max`` is the exact
    per-step rate of ``A``'s top eigendirection. It equals :func:`implied_s` when
    ``A = Sigma / J``; the ratio of the two is ``J alpha_max / lambda_max^2``.
    """
    _check_filters(filters)
    value = 2.0 * _check_lr(lr) * filters * np.asarray(steps, dtype=np.float64) * moments.alpha_max
    return float(value) if value.ndim == 0 else value


def input_space_basis(
    basis: PatchBasis, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> PatchBasis:
    """The patch basis of the model's input ``x = (pixel - mean[c]) / std[c]``.

    Derived exactly from ``basis`` (pixel space, channels in its own order) through its
    mean patch and second moment: with ``D = diag(std)`` per patch entry and ``m`` the
    normalisation mean per entry, the input-space patches have mean ``D^-1 (mu - m)``
    and second moment ``D^-1 (M - mu m^T - m mu^T + m m^T) D^-1``; the covariance is
    ``D^-1 Sigma D^-1``. Centering follows ``basis``. ``None`` means mean 0 / std 1; a
    single value applies to every channel. The dataset key gains a ``@norm(...)`` suffix.
    """
    channels, kh, kw = basis.shape_key
    mean_c = _per_channel(mean, channels, "mean", default=0.0)
    std_c = _per_channel(std, channels, "std", default=1.0)
    if np.any(std_c <= 0):
        raise UserError(f"std must be positive, got {tuple(std_c)}")
    scale = np.repeat(1.0 / std_c, kh * kw)
    m = np.repeat(mean_c, kh * kw)
    mu = np.asarray(basis.mean, dtype=np.float64)
    second = np.asarray(basis.second_moment, dtype=np.float64)
    pixel_second = second - np.outer(mu, m) - np.outer(m, mu) + np.outer(m, m)
    new_second = scale[:, None] * pixel_second * scale[None, :]
    new_mean = scale * (mu - m)
    target = new_second - np.outer(new_mean, new_mean) if basis.centered else new_second
    eigenvalues, components = eigh_sorted(0.5 * (target + target.T), clip=True)
    label = ",".join(f"{v:.6g}" for v in mean_c) + ";" + ",".join(f"{v:.6g}" for v in std_c)
    return dataclasses.replace(
        basis,
        dataset=f"{basis.dataset}@norm({label})",
        components=components,
        eigenvalues=eigenvalues,
        mean=new_mean,
        second_moment=0.5 * (new_second + new_second.T),
    )


# --------------------------------------------------------------------------- comparison


def update_profiles(
    updates: np.ndarray | torch.Tensor, basis: PatchBasis, *, layer: FirstLayer | None = None
) -> np.ndarray:
    """Energy profiles ``(S, d)`` of per-snapshot updates (init already subtracted).

    ``updates`` is ``(S, C, kh, kw)`` (one update shared by every filter, as
    :func:`gd_trajectory` gives; its profile equals that of ``K`` copies) or ``(S, K, C,
    kh, kw)`` (e.g. ``snapshots - snapshots[0]`` of a run), in the model's input space.
    With ``layer`` each snapshot is first mapped like that layer's weight by
    :func:`zooscan.energy.to_pixel_space` (``w[c] / std[c]``, BGR reversed): pass the
    run's layer and a pixel-space ``basis``. Without it the updates are projected as
    they are (use an input-space basis). An all-zero update (``t = 0``) has an all-zero
    profile.
    """
    array = finite_float64(updates, "updates", error=UserError)
    if array.ndim == 4:
        array = array[:, None]
    if array.ndim != 5:
        raise UserError(f"updates must be (S, C, kh, kw) or (S, K, C, kh, kw), got {array.shape}")
    rows = []
    for snapshot in array:
        weight = (
            snapshot
            if layer is None
            else to_pixel_space(dataclasses.replace(layer, weight=snapshot))
        )
        rows.append(energy_profile(weight, basis))
    return np.stack(rows) if rows else np.zeros((0, basis.dim))


@dataclass(frozen=True)
class TrajectoryAgreement:
    """How well trained updates match predicted ones, snapshot by snapshot."""

    r: np.ndarray
    """``(S,)`` Pearson r of the two energy profiles (``nan`` where one is all zero, e.g.
    at ``t = 0``)."""
    relative_error: np.ndarray
    """``(S,)`` ``||trained - predicted|| / ||predicted||`` over all filters (Frobenius,
    in the model's input space); 0 where both are zero, ``inf`` where only ``predicted``
    is."""
    filter_spread: np.ndarray
    """``(S,)`` ``max_k ||u_k - mean_k u|| / ||mean_k u||`` of the trained updates
    ``u_k``: 0 when every filter moved by the same vector (the theory's rank-one update)."""
    trained_profiles: np.ndarray
    """``(S, d)`` energy profiles of the trained updates."""
    predicted_profiles: np.ndarray
    """``(S, d)`` energy profiles of the predicted updates."""

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready form (``nan``/``inf`` become ``None``)."""
        return {
            "r": _json_list(self.r),
            "relative_error": _json_list(self.relative_error),
            "filter_spread": _json_list(self.filter_spread),
        }


def trajectory_agreement(
    trained_updates: np.ndarray | torch.Tensor,
    predicted_updates: np.ndarray | torch.Tensor,
    basis: PatchBasis,
    *,
    layer: FirstLayer | None = None,
) -> TrajectoryAgreement:
    """Compare a trained linear CNN's updates with :func:`gd_trajectory`'s prediction.

    ``trained_updates`` is ``(S, K, C, kh, kw)`` (``snapshots - snapshots[0]``),
    ``predicted_updates`` ``(S, C, kh, kw)`` (or ``(S, K, C, kh, kw)``), both in the
    model's input space and for the same steps. Profiles go through
    :func:`update_profiles` (with ``layer``: the pixel-space mapping of the run's layer,
    for a pixel-space ``basis``).
    """
    trained = finite_float64(trained_updates, "trained_updates", error=UserError)
    predicted = finite_float64(predicted_updates, "predicted_updates", error=UserError)
    if trained.ndim != 5:
        raise UserError(f"trained_updates must be (S, K, C, kh, kw), got {trained.shape}")
    if predicted.ndim == 4:
        predicted = predicted[:, None]
    if (
        predicted.ndim != 5
        or predicted.shape[0] != trained.shape[0]
        or (predicted.shape[2:] != trained.shape[2:])
    ):
        raise UserError(
            f"predicted_updates {predicted.shape} do not match trained_updates {trained.shape}"
        )
    predicted = np.broadcast_to(predicted, trained.shape)
    trained_profiles = update_profiles(trained, basis, layer=layer)
    predicted_profiles = update_profiles(predicted, basis, layer=layer)
    r = np.array([pearson(a, b) for a, b in zip(trained_profiles, predicted_profiles, strict=True)])
    flat_t = trained.reshape(trained.shape[0], trained.shape[1], -1)
    flat_p = predicted.reshape(flat_t.shape)
    error = np.linalg.norm((flat_t - flat_p).reshape(len(flat_t), -1), axis=1)
    scale = np.linalg.norm(flat_p.reshape(len(flat_p), -1), axis=1)
    mean = flat_t.mean(axis=1)
    spread = np.linalg.norm(flat_t - mean[:, None], axis=2).max(axis=1)
    return TrajectoryAgreement(
        r=r,
        relative_error=_ratio(error, scale),
        filter_spread=_ratio(spread, np.linalg.norm(mean, axis=1)),
        trained_profiles=trained_profiles,
        predicted_profiles=predicted_profiles,
    )


# --------------------------------------------------------------------------- helpers


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` with ``0/0 = 0`` and ``x/0 = inf``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = numerator / denominator
    out[(numerator == 0) & (denominator == 0)] = 0.0
    return out


def _json_list(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def _image_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    return image_tensor(images, error=UserError)


def _target_tensor(targets: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(targets, torch.Tensor):
        return targets.detach().to("cpu", torch.float64).reshape(-1)
    return torch.from_numpy(np.array(targets, dtype=np.float64).reshape(-1))


def _padding(padding: int | tuple[int, int]) -> tuple[int, int]:
    values = (padding, padding) if isinstance(padding, (int, np.integer)) else tuple(padding)
    if len(values) != 2 or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in values
    ):
        raise UserError(f"padding must be a non-negative int or (ph, pw), got {padding!r}")
    return int(values[0]), int(values[1])


def _check_kernel(kh: int, kw: int) -> None:
    for name, value in (("kh", kh), ("kw", kw)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")


def _check_filters(filters: int) -> None:
    if isinstance(filters, bool) or not isinstance(filters, (int, np.integer)) or filters < 1:
        raise UserError(f"the number of filters K must be a positive integer, got {filters!r}")


def _check_lr(lr: float) -> float:
    eta = float(lr)
    if not (math.isfinite(eta) and eta > 0):
        raise UserError(f"the learning rate must be finite and positive, got {lr!r}")
    return eta


def _check_steps(steps: Sequence[int]) -> np.ndarray:
    t = np.asarray(steps)
    if t.ndim != 1 or (t.size and not np.issubdtype(t.dtype, np.integer)) or np.any(t < 0):
        raise UserError(f"steps must be a 1-D sequence of non-negative integers, got {steps!r}")
    return t.astype(np.int64)


def _per_channel(
    values: Sequence[float] | None, channels: int, what: str, *, default: float
) -> np.ndarray:
    if values is None:
        return np.full(channels, default)
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 1:
        array = np.full(channels, array[0])
    if array.size != channels or not np.all(np.isfinite(array)):
        raise UserError(f"{what} must be 1 or {channels} finite values, got {tuple(array)}")
    return array
