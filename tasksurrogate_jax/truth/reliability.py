"""How trustworthy a retrained ground truth is, and confidence intervals.

The ground truth of an attribution benchmark is the mean over ``R`` paired
replicates of retraining (within a replicate every subset shares the
initialisation and data order; see docs/method.md). Its *reliability* is
the expected agreement between two independent ground truths of ``R``
replicates each. It is estimated split-half: the replicates are split into two
halves, the halves' means are correlated (Spearman), and the result is
corrected from half to ``R`` replicates with the Spearman-Brown formula.

A method's correlation with that ground truth is limited by it: for a
noise-free method the attenuation bound is ``sqrt(reliability)``, and a noisy
method sits lower still. Tables print the reliability beside each score as the
``ceiling``, with bootstrap intervals (:func:`bootstrap_interval`, a thin
wrapper around :func:`scipy.stats.bootstrap`).
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import scipy.stats

from tasksurrogate_jax._checks import as_typed_key, check_positive_int
from tasksurrogate_jax.core import metrics

__all__ = [
    "Reliability",
    "bootstrap_interval",
    "interval_over_targets",
    "loo_reliability",
    "loo_spearman_interval",
    "spearman_brown",
    "subset_reliability",
]

_METHODS = ("percentile", "basic", "bca")


def spearman_brown(r, factor):
    """Predicted reliability of an average of ``factor`` times as many replicates.

    Args:
      r: reliability (scalar or array) of the current average.
      factor: how many times as many replicates (may be fractional, > 0).

    Returns:
      ``factor * r / (1 + (factor - 1) * r)``, a numpy array or float.
    """
    r = np.asarray(r, dtype=float)
    factor = np.asarray(factor, dtype=float)
    if not np.all(np.isfinite(factor) & (factor > 0)):
        raise ValueError(f"factor must be finite and > 0, got {factor}.")
    out = factor * r / (1.0 + (factor - 1.0) * r)
    return float(out) if out.ndim == 0 else out


class Reliability(NamedTuple):
    """Split-half reliability of a ground truth averaged over replicates.

    Attributes:
      per_target: ``[num_targets]`` corrected reliability of each target (NaN
        for a target whose scores are constant in every split).
      mean: split-half Spearman averaged over targets (``split_half_mean``),
        Spearman-Brown-corrected to ``num_replicates``: the ceiling of a
        per-target figure averaged over targets (``LOOCorrelation.mean``). This
        is the correction of the mean, not the mean of ``per_target``.
      mean_target: the same for the target-mean scores (averaged over targets
        before ranking), corrected.
      split_half_mean: uncorrected split-half value behind ``mean``.
      split_half_mean_target: uncorrected split-half value behind
        ``mean_target``.
      num_replicates: ``R``.
      num_splits: how many splits were averaged (all distinct splits when
        there are no more than the requested ``num_splits``).

    The field names follow :class:`~tasksurrogate_jax.core.metrics.LOOCorrelation`:
    ``per_target`` an array, ``mean`` its summary, ``mean_target`` the
    target-mean figure.
    """

    per_target: np.ndarray
    mean: float
    mean_target: float
    split_half_mean: float
    split_half_mean_target: float
    num_replicates: int
    num_splits: int


def _check_replicates(x, name: str, min_rows: int, rows: str) -> np.ndarray:
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}.")
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a numeric array, got {type(x).__name__}."
        ) from err
    if arr.ndim != 3:
        raise ValueError(
            f"{name} must be 3-D [num_replicates, {rows}, num_targets], got shape "
            f"{arr.shape}."
        )
    if arr.shape[0] < 2:
        raise ValueError(
            f"a ceiling needs at least 2 replicates, got R={arr.shape[0]} "
            f"({name} has shape {arr.shape})."
        )
    if arr.shape[1] < min_rows or arr.shape[2] < 1:
        raise ValueError(
            f"{name} must have at least {min_rows} rows ({rows}) and one target, "
            f"got shape {arr.shape}."
        )
    if not np.isfinite(arr).all():
        raise ValueError(
            f"{name} must be finite, found {int((~np.isfinite(arr)).sum())} "
            "non-finite values."
        )
    return arr


def _rng(key, seed) -> np.random.Generator:
    if key is not None:
        return np.random.default_rng(
            np.asarray(jax.random.key_data(as_typed_key(key))).ravel()
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    return np.random.default_rng(int(seed))


def _split_halves(num_replicates: int, num_splits: int, rng) -> np.ndarray:
    """``[S, R]`` booleans: True for the ``floor(R/2)`` replicates of half A."""
    half = num_replicates // 2
    # Unordered splits: for even R fix replicate 0 in half A to drop mirrors.
    distinct = math.comb(num_replicates, half) // (2 if num_replicates % 2 == 0 else 1)
    if distinct <= num_splits:
        halves = [
            c
            for c in itertools.combinations(range(num_replicates), half)
            if num_replicates % 2 or 0 in c
        ]
    else:
        halves = [rng.permutation(num_replicates)[:half] for _ in range(num_splits)]
    in_a = np.zeros((len(halves), num_replicates), bool)
    for s, c in enumerate(halves):
        in_a[s, list(c)] = True
    return in_a


def _correct(split_half, num_replicates: int):
    """Half (``n = R / 2`` replicates, fractional for odd R) -> R replicates."""
    n = num_replicates / 2
    single = split_half / (n - (n - 1) * split_half)
    return spearman_brown(single, num_replicates)


def _split_half(x: np.ndarray, num_splits: int, rng) -> Reliability:
    """Split-half agreement across the rows of ``x`` ``[R, m, T]``."""
    num_replicates, m = x.shape[:2]
    in_a = _split_halves(num_replicates, num_splits, rng)
    mean_a = np.einsum("sr,rmt->smt", in_a / in_a.sum(1, keepdims=True), x)
    mean_b = np.einsum("sr,rmt->smt", ~in_a / (~in_a).sum(1, keepdims=True), x)
    num = len(in_a)

    def agreement(a, b):  # [S, m, C] -> [S, C], one Spearman call for all splits
        cols = a.shape[2]
        a = a.transpose(1, 0, 2).reshape(m, num * cols)
        b = b.transpose(1, 0, 2).reshape(m, num * cols)
        return np.asarray(metrics.spearman(a, b), float).reshape(num, cols)

    with warnings.catch_warnings():  # all-NaN targets (constant scores) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        per_split = agreement(mean_a, mean_b)
        half_values = np.nanmean(per_split, axis=0)
        half_per_target = float(np.nanmean(per_split))
        half_mean_target = float(
            np.nanmean(
                agreement(mean_a.mean(2, keepdims=True), mean_b.mean(2, keepdims=True))
            )
        )
    return Reliability(
        per_target=np.asarray(_correct(half_values, num_replicates)),
        mean=float(_correct(half_per_target, num_replicates)),
        mean_target=float(_correct(half_mean_target, num_replicates)),
        split_half_mean=half_per_target,
        split_half_mean_target=half_mean_target,
        num_replicates=num_replicates,
        num_splits=num,
    )


def subset_reliability(
    replicate_scores, *, key=None, seed: int = 0, num_splits: int = 50
) -> Reliability:
    """Reliability of replicate-averaged scores of subsets (e.g. held-out LDS).

    For ``num_splits`` random splits of the ``R`` replicates into halves of
    ``floor(R/2)`` and ``ceil(R/2)`` replicates, the halves' mean scores are
    compared across the ``m`` subsets: Spearman per target (NaNs ignored when
    averaging over targets) and Spearman of the target-mean. The split-half
    values are averaged over splits, then corrected from ``n = R/2`` to ``R``
    replicates: ``r1 = r_h / (n - (n - 1) r_h)``, ``spearman_brown(r1, R)``
    (``2 r_h / (1 + r_h)`` for even R). When there are no more distinct splits
    than ``num_splits`` (e.g. 3 for R=4, 10 for R=5), all of them are used.
    Negative split-half values are corrected as they are (no clipping).

    Args:
      replicate_scores: ``[num_replicates, num_subsets, num_targets]``, R >= 2,
        num_subsets >= 2.
      key: optional JAX PRNG key for the splits; overrides ``seed``.
      seed: integer seed used when ``key`` is None.
      num_splits: number of random splits to average.

    Returns:
      ``Reliability``; the same key (or seed) gives the same result.
    """
    x = _check_replicates(replicate_scores, "replicate_scores", 2, "num_subsets")
    num_splits = check_positive_int(num_splits, "num_splits")
    return _split_half(x, num_splits, _rng(key, seed))


def loo_reliability(
    replicate_scores, *, key=None, seed: int = 0, num_splits: int = 50
) -> Reliability:
    """Reliability of replicate-averaged leave-one-out effects.

    Row 0 of each replicate holds the full-set scores and rows ``1..K`` the
    leave-one-out scores, so the effects of replicate ``r`` are
    ``scores[r, 1:] - scores[r, 0]`` ``[K, T]``; their agreement across the
    ``K`` tasks is measured as in :func:`subset_reliability`.

    Args:
      replicate_scores: ``[num_replicates, num_tasks + 1, num_targets]``,
        R >= 2, num_tasks >= 2.
      key: optional JAX PRNG key for the splits; overrides ``seed``.
      seed: integer seed used when ``key`` is None.
      num_splits: number of random splits to average.

    Returns:
      ``Reliability`` of the LOO effects.
    """
    x = _check_replicates(replicate_scores, "replicate_scores", 3, "num_tasks + 1")
    return subset_reliability(
        x[:, 1:] - x[:, :1], key=key, seed=seed, num_splits=num_splits
    )


def bootstrap_interval(
    statistic: Callable[..., float],
    data,
    *,
    level: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
    method: str = "percentile",
) -> tuple[float, float]:
    """Bootstrap confidence interval (``scipy.stats.bootstrap``, paired).

    Args:
      statistic: ``statistic(*arrays) -> float`` on one resample.
      data: a tuple of arrays with the same length ``n >= 2`` along axis 0,
        resampled together (the same rows of each).
      level: confidence level in (0, 1).
      num_resamples: number of bootstrap resamples.
      seed: seed of the numpy generator.
      method: ``"percentile"``, ``"basic"`` or ``"BCa"``.

    Returns:
      ``(low, high)``. ``(nan, nan)`` when the bootstrap distribution is
      degenerate: all resampled statistics equal, any of them NaN, or scipy
      unable to form the interval (it would warn).
    """
    if not callable(statistic):
        raise TypeError(f"statistic must be callable, got {type(statistic).__name__}.")
    if isinstance(data, np.ndarray) or not isinstance(data, (tuple, list)):
        raise TypeError(f"data must be a tuple of arrays, got {type(data).__name__}.")
    arrays = tuple(np.asarray(a, dtype=float) for a in data)
    if not arrays or any(a.ndim == 0 for a in arrays):
        raise ValueError("data must hold at least one array of at least 1 dimension.")
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(
            "data arrays must share one length n >= 2 along axis 0 (they are "
            f"paired), got lengths {[len(a) for a in arrays]}."
        )
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("data must be finite.")
    if (
        isinstance(level, bool)
        or not isinstance(level, numbers.Real)
        or not 0 < level < 1
    ):
        raise ValueError(f"level must be a number in (0, 1), got {level!r}.")
    num_resamples = check_positive_int(num_resamples, "num_resamples")
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise ValueError(
            f"method must be 'percentile', 'basic' or 'BCa', got {method!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    with warnings.catch_warnings():  # degenerate cases are reported as NaN
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = scipy.stats.bootstrap(
            arrays,
            statistic,
            n_resamples=num_resamples,
            vectorized=False,
            paired=True,
            confidence_level=float(level),
            method=method,
            rng=np.random.default_rng(int(seed)),
        )
    dist = np.asarray(res.bootstrap_distribution, float)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.isnan(dist).any() or np.ptp(dist) == 0 or np.isnan([low, high]).any():
        return math.nan, math.nan
    return low, high


def interval_over_targets(
    per_target_values,
    *,
    level: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of the mean over targets, resampling targets.

    Args:
      per_target_values: ``[num_targets]``, e.g. per-target Spearman; NaN
        entries (undefined targets) are dropped first, as ``nanmean`` would.
      level, num_resamples, seed: as in :func:`bootstrap_interval`.

    Returns:
      ``(low, high)``; ``(nan, nan)`` when fewer than 2 targets are not NaN.
    """
    values = np.asarray(per_target_values, dtype=float)
    if values.ndim != 1:
        raise ValueError(
            f"per_target_values must be 1-D [num_targets], got shape {values.shape}."
        )
    if np.isinf(values).any():
        raise ValueError("per_target_values must not hold infinite values.")
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return math.nan, math.nan
    return bootstrap_interval(
        np.mean, (values,), level=level, num_resamples=num_resamples, seed=seed
    )


