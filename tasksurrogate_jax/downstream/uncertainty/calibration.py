"""``kappa`` of a confidence bound, calibrated on leave-one-out residuals.

:func:`calibrate_kappa` fits the exact kernel surrogate and its posterior
(:mod:`~tasksurrogate_jax.downstream.uncertainty.posterior`) on all rows and,
from the same Cholesky factor, the closed-form leave-one-out prediction of
each row and its predictive std; ``kappa`` is the multiple of that std whose
bound covers a stated fraction of the residuals, for
:func:`~tasksurrogate_jax.downstream.uncertainty.objectives.lcb_objective`.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import check_masks, check_scores
from tasksurrogate_jax.core.ridge import warn_if_duplicate_masks
from tasksurrogate_jax.core.surrogates import fit_kernel_surrogate
from tasksurrogate_jax.downstream.selection import surrogate_objective
from tasksurrogate_jax.downstream.uncertainty.posterior import (
    KernelPosterior,
    fit_posterior,
)

TAILS = ("upper", "lower", "both")


class KappaCalibration(NamedTuple):
    """Result of :func:`calibrate_kappa`.

    Attributes:
      kappa: the chosen multiple (never negative).
      coverage: the stated coverage.
      tail: ``"upper"``, ``"lower"`` or ``"both"``.
      achieved: LOO coverage of the weighted objective's bound at ``kappa``.
      per_target_kappa: ``[num_targets]`` the kappa each target alone would get.
      kappa_grid: ``[num_kappas]`` kappas of the table.
      coverage_table: ``[num_kappas]`` LOO coverage of the weighted bound.
      per_target_coverage_table: ``[num_kappas, num_targets]``.
      loo_mean: ``[m, num_targets]`` leave-one-out predictions (score units).
      loo_std: ``[m, num_targets]`` their predictive std (noise included).
      z: ``[m]`` standardised LOO residuals of the weighted objective,
        ``(w . (scores - loo_mean)) / sqrt(sum_t w_t^2 loo_std_t^2)``.
      z_per_target: ``[m, num_targets]``.
      posterior: the posterior fit on all rows (for ``lcb_objective``).
    """

    kappa: float
    coverage: float
    tail: str
    achieved: float
    per_target_kappa: np.ndarray
    kappa_grid: np.ndarray
    coverage_table: np.ndarray
    per_target_coverage_table: np.ndarray
    loo_mean: np.ndarray
    loo_std: np.ndarray
    z: np.ndarray
    z_per_target: np.ndarray
    posterior: KernelPosterior


@jax.jit
def _loo_terms(posterior: KernelPosterior):
    """Closed-form LOO: ``(residual, variance)`` ``[m, T]`` standardised, with
    ``A = (K + lam I)^{-1}``: residual ``(A y)_i / A_ii = alpha_i / A_ii``,
    predictive variance ``sigma2 / A_ii``."""
    m = posterior.chol.shape[1]
    eye = jnp.eye(m, dtype=posterior.chol.dtype)

    def diag(chol):
        inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
        return jnp.sum(inv * inv, axis=0)

    a_diag = jax.lax.map(diag, posterior.chol)[posterior.group_index].T  # [m, T]
    residual = posterior.surrogate.alpha / a_diag
    return residual, posterior.signal_variance / a_diag


def _tail_values(z, tail):
    if tail == "upper":
        return z
    if tail == "lower":
        return -z
    return np.abs(z)


def _quantile(values, coverage):
    """Smallest ``v`` among ``values`` with a fraction ``>= coverage`` at or
    below it (the inverted empirical CDF; deterministic)."""
    return float(np.quantile(values, coverage, method="inverted_cdf", axis=0))


def calibrate_kappa(
    masks, scores, *, gamma, ridge, kernel: str = "rbf", degree: int = 3,
    coef0: float = 1.0, jitter: float = 1e-8, standardize: bool = True,
    signal_variance="mle", coverage: float = 0.9, tail: str = "upper",
    target_weights=None, kappa_grid=None,
) -> KappaCalibration:
    """``kappa`` whose bound covers ``coverage`` of leave-one-out residuals.

    Fits the surrogate and its posterior on all rows, then, from the same
    factor, the exact leave-one-out prediction of each row and its predictive
    variance (closed form, as in ``select_kernel_hyperparameters``: the
    standardisation and ``sigma2`` are those of all rows). With ``r`` the
    weighted LOO residual ``w . (score - loo_mean)`` and ``s`` its std
    ``sqrt(sum_t w_t^2 loo_std_t^2)``, ``z = r / s``, and ``kappa`` is the
    empirical ``coverage`` quantile (inverted CDF) of

    - ``tail="upper"`` (default): ``z``: the pessimistic bound
      ``mean + kappa * std`` is above the true loss for ``coverage`` of rows;
    - ``tail="lower"``: ``-z``: the optimistic bound ``mean - kappa * std`` is
      below it;
    - ``tail="both"``: ``|z|``: the two-sided band holds it.

    ``kappa`` is clipped at 0. Calibrating the weighted objective directly
    (rather than each target) accounts for the targets' actual correlation.
    The std here includes the noise: use the result with
    ``lcb_objective(result.posterior, kappa=result.kappa, include_noise=True,
    target_weights=...)``. Duplicate masks give a
    ``surrogates.DuplicateMasksWarning`` (a held-out row's copies stay in the
    fit: its residual is too small).

    Args:
      masks, scores: the fitting data (``[m, K]``, ``[m, T]``), ``m >= 3``.
      gamma, ridge, kernel, degree, coef0, jitter, standardize: as in
        ``fit_kernel_surrogate`` (exact solver).
      signal_variance: as in :func:`fit_posterior`.
      coverage: in ``(0, 1)``.
      tail: ``"upper"``, ``"lower"`` or ``"both"``.
      target_weights: as in ``lcb_objective``.
      kappa_grid: kappas of the coverage table (default ``0, 0.25, ..., 4``).

    Returns:
      ``KappaCalibration``.
    """
    if isinstance(coverage, bool) or not isinstance(coverage, numbers.Real) or not (
            0.0 < float(coverage) < 1.0):
        raise ValueError(f"coverage must be a number in (0, 1), got {coverage!r}.")
    coverage = float(coverage)
    if not isinstance(tail, str) or tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}.")
    masks = check_masks(masks)
    scores = check_scores(scores, num_rows=masks.shape[0])
    if masks.shape[0] < 3:
        raise ValueError(
            f"masks must have at least 3 subsets for leave-one-out, got "
            f"{masks.shape[0]}.")
    warn_if_duplicate_masks(
        masks, "leave-one-out calibration",
        "the held-out residuals are too small and kappa too low")
    kappa_grid = _check_kappa_grid(kappa_grid)
    surrogate = fit_kernel_surrogate(
        masks, scores, kernel=kernel, gamma=gamma, ridge=ridge, degree=degree,
        coef0=coef0, jitter=jitter, standardize=standardize, solver="exact")
    posterior = fit_posterior(surrogate, masks, scores,
                              signal_variance=signal_variance)
    weights = np.asarray(surrogate_objective(surrogate, target_weights=target_weights)
                         .weights, np.float64)
    loo_mean, loo_std, z, z_per_target = _loo_residuals(posterior, scores, weights)
    tail_z = _tail_values(z, tail)
    tail_per_target = _tail_values(z_per_target, tail)
    kappa = max(_quantile(tail_z, coverage), 0.0)
    per_target_kappa = np.maximum(
        np.quantile(tail_per_target, coverage, method="inverted_cdf", axis=0), 0.0)
    coverage_table = np.mean(tail_z[None, :] <= kappa_grid[:, None], axis=1)
    per_target_table = np.mean(
        tail_per_target[None, :, :] <= kappa_grid[:, None, None], axis=1)
    return KappaCalibration(
        kappa=kappa, coverage=coverage, tail=tail,
        achieved=float(np.mean(tail_z <= kappa)),
        per_target_kappa=per_target_kappa, kappa_grid=kappa_grid,
        coverage_table=coverage_table, per_target_coverage_table=per_target_table,
        loo_mean=loo_mean, loo_std=loo_std, z=z, z_per_target=z_per_target,
        posterior=posterior)


def _check_kappa_grid(kappa_grid):
    """``[num_kappas]`` float64 kappas (``None``: ``0, 0.25, ..., 4``)."""
    if kappa_grid is None:
        return np.linspace(0.0, 4.0, 17)
    try:
        kappa_grid = np.asarray(kappa_grid, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError("kappa_grid must be a 1-D array of numbers.") from err
    if not (np.isfinite(kappa_grid).all() and (kappa_grid >= 0).all()):
        raise ValueError(
            f"kappa_grid must be non-negative and finite, got {kappa_grid}.")
    return kappa_grid


def _loo_residuals(posterior, scores, weights):
    """``(loo_mean [m, T], loo_std [m, T], z [m], z_per_target [m, T])`` in
    score units (see :class:`KappaCalibration`), for ``weights [T]``."""
    residual, variance = (np.asarray(a, np.float64) for a in _loo_terms(posterior))
    y_scale = np.asarray(posterior.surrogate.y_scale, np.float64)
    residual = residual * y_scale  # score units: score - loo_mean
    variance = variance * y_scale**2
    scores_np = np.asarray(scores, np.float64)
    loo_mean = scores_np - residual
    loo_std = np.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        z_per_target = np.where(loo_std > 0, residual / loo_std, 0.0)
        combined_std = np.sqrt(variance @ weights**2)
        z = np.where(combined_std > 0, (residual @ weights) / combined_std, 0.0)
    return loo_mean, loo_std, z, z_per_target
