"""The Gaussian-process posterior of a fitted kernel surrogate.

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
variance), which is what
:func:`~tasksurrogate_jax.downstream.uncertainty.calibration.calibrate_kappa`
calibrates.

Per-target hyperparameters (``gamma``/``ridge`` arrays) are supported: one
Cholesky factor per distinct (gamma, ridge + jitter) among the targets.

Nyström surrogates (``fit_kernel_surrogate`` with ``solver="nystrom"``, or
``"auto"`` above ``AUTO_EXACT_MAX_SUBSETS`` rows) are refused by
:func:`fit_posterior`: their ``train_masks`` are the centres, not the fitting
masks, and the posterior above would treat the centres as the data (with a
mean that is not the surrogate's). Their proper counterpart is the
subset-of-regressors / DTC posterior over all fitting rows, not implemented
here.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import (
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
)
from tasksurrogate_jax.core.surrogates import KernelSurrogate, LinearSurrogate


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


def check_block_size(block_size):
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
        return posterior_moments(self, self._check(masks), include_noise,
                                 check_block_size(block_size))


@partial(jax.jit, static_argnums=3)
def posterior_moments(posterior, masks, include_noise, block_size):
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

    group_index, take = _target_groups(surrogate)
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
    return KernelPosterior(
        surrogate=surrogate, chol=chol, group_gamma=group_gamma,
        group_index=group_index,
        signal_variance=_signal_variance(signal_variance, y_alpha, m, num_targets,
                                         dtype))


def _target_groups(surrogate):
    """``(group_index [T] int32, take [num_groups])``: targets sharing (gamma,
    ridge, jitter) form a group, one factor each; ``take`` holds a target of
    each group. One group per target when the hyperparameters are traced."""
    hyper = (surrogate.gamma_index, surrogate.ridge, surrogate.jitter)
    if all(is_concrete(x) for x in hyper):
        keys = list(zip(*(np.asarray(x).tolist() for x in hyper), strict=True))
        distinct = sorted(set(keys))
        group_index = np.array([distinct.index(key) for key in keys], np.int32)
        take = np.array([keys.index(key) for key in distinct])
    else:
        num_targets = surrogate.alpha.shape[1]
        group_index = np.arange(num_targets, dtype=np.int32)
        take = np.arange(num_targets)
    return group_index, take


def _signal_variance(signal_variance, y_alpha, m, num_targets, dtype):
    """``sigma2 [num_targets]`` of a checked ``signal_variance``, from
    ``y_alpha = y^T alpha`` ``[num_targets]`` for ``"mle"``."""
    if isinstance(signal_variance, str):
        if signal_variance == "mle":
            return jnp.maximum(y_alpha / m, 0.0)
        return jnp.ones(num_targets, dtype)
    return jnp.asarray(signal_variance, dtype)