def _spearman_or_nan(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(scipy.stats.spearmanr(x, y).statistic)


def loo_spearman_interval(
    predicted_effects,
    true_effects,
    *,
    level: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of the Spearman of target-mean predicted vs. true LOO effects.

    Tasks are resampled (paired rows). A resample in which either side is
    constant has no Spearman (NaN), which makes the interval ``(nan, nan)``;
    with distinct effects this only happens for a handful of tasks (K <= 5).

    Args:
      predicted_effects: ``[num_tasks]`` or ``[num_tasks, num_targets]``
        (averaged over targets first).
      true_effects: same shape.
      level, num_resamples, seed: as in :func:`bootstrap_interval`.

    Returns:
      ``(low, high)``.
    """
    predicted = np.asarray(predicted_effects, dtype=float)
    true = np.asarray(true_effects, dtype=float)
    if predicted.shape != true.shape or predicted.ndim not in (1, 2):
        raise ValueError(
            "predicted_effects and true_effects must have the same shape [num_tasks]"
            f" or [num_tasks, num_targets], got {predicted.shape} and {true.shape}."
        )
    for name, values in (("predicted_effects", predicted), ("true_effects", true)):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} must be finite, got "
                             f"{int((~np.isfinite(values)).sum())} non-finite values.")
    if predicted.ndim == 2:
        predicted, true = predicted.mean(1), true.mean(1)
    return bootstrap_interval(
        _spearman_or_nan,
        (predicted, true),
        level=level,
        num_resamples=num_resamples,
        seed=seed,
    )
