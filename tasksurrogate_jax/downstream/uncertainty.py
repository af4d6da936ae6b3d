"""Predictive uncertainty of kernel surrogates, and selection that uses it.

Kernel ridge regression is the posterior mean of a Gaussian process (GP). On
the standardised targets ``y = (scores - y_mean) / y_scale`` of a fitted
:class:`~tasksurrogate_jax.core.surrogates.KernelSurrogate`, take the prior
``f ~ GP(0, sigma2 * k)`` and observations ``y_i = f(s_i) + noise`` with noise
variance ``sigma2 * lam``, ``lam = ridge + jitter`` (the shift the surrogate
actually added to its kernel matrix). The posterior of ``f`` at a mask ``x``
has

    mean      k(x, S) (K + lam I)^{-1} y                 (= surrogate.predict)
    variance  sigma2 * (k(x, x) - k(x, S) (K + lam I)^{-1} k(S, x)),

both mapped back to score units (``* y_scale + y_mean`` and ``* y_scale**2``).
The mean does not depend on ``sigma2``; the variance does.

Signal variance convention (``signal_variance``):

- ``"mle"`` (default): ``sigma2 = y^T (K + lam I)^{-1} y / m`` per target, the
  maximum-likelihood scale of the GP given the noise-to-signal ratio ``lam``
  (the ridge chosen by cross-validation fixes a ratio, not a scale). With it
  the standard deviations are in the units of the observed residuals: a
  surrogate that fits its data loosely gets wider bands, and the standardised
  leave-one-out residuals of a well-specified GP are close to N(0, 1).
- ``"unit"``: ``sigma2 = 1``: the GP whose prior variance is the kernel itself
  on the standardised targets (``k(x, x) = 1`` for the RBF kernel), as
  scikit-learn's ``GaussianProcessRegressor(kernel=RBF(...), alpha=lam)``
  with ``normalize_y=False`` on standardised targets.
- a positive number or ``[num_targets]`` array: that ``sigma2``.

``std(masks)`` is the posterior std of the latent score ``f`` (how uncertain
the surrogate's prediction is); ``std(masks, include_noise=True)`` is the std
of a new *observed* score ``f + noise`` (``sigma2 * lam`` added to the
variance), which is what :func:`calibrate_kappa` calibrates.

Per-target hyperparameters (``gamma``/``ridge`` arrays) are supported: one
Cholesky factor per distinct (gamma, ridge + jitter) among the targets.

Nyström surrogates (``fit_kernel_surrogate`` with ``solver="nystrom"``, or
``"auto"`` above ``AUTO_EXACT_MAX_SUBSETS`` rows) are refused by
:func:`fit_posterior`: their ``train_masks`` are the centres, not the fitting
masks, and the posterior above would treat the centres as the data (with a
mean that is not the surrogate's). Their proper counterpart is the
subset-of-regressors / DTC posterior over all fitting rows, not implemented
here. :func:`trust_region_objective` works with any surrogate (given the
fitting masks).

Selection (scores are losses: lower is better):

- :func:`lcb_objective`: the weighted mean prediction plus or minus ``kappa``
  times the std of that weighted mean; ``mode="pessimistic"`` (default) is
  ``mean + kappa * std`` (robust: avoid masks the surrogate is unsure about),
  ``mode="optimistic"`` is ``mean - kappa * std`` (the classical lower
  confidence bound: explore them).
- :func:`trust_region_objective`: the prediction, with masks farther (Hamming
  distance) than ``max_distance`` from every fitting mask penalised.
- :func:`calibrate_kappa`: the ``kappa`` whose bound covers a stated fraction
  of the closed-form leave-one-out residuals.
- :func:`sequential_selection`: rounds of fit, propose by the bound, score the
  proposals with the user's true scoring, refit.

Both objectives are :class:`~tasksurrogate_jax.downstream.selection.SurrogateObjective`
subclasses: :func:`selection.select_subset` passes their arrays to ``jax.jit``
as arguments (one compilation per shape, not per objective).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import (
    as_typed_key,
    check_masks,
    check_positive_int,
    check_scores,
    is_concrete,
)
from tasksurrogate_jax.core.kernels import (
    gram,
    kernel_diagonal,
    kernel_from_terms,
    pairwise_terms,
)
from tasksurrogate_jax.core.ridge import (
    factor_error,
    prediction_masks,
    pytree_dataclass,
    warn_if_duplicate_masks,
)
from tasksurrogate_jax.core.surrogates import (
    KernelSurrogate,
    LinearSurrogate,
    check_surrogate,
    fit_kernel_surrogate,
    select_kernel_hyperparameters,
)
from tasksurrogate_jax.downstream.selection import (
    SurrogateObjective,
    select_subset,
    surrogate_objective,
)
from tasksurrogate_jax.truth.chunking import map_padded_chunks

MODES = ("pessimistic", "optimistic")
TAILS = ("upper", "lower", "both")


# ----------------------------------------------------------------------------
# Posterior
# ----------------------------------------------------------------------------


def _map_blocks(fn, masks, block_size):
    """``fn(masks)`` (a tuple of arrays with a leading row axis) over blocks of
    ``block_size`` rows (``None``: all at once), one compiled block shape."""
    n = masks.shape[0]
    if block_size is None or block_size >= n:
        return fn(masks)
    num_blocks = -(-n // block_size)
    padded = jnp.concatenate(
        [masks, jnp.zeros((num_blocks * block_size - n, masks.shape[1]), masks.dtype)])
    outs = jax.lax.map(fn, padded.reshape(num_blocks, block_size, masks.shape[1]))
    return tuple(o.reshape((num_blocks * block_size,) + o.shape[2:])[:n] for o in outs)


def _check_block_size(block_size):
    if block_size is not None:
        check_positive_int(block_size, "block_size")
    return block_size


@partial(pytree_dataclass, eq=False)
class KernelPosterior:
    """GP posterior of a fitted exact :class:`KernelSurrogate` (module docstring).

    A pytree: it passes through ``jax.jit``; every method is traceable.

    Attributes:
      surrogate: the ``KernelSurrogate`` (its ``predict`` is the posterior mean).
      chol: ``[num_groups, m, m]`` lower Cholesky factors of
        ``K_g + (ridge_g + jitter_g) I`` over ``surrogate.train_masks``, one per
        distinct (gamma, ridge + jitter) among the targets.
      group_gamma: ``[num_groups]`` kernel width of each factor.
      group_index: ``[num_targets]`` int32: the factor of each target.
      signal_variance: ``[num_targets]`` ``sigma2`` in standardised units.
    """

    surrogate: KernelSurrogate
    chol: jax.Array
    group_gamma: jax.Array
    group_index: jax.Array
    signal_variance: jax.Array

    @property
    def num_tasks(self) -> int:
        return self.surrogate.num_tasks

    @property
    def num_targets(self) -> int:
        return self.surrogate.alpha.shape[1]

    @property
    def noise_variance(self) -> jax.Array:
        """``[num_targets]`` observation noise variance in score units:
        ``sigma2 * (ridge + jitter) * y_scale**2``."""
        s = self.surrogate
        return self.signal_variance * (s.ridge + s.jitter) * s.y_scale**2

    def _check(self, masks):
        return prediction_masks(masks, self.num_tasks, self.chol.dtype)

    def _terms(self, masks):
        """``(raw mean, latent variance)``, each ``[n, T]``, in standardised
        units (the variance without ``sigma2``); the gamma-free kernel terms
        are computed once for every factor."""
        s = self.surrogate
        terms = pairwise_terms(masks, s.train_masks, s.kernel)

        def one_group(gamma, chol):
            k = kernel_from_terms(terms, s.kernel, gamma, s.degree, s.coef0)
            v = jax.scipy.linalg.solve_triangular(chol, k.T, lower=True)
            prior = kernel_diagonal(masks, s.kernel, gamma, s.degree, s.coef0)
            return k @ s.alpha, jnp.maximum(prior - jnp.sum(v * v, axis=0), 0.0)

        if self.chol.shape[0] == 1:
            raw, var = one_group(self.group_gamma[0], self.chol[0])
            var = jnp.broadcast_to(var[:, None], (masks.shape[0], self.num_targets))
            return raw, var
        raws, variances = jax.lax.map(lambda a: one_group(*a),
                                      (self.group_gamma, self.chol))
        raw = jnp.take_along_axis(raws, self.group_index[None, None, :], axis=0)[0]
        return raw, variances[self.group_index].T

    def mean(self, masks) -> jax.Array:
        """Posterior mean ``[n, num_targets]``: exactly ``surrogate.predict``."""
        return self.surrogate.predict(masks)

    def variance(self, masks, *, include_noise: bool = False,
                 block_size: int | None = None) -> jax.Array:
        """Posterior variance ``[n, num_targets]`` in squared score units.

        Args:
          masks: ``[n, num_tasks]`` of 0/1.
          include_noise: add the observation noise (variance of a new observed
            score rather than of the latent one).
          block_size: rows per block (``None``: all at once); a block holds
            two ``[block_size, m]`` matrices per factor.
        """
        return self._moments(masks, include_noise, block_size)[1]

    def std(self, masks, *, include_noise: bool = False,
            block_size: int | None = None) -> jax.Array:
        """Posterior standard deviation ``[n, num_targets]`` in score units
        (see :meth:`variance`)."""
        return self._moments(masks, include_noise, block_size)[2]

    def mean_and_variance(self, masks, *, include_noise: bool = False,
                          block_size: int | None = None):
        """``(mean, variance)``, each ``[n, num_targets]``, sharing one kernel
        evaluation per factor (the mean equals ``predict`` up to rounding)."""
        return self._moments(masks, include_noise, block_size)[:2]

    def _moments(self, masks, include_noise, block_size):
        if not isinstance(include_noise, bool):
            raise TypeError(f"include_noise must be a bool, got {include_noise!r}.")
        return _moments(self, self._check(masks), include_noise,
                        _check_block_size(block_size))


@partial(jax.jit, static_argnums=3)
def _moments(posterior, masks, include_noise, block_size):
    """``(mean, variance, std)`` in score units, ``[n, T]`` each;
    ``include_noise`` is a traced flag (one compilation serves both)."""
    s = posterior.surrogate
    raw, var = _map_blocks(posterior._terms, masks, block_size)
    var = posterior.signal_variance * var * s.y_scale**2
    var = var + jnp.where(include_noise, posterior.noise_variance, 0.0)
    return raw * s.y_scale + s.y_mean, var, jnp.sqrt(var)


def _check_signal_variance(signal_variance, num_targets: int):
    if isinstance(signal_variance, str):
        if signal_variance not in ("mle", "unit"):
            raise ValueError(
                "signal_variance must be 'mle', 'unit' or positive numbers, got "
                f"{signal_variance!r}.")
        return signal_variance
    if signal_variance is None or isinstance(signal_variance, bool):
        raise TypeError(
            "signal_variance must be 'mle', 'unit' or positive numbers, got "
            f"{signal_variance!r}.")
    try:
        values = np.asarray(signal_variance, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            "signal_variance must be 'mle', 'unit' or positive numbers, got "
            f"{type(signal_variance).__name__}.") from err
    if values.ndim > 1 or (values.ndim == 1 and values.shape[0] != num_targets):
        raise ValueError(
            "signal_variance must be a scalar or have shape [num_targets]="
            f"({num_targets},), got shape {values.shape}.")
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError(
            f"signal_variance must be positive and finite, got {values.tolist()}.")
    return np.broadcast_to(values, (num_targets,))


@partial(jax.jit, static_argnums=(10, 11))
def _factor_groups(masks, scores, y_mean, y_scale, alpha, group_gamma, group_ridge,
                   group_jitter, group_index, coef0, kernel, degree):
    """Per group the Cholesky factor (with the surrogate's jitter) and whether
    it is finite; per target the largest fitted-value discrepancy between
    ``alpha`` and a solve with this factor, the largest ``|y|``, and
    ``y^T alpha``."""
    y = (scores - y_mean) / y_scale
    eye = jnp.eye(masks.shape[0], dtype=masks.dtype)

    def one(gamma, ridge, jitter):
        # The surrogate's factor: its jitter is known to work, no retries.
        k = gram(masks, masks, kernel=kernel, gamma=gamma, degree=degree, coef0=coef0)
        chol = jnp.linalg.cholesky(k + (ridge + jitter) * eye)
        fresh = jax.scipy.linalg.cho_solve((chol, True), y)
        return chol, jnp.all(jnp.isfinite(chol)), k @ (alpha - fresh)

    chol, ok, discrepancy = jax.vmap(one)(group_gamma, group_ridge, group_jitter)
    per_target = jnp.take_along_axis(discrepancy, group_index[None, None, :],
                                     axis=0)[0]
    return (chol, ok, jnp.max(jnp.abs(per_target), axis=0),
            jnp.max(jnp.abs(y), axis=0), jnp.sum(y * alpha, axis=0))


def fit_posterior(surrogate, masks, scores, *,
                  signal_variance="mle") -> KernelPosterior:
    """The GP posterior of an exact kernel surrogate (module docstring).

    Args:
      surrogate: a ``KernelSurrogate`` fit by the exact solver on ``masks`` and
        ``scores`` (``fit_kernel_surrogate(masks, scores, ...)``, any kernel,
        standardisation, per-target hyperparameters).
      masks: ``[m, num_tasks]``: the masks it was fit on (``surrogate.train_masks``).
      scores: ``[m, num_targets]``: the scores it was fit on.
      signal_variance: ``"mle"`` (default), ``"unit"``, or positive numbers
        (scalar or ``[num_targets]``), in standardised units.

    Returns:
      ``KernelPosterior``.

    Raises:
      TypeError: ``surrogate`` is not a ``KernelSurrogate``.
      ValueError: ``masks`` are not the surrogate's ``train_masks`` (e.g. a
        Nyström surrogate, whose ``train_masks`` are its centres), or
        ``scores`` are not those it was fit on. These value checks need
        concrete inputs; under ``jit`` they are skipped and the factors are
        per target.
    """
    if isinstance(surrogate, LinearSurrogate):
        raise TypeError(
            "surrogate must be a KernelSurrogate; a LinearSurrogate has no GP "
            "posterior here (fit a kernel surrogate, e.g. kernel='linear').")
    if not isinstance(surrogate, KernelSurrogate):
        raise TypeError(
            f"surrogate must be a KernelSurrogate, got {type(surrogate).__name__}.")
    dtype = surrogate.alpha.dtype
    m, num_targets = surrogate.alpha.shape
    masks = check_masks(masks, num_tasks=surrogate.num_tasks)
    scores = check_scores(scores, num_rows=masks.shape[0])
    if scores.shape[1] != num_targets:
        raise ValueError(
            f"scores has {scores.shape[1]} target columns but the surrogate has "
            f"{num_targets}.")
    signal_variance = _check_signal_variance(signal_variance, num_targets)
    concrete = all(is_concrete(x) for x in (masks, scores, surrogate.train_masks,
                                             surrogate.alpha))
    if concrete and (masks.shape[0] != m or not np.array_equal(
            np.asarray(masks), np.asarray(surrogate.train_masks))):
        raise ValueError(
            f"masks ({masks.shape[0]} rows) are not the surrogate's train_masks "
            f"({m} rows): pass the masks the surrogate was fit on. A Nyström "
            "surrogate (solver='nystrom', or 'auto' above AUTO_EXACT_MAX_SUBSETS "
            "rows) keeps only its centres and is not supported: fit with "
            "solver='exact'.")
    masks = masks.astype(dtype)

    # Groups of targets sharing (gamma, ridge, jitter): one factor each.
    hyper = (surrogate.gamma_index, surrogate.ridge, surrogate.jitter)
    if all(is_concrete(x) for x in hyper):
        keys = list(zip(*(np.asarray(x).tolist() for x in hyper), strict=True))
        distinct = sorted(set(keys))
        group_index = np.array([distinct.index(key) for key in keys], np.int32)
        take = np.array([keys.index(key) for key in distinct])
    else:
        group_index = np.arange(num_targets, dtype=np.int32)
        take = np.arange(num_targets)
    group_gamma = surrogate.gamma[take]
    group_index = jnp.asarray(group_index)
    chol, ok, worst, size, y_alpha = _factor_groups(
        masks, scores.astype(dtype), surrogate.y_mean, surrogate.y_scale,
        surrogate.alpha, group_gamma, surrogate.ridge[take], surrogate.jitter[take],
        group_index, surrogate.coef0, surrogate.kernel, surrogate.degree)
    if is_concrete(ok) and not bool(np.all(ok)):
        bad = int(np.argmin(np.asarray(ok)))
        raise factor_error(float(surrogate.ridge[take][bad]),
                            float(surrogate.jitter[take][bad]))
    if concrete and is_concrete(worst):
        worst, size = np.asarray(worst), np.asarray(size)
        tol = 10 * math.sqrt(float(jnp.finfo(dtype).eps))
        if (worst > tol * (1.0 + size)).any():
            raise ValueError(
                "scores are not the scores the surrogate was fit on (its fitted "
                f"values differ by up to {float(worst.max()):.3g} in standardised "
                "units from a refit on them): pass the masks and scores given to "
                "fit_kernel_surrogate.")
    if isinstance(signal_variance, str):
        if signal_variance == "mle":
            sigma2 = jnp.maximum(y_alpha / m, 0.0)
        else:
            sigma2 = jnp.ones(num_targets, dtype)
    else:
        sigma2 = jnp.asarray(signal_variance, dtype)
    return KernelPosterior(surrogate=surrogate, chol=chol, group_gamma=group_gamma,
                           group_index=group_index, signal_variance=sigma2)


# ----------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------


def _check_nonnegative_number(value, name):
    if isinstance(value, (bool, str)) or value is None or not isinstance(
            value, numbers.Real) and not (
            isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0):
        raise TypeError(f"{name} must be a non-negative number, got {value!r}.")
    if not is_concrete(value):
        raise TypeError(f"{name} must be concrete (not traced inside jit).")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be non-negative and finite, got {value!r}.")
    return value


@partial(jax.tree_util.register_dataclass,
         data_fields=["surrogate", "weights", "posterior", "kappa"],
         meta_fields=["mode", "include_noise", "block_size"])
@dataclasses.dataclass(frozen=True, eq=False)
class ConfidenceBoundObjective(SurrogateObjective):
    """``masks [n, num_tasks] -> [n]``: ``w . mean -/+ kappa * std(w . f)``.

    ``std(w . f) = sqrt(sum_t w_t^2 var_t)``: the targets are independent GPs.
    ``mode="pessimistic"`` adds ``kappa * std``, ``"optimistic"`` subtracts it.
    A ``SurrogateObjective`` (its ``surrogate`` is ``posterior.surrogate``), so
    :func:`selection.select_subset` passes its arrays to ``jit`` as arguments.
    """

    posterior: KernelPosterior
    kappa: jax.Array
    mode: str
    include_noise: bool
    block_size: int | None

    def mean_and_std(self, masks):
        """``(w . mean [n], std of w . f [n])``."""
        return _bound_terms(self, self.posterior._check(masks))[1:]

    def __call__(self, masks) -> jax.Array:
        """Objective values ``[n]`` for masks ``[n, num_tasks]``."""
        return _bound_terms(self, self.posterior._check(masks))[0]


@jax.jit
def _bound_terms(objective, masks):
    """``(bound, weighted mean, its std)``, each ``[n]``."""
    mean, var, _ = _moments(objective.posterior, masks, objective.include_noise,
                            objective.block_size)
    mean = mean @ objective.weights
    std = jnp.sqrt(var @ (objective.weights**2))
    sign = 1.0 if objective.mode == "pessimistic" else -1.0
    return mean + sign * objective.kappa * std, mean, std


def lcb_objective(posterior: KernelPosterior, *, kappa, mode: str = "pessimistic",
                  target_weights=None, include_noise: bool = False,
                  block_size: int | None = None) -> ConfidenceBoundObjective:
    """A confidence bound on the weighted predicted loss, for ``select_subset``.

    Scores are losses, so the two bounds mean different things:

    - ``mode="pessimistic"`` (default): ``mean + kappa * std``, an upper bound
      on the loss. Minimising it is robust selection: it prefers masks whose
      predicted loss is low *and* certain, and avoids masks unlike the
      fitting ones, where the surrogate may err (the search can otherwise
      exploit its extrapolation errors).
    - ``mode="optimistic"``: ``mean - kappa * std``, the classical lower
      confidence bound ("predicted loss minus a multiple of the posterior
      standard deviation"): it favours uncertain masks, i.e. explores; right
      when the chosen masks will be scored for real (:func:`sequential_selection`).

    ``kappa`` is non-negative; the sign comes from ``mode``.

    Args:
      posterior: from :func:`fit_posterior`.
      kappa: non-negative multiple of the std (e.g. from :func:`calibrate_kappa`).
      mode: ``"pessimistic"`` or ``"optimistic"``.
      target_weights: ``[num_targets]`` non-negative weights (normalised to sum
        to 1); ``None`` is the uniform mean, as in ``surrogate_objective``.
      include_noise: use the std of a new observed score (with the noise)
        rather than of the latent one; ``calibrate_kappa``'s kappa is for
        ``include_noise=True``.
      block_size: rows per block when evaluating (``None``: a whole chunk).

    Returns:
      ``ConfidenceBoundObjective``: a callable ``masks [n, K] -> [n]`` and a
      pytree, usable as ``select_subset(objective, num_tasks, ...)``.
    """
    if not isinstance(posterior, KernelPosterior):
        raise TypeError(
            "posterior must be a KernelPosterior (from fit_posterior), got "
            f"{type(posterior).__name__}.")
    kappa = _check_nonnegative_number(kappa, "kappa")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if not isinstance(include_noise, bool):
        raise TypeError(f"include_noise must be a bool, got {include_noise!r}.")
    block_size = _check_block_size(block_size)
    base = surrogate_objective(posterior.surrogate, target_weights=target_weights)
    return ConfidenceBoundObjective(
        surrogate=posterior.surrogate, weights=base.weights, posterior=posterior,
        kappa=jnp.asarray(kappa, base.weights.dtype), mode=mode,
        include_noise=include_noise, block_size=block_size)


@partial(jax.tree_util.register_dataclass,
         data_fields=["surrogate", "weights", "data_masks", "max_distance", "penalty"],
         meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class TrustRegionObjective(SurrogateObjective):
    """``masks -> w . predict(masks)`` within ``max_distance`` (Hamming) of
    ``data_masks``; ``penalty + (distance - max_distance)`` beyond."""

    data_masks: jax.Array
    max_distance: jax.Array
    penalty: jax.Array

    def _check(self, masks):
        return prediction_masks(masks, self.num_tasks, self.data_masks.dtype)

    def distance(self, masks) -> jax.Array:
        """``[n]`` Hamming distance to the nearest of ``data_masks``."""
        return _trust_terms(self, self._check(masks))[1]

    def __call__(self, masks) -> jax.Array:
        """Objective values ``[n]`` for masks ``[n, num_tasks]``."""
        return _trust_terms(self, self._check(masks))[0]


@jax.jit
def _trust_terms(objective, masks):
    """``(objective values, distance to the data)``, each ``[n]``."""
    data = objective.data_masks
    distance = jnp.min(jnp.sum(masks, 1)[:, None] + jnp.sum(data, 1)[None, :]
                       - 2.0 * masks @ data.T, axis=1)
    predicted = objective.surrogate.predict(masks) @ objective.weights
    excess = distance - objective.max_distance
    return jnp.where(excess > 0, objective.penalty + excess, predicted), distance


@jax.jit
def _prediction_bound(surrogate, weights):
    """An upper bound on ``|w . predict(x)|`` over 0/1 masks ``x``."""
    if isinstance(surrogate, LinearSurrogate):
        per_target = (jnp.abs(surrogate.intercept)
                      + jnp.sum(jnp.abs(surrogate.coef), axis=0))
    else:
        k = surrogate.num_tasks
        gamma = surrogate.gamma
        if surrogate.kernel in ("rbf", "laplacian"):
            kmax = jnp.ones_like(gamma)
        elif surrogate.kernel == "polynomial":
            kmax = jnp.maximum(jnp.abs(surrogate.coef0),
                               jnp.abs(gamma * k + surrogate.coef0)) ** surrogate.degree
        else:
            kmax = jnp.full_like(gamma, float(k))
        per_target = (jnp.abs(surrogate.y_mean) + surrogate.y_scale * kmax
                      * jnp.sum(jnp.abs(surrogate.alpha), axis=0))
    return jnp.sum(weights * per_target)


def trust_region_objective(surrogate, *, max_distance, masks=None,
                           target_weights=None, penalty=None) -> TrustRegionObjective:
    """The surrogate's weighted prediction, restricted to near the data.

    Masks whose Hamming distance to the nearest of ``masks`` exceeds
    ``max_distance`` get ``penalty + (distance - max_distance)``: finite (as
    ``select_subset`` requires), above every prediction, and lower for nearer
    masks. So ``select_subset(..., method="exhaustive")`` returns a mask within
    ``max_distance`` whenever a feasible one exists, and the nearest feasible
    mask otherwise; greedy and beam search return one within the radius
    whenever they score one (their path starts from small subsets).

    Args:
      surrogate: a fitted ``LinearSurrogate`` / ``KernelSurrogate``, or a
        ``KernelPosterior`` (its surrogate is used).
      max_distance: non-negative Hamming radius.
      masks: ``[m, num_tasks]`` the fitting masks; ``None`` is the kernel
        surrogate's ``train_masks`` (for a Nyström surrogate those are only its
        centres: pass the fitting masks). Required for a linear surrogate.
      target_weights: as in ``surrogate_objective``.
      penalty: masks beyond the radius score ``penalty + (distance -
        max_distance)``; it must exceed every prediction. ``None`` is
        ``2 B + 1`` with ``B`` a bound on ``|w . predict|`` over all 0/1 masks
        (sum of ``|alpha|`` times the kernel's maximum, plus the intercept; for
        a linear surrogate ``|intercept| + sum |coef|``).

    Returns:
      ``TrustRegionObjective`` (callable ``masks [n, K] -> [n]``, a pytree).
    """
    if isinstance(surrogate, KernelPosterior):
        surrogate = surrogate.surrogate
    num_tasks = check_surrogate(surrogate)
    max_distance = _check_nonnegative_number(max_distance, "max_distance")
    if masks is None:
        if not isinstance(surrogate, KernelSurrogate):
            raise ValueError(
                "masks is required with a LinearSurrogate (it keeps no fitting "
                "masks): pass the masks it was fit on.")
        masks = surrogate.train_masks
    base = surrogate_objective(surrogate, target_weights=target_weights)
    dtype = base.weights.dtype
    masks = check_masks(masks, "masks", num_tasks=num_tasks).astype(dtype)
    if penalty is None:
        penalty = 2.0 * _prediction_bound(surrogate, base.weights) + 1.0
    else:
        penalty = _check_nonnegative_number(penalty, "penalty")
    return TrustRegionObjective(
        surrogate=surrogate, weights=base.weights, data_masks=masks,
        max_distance=jnp.asarray(max_distance, dtype),
        penalty=jnp.asarray(penalty, dtype))


# ----------------------------------------------------------------------------
# Calibration of kappa
# ----------------------------------------------------------------------------


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
    if kappa_grid is None:
        kappa_grid = np.linspace(0.0, 4.0, 17)
    else:
        try:
            kappa_grid = np.asarray(kappa_grid, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise TypeError("kappa_grid must be a 1-D array of numbers.") from err
        if not (np.isfinite(kappa_grid).all() and (kappa_grid >= 0).all()):
            raise ValueError(
                f"kappa_grid must be non-negative and finite, got {kappa_grid}.")
    surrogate = fit_kernel_surrogate(
        masks, scores, kernel=kernel, gamma=gamma, ridge=ridge, degree=degree,
        coef0=coef0, jitter=jitter, standardize=standardize, solver="exact")
    posterior = fit_posterior(surrogate, masks, scores,
                              signal_variance=signal_variance)
    weights = np.asarray(surrogate_objective(surrogate, target_weights=target_weights)
                         .weights, np.float64)
    residual, variance = (np.asarray(a, np.float64) for a in _loo_terms(posterior))
    y_scale = np.asarray(surrogate.y_scale, np.float64)
    residual = residual * y_scale  # score units: score - loo_mean
    variance = variance * y_scale**2
    scores_np = np.asarray(scores, np.float64)
    loo_mean = scores_np - residual
    loo_std = np.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        z_per_target = np.where(loo_std > 0, residual / loo_std, 0.0)
        combined_std = np.sqrt(variance @ weights**2)
        z = np.where(combined_std > 0, (residual @ weights) / combined_std, 0.0)
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


# ----------------------------------------------------------------------------
# Sequential (active) selection
# ----------------------------------------------------------------------------


class RoundRecord(NamedTuple):
    """One round of :func:`sequential_selection`.

    Attributes:
      round: 1-based round number.
      gamma, ridge: hyperparameters used this round (chosen by LOO unless fixed).
      proposed: ``[p, num_tasks]`` float masks scored this round.
      predicted: ``[p]`` weighted posterior mean at them.
      std: ``[p]`` its posterior std.
      bound: ``[p]`` the objective (confidence bound) that chose them.
      observed: ``[p]`` weighted true scores returned by ``score_fn``.
      best_value: best weighted true score after the round.
    """

    round: int
    gamma: np.ndarray
    ridge: np.ndarray
    proposed: np.ndarray
    predicted: np.ndarray
    std: np.ndarray
    bound: np.ndarray
    observed: np.ndarray
    best_value: float


class SequentialResult(NamedTuple):
    """Result of :func:`sequential_selection`.

    Attributes:
      masks: ``[m, num_tasks]`` every scored mask, initial ones first.
      scores: ``[m, num_targets]`` their true scores.
      round_index: ``[m]`` the round that scored each row (0: initial).
      best_mask: ``[num_tasks]`` the truly-scored mask with the lowest weighted
        score (ties: the first).
      best_index: its row in ``masks``.
      best_value: its weighted score.
      history: one ``RoundRecord`` per round run.
      posterior: the posterior refit on every scored row.
    """

    masks: np.ndarray
    scores: np.ndarray
    round_index: np.ndarray
    best_mask: np.ndarray
    best_index: int
    best_value: float
    history: tuple
    posterior: KernelPosterior


def _all_masks(num_tasks, lo, hi):
    """Every mask with ``lo <= size <= hi`` tasks, in order of integer code."""
    codes = np.arange(2**num_tasks, dtype=np.int64)
    masks = ((codes[:, None] >> np.arange(num_tasks)) & 1).astype(np.float64)
    sizes = masks.sum(1)
    return masks[(sizes >= lo) & (sizes <= hi)]


def _sample_masks(key, num, num_tasks, lo, hi):
    """``num`` masks: a size uniform in ``[lo, hi]``, then a uniform subset."""
    size_key, order_key = jax.random.split(key)
    sizes = np.asarray(jax.random.randint(size_key, (num,), lo, hi + 1))
    ranks = np.argsort(np.asarray(jax.random.uniform(order_key, (num, num_tasks))),
                       axis=1, kind="stable")
    return (np.argsort(ranks, axis=1, kind="stable") < sizes[:, None]).astype(
        np.float64)


def _flip_neighbours(masks, lo, hi):
    """Masks one task away from each row of ``masks``, within the sizes."""
    num_tasks = masks.shape[1]
    out = np.repeat(masks, num_tasks, axis=0)
    cols = np.tile(np.arange(num_tasks), masks.shape[0])
    out[np.arange(out.shape[0]), cols] = 1.0 - out[np.arange(out.shape[0]), cols]
    sizes = out.sum(1)
    return out[(sizes >= lo) & (sizes <= hi)]


def _unique_rows(masks):
    """Distinct rows in order of first occurrence."""
    if masks.shape[0] == 0:
        return masks
    _, first = np.unique(masks, axis=0, return_index=True)
    return masks[np.sort(first)]


def _evaluate_pool(objective, masks):
    return _bound_terms(objective, masks)


def sequential_selection(
    score_fn: Callable, masks, scores, num_tasks: int, *, rounds: int,
    per_round: int, key, kappa: float = 2.0, mode: str = "optimistic",
    include_noise: bool = False, target_weights=None, kernel: str = "rbf",
    gammas=None, ridges=None, per_target: bool = False, gamma=None, ridge=None,
    signal_variance="mle",
    candidates=None, min_size: int = 1, max_size: int | None = None,
    max_enumerate: int = 2**16, num_candidates: int = 4096,
    beam_width: int = 16, batch_size: int = 8192,
) -> SequentialResult:
    """Active selection: fit, propose by a confidence bound, score, refit.

    Each round: choose ``gamma``/``ridge`` by closed-form LOO
    (``select_kernel_hyperparameters``; or use fixed ``gamma``/``ridge``),
    fit the exact kernel surrogate and its posterior on every scored row,
    evaluate ``lcb_objective(posterior, kappa, mode)`` on a candidate pool,
    take the ``per_round`` lowest candidates not scored yet (ties: pool
    order), score them with ``score_fn``, append. After the last round the
    surrogate is refit on everything (``SequentialResult.posterior``).
    ``mode="optimistic"`` (default) explores, which is what proposals that
    get truly scored want; the result is the best *truly scored* mask, never
    a prediction.

    Candidate pool: ``candidates`` if given; else every mask with
    ``min_size..max_size`` tasks when there are at most ``max_enumerate`` of
    them; else ``num_candidates`` random masks (drawn with ``key``, a fresh
    draw each round), plus the one-task neighbours of the 8 best scored masks
    and the beam-search optimum of the bound (``select_subset``).

    Args:
      score_fn: ``masks [p, num_tasks] (float64 NumPy) -> scores [p, T]`` (or
        ``[p]`` for one target): the true scoring (retraining or estimation).
      masks, scores: initial scored data ``[m0, K]``, ``[m0, T]`` (``m0 >= 3``).
      num_tasks: ``K``.
      rounds: number of rounds (``>= 1``).
      per_round: masks scored per round (``>= 1``).
      key: PRNG key (used by the sampled pool only; results are deterministic
        given it).
      kappa, mode, include_noise, target_weights: as in :func:`lcb_objective`.
      kernel, gammas, ridges, per_target: the hyperparameter search.
      gamma, ridge: give both to skip the search and fit with these every round.
      signal_variance: as in :func:`fit_posterior`.
      candidates: ``[N, K]`` a fixed pool (then sizes and ``key`` are unused).
      min_size, max_size: subset sizes of the default pool (``None``: ``K``).
      max_enumerate: enumerate the pool up to this many masks.
      num_candidates: random masks per round otherwise.
      beam_width, batch_size: of the beam search / pool evaluation.

    Returns:
      ``SequentialResult``.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}.")
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    masks = np.asarray(check_masks(masks, num_tasks=num_tasks), np.float64)
    scores = np.asarray(check_scores(scores, num_rows=masks.shape[0]), np.float64)
    if masks.shape[0] < 3:
        raise ValueError(
            f"masks must have at least 3 subsets (rows) to start, got "
            f"{masks.shape[0]}.")
    rounds = check_positive_int(rounds, "rounds")
    per_round = check_positive_int(per_round, "per_round")
    key = as_typed_key(key)
    kappa = _check_nonnegative_number(kappa, "kappa")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    max_enumerate = check_positive_int(max_enumerate, "max_enumerate")
    num_candidates = check_positive_int(num_candidates, "num_candidates")
    batch_size = check_positive_int(batch_size, "batch_size")
    min_size = check_positive_int(min_size, "min_size", minimum=0)
    max_size = num_tasks if max_size is None else check_positive_int(
        max_size, "max_size", minimum=0)
    if not min_size <= max_size <= num_tasks:
        raise ValueError(
            f"need min_size <= max_size <= num_tasks, got min_size={min_size}, "
            f"max_size={max_size}, num_tasks={num_tasks}.")
    num_targets = scores.shape[1]
    fixed_pool = None
    if candidates is not None:
        fixed_pool = _unique_rows(np.asarray(
            check_masks(candidates, "candidates", num_tasks=num_tasks), np.float64))
    elif sum(math.comb(num_tasks, s) for s in range(min_size, max_size + 1)) <= (
            max_enumerate):
        fixed_pool = _all_masks(num_tasks, min_size, max_size)
    if (gamma is None) != (ridge is None):
        raise ValueError(
            "gamma and ridge must be given together (fixed hyperparameters) or "
            f"both left None (searched each round), got gamma={gamma!r}, "
            f"ridge={ridge!r}.")
    weights = None

    def fit(masks, scores):
        if gamma is None:
            search = select_kernel_hyperparameters(
                masks, scores, kernel=kernel, gammas=gammas, ridges=ridges,
                per_target=per_target)
            chosen = (search.gamma, search.ridge)
        else:
            chosen = (gamma, ridge)
        surrogate = fit_kernel_surrogate(masks, scores, kernel=kernel,
                                         gamma=chosen[0], ridge=chosen[1],
                                         solver="exact")
        posterior = fit_posterior(surrogate, masks, scores,
                                  signal_variance=signal_variance)
        return chosen, posterior

    round_index = np.zeros(masks.shape[0], np.int64)
    history = []
    for r in range(1, rounds + 1):
        chosen, posterior = fit(masks, scores)
        objective = lcb_objective(posterior, kappa=kappa, mode=mode,
                                  target_weights=target_weights,
                                  include_noise=include_noise)
        weights = np.asarray(objective.weights, np.float64)
        if fixed_pool is not None:
            pool = fixed_pool
        else:
            round_key = jax.random.fold_in(key, r)
            best_rows = masks[np.argsort(scores @ weights, kind="stable")[:8]]
            beam = select_subset(objective, num_tasks, min_size=min_size,
                                 max_size=max_size, method="beam",
                                 beam_width=beam_width, batch_size=batch_size)
            pool = _unique_rows(np.concatenate([
                beam.mask[None].astype(np.float64),
                _flip_neighbours(best_rows, min_size, max_size),
                _sample_masks(round_key, num_candidates, num_tasks, min_size,
                              max_size)]))
        scored = {row.tobytes() for row in masks}
        fresh = np.array([row.tobytes() not in scored for row in pool], bool)
        pool = pool[fresh]
        if pool.shape[0] == 0:
            break
        dtype = objective.weights.dtype
        bound, mean, std = (np.asarray(a, np.float64) for a in map_padded_chunks(
            partial(_evaluate_pool, objective), jnp.asarray(pool, dtype),
            batch_size))
        if not np.isfinite(bound).all():
            raise ValueError("the confidence bound is not finite on the candidate "
                             "pool (a non-finite surrogate fit).")
        order = np.argsort(bound, kind="stable")[:per_round]
        proposed = pool[order]
        new_scores = score_fn(proposed.copy())
        new_scores = np.asarray(check_scores(new_scores, "score_fn's output",
                                             num_rows=proposed.shape[0]), np.float64)
        if new_scores.shape[1] != num_targets:
            raise ValueError(
                f"score_fn returned {new_scores.shape[1]} target columns, expected "
                f"{num_targets} (as in scores).")
        masks = np.concatenate([masks, proposed])
        scores = np.concatenate([scores, new_scores])
        round_index = np.concatenate([round_index,
                                      np.full(proposed.shape[0], r, np.int64)])
        history.append(RoundRecord(
            round=r, gamma=np.asarray(chosen[0]), ridge=np.asarray(chosen[1]),
            proposed=proposed, predicted=mean[order], std=std[order],
            bound=bound[order], observed=new_scores @ weights,
            best_value=float(np.min(scores @ weights))))

    _, posterior = fit(masks, scores)
    if weights is None:
        weights = np.asarray(surrogate_objective(
            posterior.surrogate, target_weights=target_weights).weights, np.float64)
    values = scores @ weights
    best = int(np.argmin(values))
    return SequentialResult(
        masks=masks, scores=scores, round_index=round_index,
        best_mask=masks[best].copy(), best_index=best, best_value=float(values[best]),
        history=tuple(history), posterior=posterior)


__all__ = [
    "ConfidenceBoundObjective",
    "KappaCalibration",
    "KernelPosterior",
    "RoundRecord",
    "SequentialResult",
    "TrustRegionObjective",
    "calibrate_kappa",
    "fit_posterior",
    "lcb_objective",
    "sequential_selection",
    "trust_region_objective",
]
