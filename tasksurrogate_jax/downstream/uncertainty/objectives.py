"""Selection objectives that account for where a surrogate is unsure.

Scores are losses: lower is better.

- :func:`lcb_objective`: the weighted mean prediction plus or minus ``kappa``
  times the std of that weighted mean, from a
  :class:`~tasksurrogate_jax.downstream.uncertainty.posterior.KernelPosterior`;
  ``mode="pessimistic"`` (default) is ``mean + kappa * std`` (robust: avoid
  masks the surrogate is unsure about), ``mode="optimistic"`` is
  ``mean - kappa * std`` (the classical lower confidence bound: explore them).
- :func:`trust_region_objective`: the prediction of any surrogate (given the
  fitting masks), with masks farther (Hamming distance) than ``max_distance``
  from every fitting mask penalised.

Both are :class:`~tasksurrogate_jax.downstream.selection.SurrogateObjective`
subclasses: :func:`~tasksurrogate_jax.downstream.selection.select_subset`
passes their arrays to ``jax.jit`` as arguments (one compilation per shape,
not per objective).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import check_masks, is_concrete
from tasksurrogate_jax.core.ridge import prediction_masks
from tasksurrogate_jax.core.surrogates import (
    KernelSurrogate,
    LinearSurrogate,
    check_surrogate,
)
from tasksurrogate_jax.downstream.selection import (
    SurrogateObjective,
    surrogate_objective,
)
from tasksurrogate_jax.downstream.uncertainty.posterior import (
    KernelPosterior,
    check_block_size,
    posterior_moments,
)

MODES = ("pessimistic", "optimistic")


def check_nonnegative_number(value, name):
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
        return bound_terms(self, self.posterior._check(masks))[1:]

    def __call__(self, masks) -> jax.Array:
        """Objective values ``[n]`` for masks ``[n, num_tasks]``."""
        return bound_terms(self, self.posterior._check(masks))[0]


@jax.jit
def bound_terms(objective, masks):
    """``(bound, weighted mean, its std)``, each ``[n]``."""
    mean, var, _ = posterior_moments(objective.posterior, masks,
                                     objective.include_noise, objective.block_size)
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
    kappa = check_nonnegative_number(kappa, "kappa")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if not isinstance(include_noise, bool):
        raise TypeError(f"include_noise must be a bool, got {include_noise!r}.")
    block_size = check_block_size(block_size)
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
    max_distance = check_nonnegative_number(max_distance, "max_distance")
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
        penalty = check_nonnegative_number(penalty, "penalty")
    return TrustRegionObjective(
        surrogate=surrogate, weights=base.weights, data_masks=masks,
        max_distance=jnp.asarray(max_distance, dtype),
        penalty=jnp.asarray(penalty, dtype))
