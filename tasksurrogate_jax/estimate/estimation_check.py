"""How far first-order estimates are from the fine-tuning they stand for.

A diagnostic, kept apart from the estimators (:mod:`estimation`): fine-tune
from ``θ*`` on every subset with the real program and compare the scores, and
evaluate the first-order model at the fine-tuned updates (the linearization's
own error, whatever the estimator does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from tasksurrogate_jax.core import metrics
from tasksurrogate_jax.data import TargetData, TaskData
from tasksurrogate_jax.estimate.linearize import linearize
from tasksurrogate_jax.truth import retraining


class EstimationCheck(NamedTuple):
    """Estimated against real fine-tuning from ``θ*`` on the same subsets.

    Attributes:
      estimated: ``[m, T]`` estimated scores ``F̂(s)``.
      exact: ``[m, T]`` scores after fine-tuning from ``θ*`` on each subset (the
        mean over replicates).
      relative_error: ``[m]`` ``|mean_t F̂ - mean_t F| / |mean_t F|``: the error
        on the target-task score (the mean over target columns).
      column_relative_error: ``[m]`` ``mean_t |F̂_t - F_t| / |F_t|``: per column,
        then averaged (large where single losses are near zero).
      spearman: ``[T]`` Spearman of ``F̂`` against ``F`` across subsets.
      param_shift: ``[m]`` ``||θ_s - θ*|| / ||θ*||`` of the fine-tuned models
        (replicate 0).
      first_order: ``[m, T]`` target losses of the first-order model at the
        *fine-tuned* update, ``f(θ*) + J (θ_s − θ*)`` (logits linearized,
        replicate 0): how far the linearization itself is off where
        fine-tuning went, whatever the estimator does.
    """

    estimated: jax.Array
    exact: jax.Array
    relative_error: jax.Array
    column_relative_error: jax.Array
    spearman: jax.Array
    param_shift: jax.Array
    first_order: jax.Array


def check_estimation(
    estimated, masks, *, params, data: TaskData, target: TargetData,
    spec: retraining.TrainSpec, key, replicates: int = 1,
    chunk_size: int | None = None, progress: bool = False,
) -> EstimationCheck:
    """Fine-tunes from ``θ*`` on each subset and compares with the estimates.

    Args:
      estimated: ``[m, T]`` estimated scores for ``masks``.
      masks: ``[m, num_tasks]``.
      params: ``θ*``.
      data, target: the training data and target examples.
      spec: the fine-tuning program (``retraining.make_train_spec``).
      key: PRNG key of the fine-tuning runs (replicate ``r`` uses
        ``retraining.replicate_key(key, r)``).
      replicates: fine-tuning runs per subset, averaged.
      chunk_size: subsets per compiled call (``None``: by memory).
      progress: a progress bar over chunks.

    Returns:
      :class:`EstimationCheck`.
    """
    estimated = jnp.asarray(estimated)
    masks = jnp.asarray(masks)
    if estimated.ndim != 2 or estimated.shape != (masks.shape[0], target.num_targets):
        raise ValueError(
            f"estimated must be [num_subsets, num_targets]=({masks.shape[0]}, "
            f"{target.num_targets}), got shape {estimated.shape}."
        )
    result = retraining.retrain(masks, data=data, target=target, spec=spec, key=key,
                                init_params=params, replicates=replicates,
                                chunk_size=chunk_size, return_params=True,
                                progress=progress)
    exact = result.losses.mean(0)
    tuned = jax.tree.map(lambda leaf: leaf[0], result.params)
    base_norm = otu.tree_norm(params)
    shift = jax.vmap(lambda p: otu.tree_norm(otu.tree_sub(p, params)))(tuned)
    linear_apply = linearize(spec.apply_fn, params)
    first_order = jax.lax.map(
        lambda p: spec.loss_fn(linear_apply(otu.tree_sub(p, params), target.inputs),
                               target.labels),
        tuned)
    mean_est, mean_exact = estimated.mean(axis=1), exact.mean(axis=1)
    return EstimationCheck(
        estimated=estimated,
        exact=exact,
        relative_error=jnp.abs(mean_est - mean_exact) / jnp.abs(mean_exact),
        column_relative_error=metrics.relative_error(
            true=exact, predicted=estimated).mean(axis=1),
        spearman=metrics.spearman(exact, estimated),
        param_shift=shift / base_norm,
        first_order=first_order,
    )
