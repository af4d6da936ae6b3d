"""Agreement between predicted and true scores, column-wise over targets.

Arrays are ``[n, num_targets]`` (rows = subsets or tasks, columns = targets); 1-D
inputs are one target. All functions are jittable.

Concrete inputs must be finite (a ``ValueError`` names the argument); under
``jit`` that check is skipped and a NaN propagates to its column.

One argument order: the ground truth first, then the prediction. Where the
order changes the result (an error normalised by the truth) the arguments are
keyword-only, ``true=`` and ``predicted=`` (``true_effects=`` and
``predicted_effects=`` for effects), so a swapped call cannot pass silently.
The correlations (:func:`pearson`, :func:`spearman`, :func:`mean_spearman`)
are symmetric and positional.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import as_float_array, is_concrete


def _pair(x, y, names=("x", "y")):
    x = as_float_array(x, names[0])
    y = as_float_array(y, names[1])
    if x.shape != y.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {x.shape} and "
            f"{y.shape}."
        )
    if x.ndim not in (1, 2) or x.shape[0] < 2:
        raise ValueError(
            f"{names[0]} and {names[1]} must be [n, num_targets] or [n] with n >= 2, "
            f"got shape {x.shape}."
        )
    for name, arr in zip(names, (x, y), strict=True):
        if not is_concrete(arr):
            continue
        # NumPy, not jnp: inside a trace (e.g. a closure) jnp would stage it.
        finite = np.isfinite(np.asarray(arr))
        if not finite.all():
            raise ValueError(
                f"{name} must be finite, found {int((~finite).sum())} NaN or "
                "infinite values (a NaN would silently drop its column from the "
                "means over targets)."
            )
    dtype = jnp.result_type(x, y)
    return x.astype(dtype), y.astype(dtype)


def rankdata(x, axis: int = 0) -> jax.Array:
    """Ranks 1..n along ``axis``, ties getting their average rank (as scipy).

    A column holding a NaN ranks as all NaN (scipy's ``nan_policy="propagate"``).

    The values are sorted once together with their positions and the ties are
    read off that one sorted copy. (Looking each value up in a separately
    sorted copy breaks under ``jit``: XLA may recompute a fused input with
    different rounding for the lookup, and a value no longer finds itself,
    which gave invalid ranks such as a 1.5 without a partner.)
    """
    x = as_float_array(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension to rank along, got a "
                         "scalar.")
    return _ranks(x, axis)


def _ranks_1d(v):
    n = v.shape[0]
    position = jnp.arange(n)
    s, order = jax.lax.sort((v, position), num_keys=1)
    differs = s[1:] != s[:-1]
    first = jnp.concatenate([jnp.ones(1, bool), differs])
    last = jnp.concatenate([differs, jnp.ones(1, bool)])
    start = jax.lax.cummax(jnp.where(first, position, 0))
    end = jax.lax.cummin(jnp.where(last, position, n - 1), reverse=True)
    average = (start + end) / 2.0 + 1.0
    ranks = jnp.zeros(n, average.dtype).at[order].set(average)
    return jnp.where(jnp.any(jnp.isnan(v)), jnp.nan, ranks)


# One compiled program per shape (an eager call would lower each of its ops,
# every process: most of a rerun's time when the pipeline reuses its stages).
@functools.partial(jax.jit, static_argnums=1)
def _ranks(x, axis: int):
    moved = jnp.moveaxis(x, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    ranked = jax.vmap(_ranks_1d)(flat).reshape(moved.shape)
    return jnp.moveaxis(ranked.astype(jnp.result_type(x.dtype, float)), -1, axis)


@jax.jit
def _pearson_columns(x, y):
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    denom = jnp.sqrt(jnp.sum(xc * xc, axis=0) * jnp.sum(yc * yc, axis=0))
    # A constant column has no correlation: NaN, as scipy returns.
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, jnp.sum(xc * yc, axis=0) / safe, jnp.nan)


def pearson(x, y) -> jax.Array:
    """Pearson correlation per column: ``[num_targets]`` (scalar for 1-D input)."""
    x, y = _pair(x, y)
    return _pearson_columns(x, y)


def spearman(x, y) -> jax.Array:
    """Spearman correlation per column (average ranks for ties, as scipy).

    Returns:
      ``[num_targets]`` (a scalar for 1-D input); NaN for a constant column.
    """
    x, y = _pair(x, y)
    return _spearman_columns(x, y)


@jax.jit
def _spearman_columns(x, y):
    return _pearson_columns(_ranks(x, 0), _ranks(y, 0))


def mean_spearman(true, predicted) -> jax.Array:
    """Mean over targets of the per-target Spearman across rows (NaNs ignored).

    This is the held-out (LDS-style) score: rows are held-out subsets.
    """
    return jnp.nanmean(spearman(true, predicted))


def normalized_error(*, true, predicted) -> jax.Array:
    """Per-target ``MSE / Var(true)``: ``[num_targets]`` (0 = perfect, 1 = mean)."""
    true, predicted = _pair(true, predicted, ("true", "predicted"))
    mse = jnp.mean((predicted - true) ** 2, axis=0)
    return mse / jnp.var(true, axis=0)


def pooled_normalized_error(*, true, predicted) -> jax.Array:
    """``sum_t MSE_t / sum_t Var_t(true)``: one figure over all targets (0 =
    perfect, 1 = as good as each target's mean). Unlike a mean of per-target
    ratios, targets whose scores barely vary cannot dominate it."""
    true, predicted = _pair(true, predicted, ("true", "predicted"))
    return jnp.mean((predicted - true) ** 2) / jnp.mean(jnp.var(true, axis=0))


def relative_error(*, true, predicted) -> jax.Array:
    """Elementwise ``|predicted - true| / |true|``."""
    true, predicted = _pair(true, predicted, ("true", "predicted"))
    return jnp.abs(predicted - true) / jnp.abs(true)


class LOOCorrelation(NamedTuple):
    """Correlation of predicted with true leave-one-out effects across tasks.

    Attributes:
      per_target: ``[num_targets]`` correlation over the K tasks for each target.
      mean: mean of ``per_target`` (NaNs ignored).
      mean_target: correlation for the mean target (effects averaged over
        targets first).
    """

    per_target: jax.Array
    mean: jax.Array
    mean_target: jax.Array


def loo_correlation(*, true_effects, predicted_effects, method: str = "spearman"):
    """Agreement of predicted and true LOO effects ``[num_tasks, num_targets]``.

    Args:
      true_effects: ``[num_tasks, num_targets]`` (or ``[num_tasks]``), e.g.
        ``F(s* - e_i) - F(s*)`` from retraining.
      predicted_effects: same shape.
      method: ``"spearman"`` or ``"pearson"``.

    Returns:
      ``LOOCorrelation``.
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}.")
    predicted, true = _pair(predicted_effects, true_effects,
                            ("predicted_effects", "true_effects"))
    if predicted.ndim == 1:
        predicted, true = predicted[:, None], true[:, None]
    corr = spearman if method == "spearman" else pearson
    per_target = corr(predicted, true)
    mean_target = corr(predicted.mean(axis=1), true.mean(axis=1))
    return LOOCorrelation(per_target, jnp.nanmean(per_target), mean_target)
