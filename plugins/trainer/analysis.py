"""The science of a finished run: energy profiles over training, fits, linear predictions.

Every profile is computed the way a scanned model's is (DESIGN §1): the filters are
mapped to RGB pixel space with the training normalisation (``w / std[c]``) and
projected on a patch basis of the training images.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from zooscan import theory
from zooscan.energy import energy_profile, fit_formula, formula_profile, pearson, to_pixel_space
from zooscan.errors import UserError
from zooscan.records import FirstLayer, PatchBasis


def pixel_weights(layer: FirstLayer, weights: np.ndarray) -> np.ndarray:
    """``weights`` (``(..., K, C, kh, kw)``, the model's input space) in pixel space."""
    flat = np.asarray(weights, dtype=np.float64).reshape(-1, *layer.weight.shape[1:])
    return to_pixel_space(replace(layer, weight=flat)).reshape(np.shape(weights))


def trajectories(layer: FirstLayer, snapshots: np.ndarray, basis: PatchBasis) -> dict:
    """``{"energy": (S, d), "energy_raw": (S, d)}``: the profile of what training changed
    (init subtracted; the first row, the init itself, is all zero) and of the weights."""
    pixel = pixel_weights(layer, snapshots)
    init = pixel[0]
    return {
        "energy": np.stack([energy_profile(w, basis, init=init) for w in pixel]),
        "energy_raw": np.stack([energy_profile(w, basis) for w in pixel]),
    }


def fit_or_none(profile: np.ndarray, lambdas: np.ndarray) -> dict[str, Any] | None:
    """The formula fit of one profile (``None`` for an all-zero one), without the
    predicted curve."""
    if not np.any(profile):
        return None
    try:
        fit = fit_formula(profile, lambdas)
    except UserError:
        return None
    result = fit.as_dict()
    result.pop("predicted")
    return result


def snapshot_fits(learned: np.ndarray, basis: PatchBasis) -> list[dict[str, Any] | None]:
    """The formula fit of each snapshot's learned (init-subtracted) profile."""
    return [fit_or_none(p, basis.lambdas) for p in learned]


def summarise_profiles(
    profiles: dict[str, np.ndarray],
    basis: PatchBasis,
    fits: list[dict[str, Any] | None],
) -> dict[str, Any]:
    """Fits and comparisons of the final profile: formula fit (``fit_*``), whitening
    index, correlation of what was learned with the init profile (paper Tab. 1 "trained
    vs init"), and the formula fit of the init profile (Tab. 3 "random init").
    ``fits`` are :func:`snapshot_fits` of ``profiles["energy"]``."""
    learned, raw = profiles["energy"], profiles["energy_raw"]
    subtracted = bool(np.any(learned[-1]))
    summary: dict[str, Any] = {"basis": basis.id, "init_subtracted": subtracted}
    fit = fits[-1] if subtracted else fit_or_none(raw[-1], basis.lambdas)
    if fit is not None:
        summary.update(
            fit_r=fit["r"],
            fit_s=fit["s"],
            fit_r_lambda=fit["r_lambda"],
            fit_r_inv_lambda=fit["r_inv_lambda"],
            whitening_index=fit["whitening_index"],
        )
    init_fit = fit_or_none(raw[0], basis.lambdas)
    summary["init_fit_r"] = init_fit["r"] if init_fit else None
    summary["r_trained_vs_init"] = _pearson_or_none(learned[-1], raw[0])
    summary["snapshot_fit_r"] = [f["r"] if f else None for f in fits]
    return summary


def linear_predictions(
    layer: FirstLayer,
    snapshots: np.ndarray,
    steps: np.ndarray,
    x_train: Any,
    targets: Any,
    lr: float,
    basis: PatchBasis,
    fits: list[dict[str, Any] | None],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The paper's two predictions for a fixed-sum linear CNN trained by full-batch GD.

    ``exact``: the profile of the exact gradient-descent update
    ``delta(t) = sum_{n<t} (I - 2 eta K A)^n 2 eta (b - A S0)`` from the training set's
    average-patch moments (:mod:`zooscan.theory`), with the per-snapshot agreement
    (``exact_r``, relative weight error, spread between filters). ``closed_form``: the
    paper's Eq. 3 from the patch eigenvalues alone, its one parameter ``s`` fitted per
    snapshot (``fits``: :func:`snapshot_fits` of the learned profiles), next to the
    ``s`` that ``eta t`` implies under the paper's assumptions (``implied_s``) and the
    one the moments give (``moments_s``). Returns ``(profiles, summary)``.
    """
    kh, kw = layer.weight.shape[2:]
    padding = (0, 0) if isinstance(layer.padding, str) else tuple(layer.padding)
    moments = theory.linear_moments(x_train, targets, kh, kw, padding=padding)
    init = np.asarray(snapshots[0], dtype=np.float64)
    step_list = [int(t) for t in steps]
    deltas = theory.gd_trajectory(moments, init, lr, step_list)
    trained = np.asarray(snapshots, dtype=np.float64) - init[None]
    agreement = theory.trajectory_agreement(trained, deltas, basis, layer=layer)
    closed = np.stack(
        [formula_profile(basis.lambdas, f["s"]) if f else np.zeros(basis.dim) for f in fits]
    )
    model_space = theory.input_space_basis(basis, mean=layer.mean, std=layer.std)
    filters = int(layer.weight.shape[0])
    exact_r = agreement.as_dict()["r"]
    summary = {
        "exact_r": exact_r,
        "exact_r_min": min((r for r in exact_r if r is not None), default=None),
        "exact_relative_error": agreement.as_dict()["relative_error"],
        "closed_form_r": [f["r"] if f else None for f in fits],
        "closed_form_s": [f["s"] if f else None for f in fits],
        "closed_form_r_lambda": [f["r_lambda"] if f else None for f in fits],
        "implied_s": theory.implied_s(
            lr,
            filters,
            step_list,
            patch_eigenvalue_max=float(model_space.eigenvalues[0]),
            windows=moments.windows,
        ).tolist(),
        "moments_s": theory.s_from_moments(moments, lr, filters, step_list).tolist(),
    }
    return {"exact": agreement.predicted_profiles, "closed_form": closed}, summary


def auto_linear_lr(x_train: Any, targets: Any, kh: int, kw: int, filters: int) -> float:
    """Half the critical rate of the linear CNN's gradient descent (:func:`zooscan.theory.
    critical_lr`): the monotone regime, as fast as it goes."""
    return 0.5 * theory.critical_lr(theory.linear_moments(x_train, targets, kh, kw), filters)


def _pearson_or_none(a: np.ndarray, b: np.ndarray) -> float | None:
    if not (np.any(a) and np.any(b)) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    r = pearson(a, b)
    return None if math.isnan(r) else r
