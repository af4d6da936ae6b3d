"""Pairwise task interactions and their ground truth from pair removals.

A kernel surrogate exists to capture second-order effects; this module checks
them against retrained scores. Scores ``F(s)`` are target *losses* (lower is
better), one column per target; average over the last axis for the mean
target.

**The quantity.** For tasks ``i != j`` of ``K``, with ``full`` the set of all
tasks and ``−i`` / ``−i−j`` the full set without ``i`` / without both,

    ``I_ij = F(−i−j) − F(−i) − F(−j) + F(full)``
    ``     = [F(−i−j) − F(−j)] − [F(−i) − F(full)]``,

the loss increase from removing ``i`` when ``j`` is already gone minus the
loss increase from removing ``i`` when ``j`` is there (symmetric in ``i, j``).
It is the discrete second difference of ``F`` at the full set, the same
quantity (and sign) as
:func:`tasksurrogate_jax.downstream.attribution.interaction_matrix` reads off a
surrogate and ``shared/design/METHOD.md`` §11 defines. For
``F(s) = c + Σ a_i s_i + Σ_{i<j} b_ij s_i s_j`` it is exactly ``b_ij``.

**Sign convention** (derived for losses):

- ``I_ij > 0``: *substitutes* (redundancy). Each covers for the other:
  removing one alone costs little, removing both costs a lot. Exact
  duplicates of a helpful source are the textbook case (``F(−i) ≈ F(full)``,
  ``F(−i−j) ≫ F(full)``). In general duplicates follow the curvature of the
  loss in the amount of their data: helpful data with diminishing returns
  gives ``> 0``; harm that saturates (two copies of the same wrong labels)
  gives ``< 0``.
- ``I_ij < 0``: *complements*. Each is useful only with the other (or each
  harmful alone and neutral together): removing either already costs what
  removing both costs, ``F(−i) ≈ F(−j) ≈ F(−i−j) > F(full)``, so
  ``I ≈ F(full) − F(−i) < 0``.
- *Conflicting* sources (``i`` with correct labels, ``j`` with wrong labels on
  the same inputs): ``i`` is worth more when ``j`` is there (it has something
  to counter) and ``j`` hurts less when ``i`` is there, so ``I_ij < 0``. With
  a model whose prediction on those inputs follows the label mix, ``c`` clean
  support and equal amounts of ``i`` and ``j``: ``F(full) = log(1 + 1/(c+1))``,
  ``F(−i) = log(1 + 1/c)``, ``F(−j) = F(−i−j) = 0``, ``I = F(full) − F(−i)
  < 0``.

Measured (fine-tuning truth of 8 replicates, mean target): on the digits
``cpu`` sources every pair of clean sources is at +0.002 to +0.007, the
flipped-label source against each clean one at −0.005 to −0.009 (conflict),
and the two mislabelled sources at −0.030 (saturating harm); the digits
``"interactions"`` preset plants twins (+0.05), a twin against its swapped
copy (−0.04) and two blends that only balance each other (−0.02), each sign
right in every replicate (``benchmarks/bench_interactions.py``).

**The ground truth** (:func:`pair_removal_masks`, :func:`pair_interactions`):
retrain the full set, the ``K`` leave-one-out sets and the ``P`` pair-removed
sets in ``R`` paired replicates, take ``I`` per replicate, average. Its
reliability over pairs (:func:`interaction_ceiling`) is the split-half
agreement of the replicates' interactions, as for the leave-one-out effects.

**Read off a surrogate**: :func:`surrogate_pair_interactions` (the same
quantity on the surrogate's predictions), :func:`banzhaf_interactions` and
:func:`shapley_interactions` (the second difference averaged over random
contexts instead of at the full set). :func:`compare_interactions` and
:func:`planted_signs_correct` score them against a truth;
:func:`pair_removal_errors` and :func:`normalized_error_difference` score the
predicted losses of the pair-removal subsets themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from tasksurrogate_jax._checks import (
    as_typed_key,
    check_float_dtype,
    check_positive_int,
)
from tasksurrogate_jax.core import metrics
from tasksurrogate_jax.truth import reliability

__all__ = [
    "PairInteractions",
    "all_pairs",
    "banzhaf_interactions",
    "check_pairs",
    "compare_interactions",
    "interaction_ceiling",
    "interactions_to_matrix",
    "normalized_error_difference",
    "pair_interactions",
    "pair_removal_errors",
    "pair_removal_masks",
    "planted_signs_correct",
    "sample_pairs",
    "shapley_interactions",
    "surrogate_pair_interactions",
]


# ----------------------------------------------------------------------------
# Pairs and masks
# ----------------------------------------------------------------------------


def all_pairs(num_tasks: int) -> np.ndarray:
    """Every pair ``(i, j)``, ``i < j``, in lexicographic order: ``[K(K−1)/2, 2]``
    int64."""
    num_tasks = check_positive_int(num_tasks, "num_tasks", minimum=2)
    i, j = np.triu_indices(num_tasks, k=1)
    return np.stack([i, j], axis=1).astype(np.int64)


def check_pairs(pairs, num_tasks: int) -> np.ndarray:
    """Validates ``[P, 2]`` pairs of distinct task indices in ``[0, K)``, no pair
    twice (in either order); returns them as int64 ``(min, max)`` rows in the
    given order."""
    if isinstance(pairs, (str, bytes)) or pairs is None:
        raise TypeError(f"pairs must be an integer array [P, 2], got "
                        f"{type(pairs).__name__}.")
    arr = np.asarray(pairs)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"pairs must be a non-empty [P, 2] array, got shape "
                         f"{arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer):
        whole = np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))
        if not whole:
            raise TypeError(f"pairs must hold integers, got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= num_tasks:
        raise ValueError(f"pairs must index tasks 0..{num_tasks - 1}, got values "
                         f"from {arr.min()} to {arr.max()}.")
    if np.any(arr[:, 0] == arr[:, 1]):
        bad = arr[arr[:, 0] == arr[:, 1]][0].tolist()
        raise ValueError(f"pairs must hold two distinct tasks, got {bad}.")
    arr = np.sort(arr, axis=1)
    if np.unique(arr, axis=0).shape[0] != arr.shape[0]:
        raise ValueError("pairs must not repeat a pair (in either order).")
    return arr


def sample_pairs(key, num_tasks: int, num_pairs: int) -> np.ndarray:
    """``num_pairs`` distinct pairs drawn uniformly without replacement, for
    when ``K(K−1)/2`` pair removals are too many to retrain: ``[P, 2]`` int64,
    ``i < j``, in lexicographic order. The same key gives the same pairs."""
    everything = all_pairs(num_tasks)
    num_pairs = check_positive_int(num_pairs, "num_pairs")
    if num_pairs > everything.shape[0]:
        raise ValueError(f"num_pairs must be <= {everything.shape[0]} (all pairs of "
                         f"{num_tasks} tasks), got {num_pairs}.")
    pick = jax.random.choice(as_typed_key(key), everything.shape[0], (num_pairs,),
                             replace=False)
    return everything[np.sort(np.asarray(pick))]


def pair_removal_masks(num_tasks: int, pairs=None, *, dtype=jnp.float32) -> jax.Array:
    """The subsets behind the pair-removal ground truth.

    Args:
      num_tasks: ``K``.
      pairs: ``[P, 2]`` pairs (``None``: :func:`all_pairs`).
      dtype: floating dtype of the masks.

    Returns:
      ``[1 + K + P, K]``: row 0 the full set, row ``1 + i`` the full set
      without task ``i``, row ``1 + K + p`` the full set without both tasks of
      pair ``p``.
    """
    num_tasks = check_positive_int(num_tasks, "num_tasks", minimum=2)
    check_float_dtype(dtype)
    pairs = all_pairs(num_tasks) if pairs is None else check_pairs(pairs, num_tasks)
    eye = np.eye(num_tasks)
    rows = np.concatenate([np.ones((1, num_tasks)), 1.0 - eye,
                           1.0 - eye[pairs[:, 0]] - eye[pairs[:, 1]]])
    return jnp.asarray(rows, dtype)


def _num_tasks_from_rows(rows: int, pairs, num_tasks) -> tuple[int, np.ndarray]:
    """``(K, pairs)`` consistent with ``rows = 1 + K + P``."""
    if num_tasks is not None:
        num_tasks = check_positive_int(num_tasks, "num_tasks", minimum=2)
    elif pairs is not None:
        num_tasks = rows - 1 - np.shape(pairs)[0]
        if num_tasks < 2:
            raise ValueError(f"scores have {rows} rows, too few for the full set, "
                             f"K >= 2 leave-one-out sets and {np.shape(pairs)[0]} "
                             "pairs.")
    else:  # all pairs: rows = 1 + K (K + 1) / 2
        num_tasks = int(round((math.sqrt(8 * rows - 7) - 1) / 2))
        if num_tasks < 2 or 1 + num_tasks * (num_tasks + 1) // 2 != rows:
            raise ValueError(
                f"scores have {rows} rows, which is 1 + K + K(K-1)/2 (the full set, "
                "the leave-one-out sets and every pair) for no K; pass pairs= or "
                "num_tasks=.")
    pairs = all_pairs(num_tasks) if pairs is None else check_pairs(pairs, num_tasks)
    expected = 1 + num_tasks + pairs.shape[0]
    if rows != expected:
        raise ValueError(f"scores have {rows} rows; the full set, {num_tasks} "
                         f"leave-one-out sets and {pairs.shape[0]} pairs make "
                         f"{expected} (rows of pair_removal_masks).")
    return num_tasks, pairs


# ----------------------------------------------------------------------------
# The ground truth
# ----------------------------------------------------------------------------


class PairInteractions(NamedTuple):
    """Pair interactions from pair-removal scores.

    Attributes:
      replicates: ``[R, P, T]`` ``I_ij`` of each replicate (float64).
      mean: ``[P, T]`` their mean over replicates: the ground truth.
      pairs: ``[P, 2]`` the pairs, in row order.
      num_tasks: ``K``.
    """

    replicates: np.ndarray
    mean: np.ndarray
    pairs: np.ndarray
    num_tasks: int


def pair_interactions(scores, *, pairs=None, num_tasks: int | None = None
                      ) -> PairInteractions:
    """``I_ij = F(−i−j) − F(−i) − F(−j) + F(full)`` per replicate and pair.

    Positive: substitutes (redundant, e.g. duplicated helpful sources);
    negative: complements or conflicting sources (see the module docstring).

    Args:
      scores: ``[R, 1 + K + P, T]`` per-replicate losses of
        :func:`pair_removal_masks` (rows in its order), or ``[1 + K + P, T]``
        (one replicate, or already averaged).
      pairs: the ``[P, 2]`` pairs the masks were made with (``None``: all).
      num_tasks: ``K``, if it cannot be told from the rows and ``pairs``.

    Returns:
      :class:`PairInteractions` (``replicates`` ``[R, P, T]``, ``R = 1`` for
      2-D scores).
    """
    if isinstance(scores, (str, bytes)) or scores is None:
        raise TypeError(f"scores must be a numeric array, got {type(scores).__name__}.")
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or min(x.shape) == 0:
        raise ValueError(f"scores must be [R, 1 + K + P, T] or [1 + K + P, T], got "
                         f"shape {np.shape(scores)}.")
    if not np.isfinite(x).all():
        raise ValueError(f"scores must be finite, found {int((~np.isfinite(x)).sum())} "
                         "non-finite values.")
    num_tasks, pairs = _num_tasks_from_rows(x.shape[1], pairs, num_tasks)
    full = x[:, :1]
    single = x[:, 1:1 + num_tasks]
    both = x[:, 1 + num_tasks:]
    values = both - single[:, pairs[:, 0]] - single[:, pairs[:, 1]] + full
    return PairInteractions(values, values.mean(0), pairs, num_tasks)


def _replicate_interactions(interactions) -> np.ndarray:
    if isinstance(interactions, PairInteractions):
        return interactions.replicates
    return np.asarray(interactions, dtype=np.float64)


def interaction_ceiling(interactions, *, key=None, seed: int = 0,
                        num_splits: int = 50) -> reliability.Reliability:
    """Split-half reliability of the replicate-averaged interactions over pairs.

    :func:`~tasksurrogate_jax.truth.reliability.subset_reliability` on the ``[R, P,
    T]`` per-replicate interactions: the replicates are split into halves, each
    half's mean interactions are ranked over the ``P`` pairs and correlated
    (Spearman, per target and on the target-mean interactions), averaged over
    splits and corrected from ``R/2`` to ``R`` replicates (Spearman-Brown).
    Since ``I`` is linear in the scores, a half's mean interactions are the
    interactions of its mean scores. ``mean`` is the ceiling of a per-target
    Spearman averaged over targets, ``mean_target`` that of the target-mean
    Spearman; ``sqrt`` of either is the most a noise-free method can expect.

    Args:
      interactions: :class:`PairInteractions` or ``[R, P, T]`` (``R >= 2``,
        ``P >= 2``).
      key, seed, num_splits: as in ``subset_reliability``.

    Returns:
      :class:`~tasksurrogate_jax.truth.reliability.Reliability`.
    """
    return reliability.subset_reliability(_replicate_interactions(interactions),
                                          key=key, seed=seed, num_splits=num_splits)


# ----------------------------------------------------------------------------
# Read off a surrogate
# ----------------------------------------------------------------------------


def _surrogate_tasks(surrogate, num_tasks) -> int:
    if not callable(getattr(surrogate, "predict", None)):
        raise TypeError(f"surrogate must have a predict(masks) method, got "
                        f"{type(surrogate).__name__}.")
    if num_tasks is None:
        num_tasks = getattr(surrogate, "num_tasks", None)
        if num_tasks is None:
            raise ValueError("pass num_tasks= for a surrogate without a num_tasks "
                             "attribute.")
    return check_positive_int(int(num_tasks), "num_tasks", minimum=2)


def _surrogate_dtype(surrogate):
    for name in ("alpha", "coef"):
        value = getattr(surrogate, name, None)
        if value is not None and jnp.issubdtype(jnp.asarray(value).dtype, jnp.floating):
            return jnp.asarray(value).dtype
    return jnp.result_type(float)


def surrogate_pair_interactions(surrogate, pairs=None, *,
                                num_tasks: int | None = None) -> jax.Array:
    """The ground truth's quantity on a surrogate's predictions: ``[P, T]``.

    ``ĝ(−i−j) − ĝ(−i) − ĝ(−j) + ĝ(full)`` on the rows of
    :func:`pair_removal_masks`; for the fitted surrogates the same values as
    ``attribution.interaction_matrix(surrogate)[i, j]``, identically 0 for a
    linear one.

    Args:
      surrogate: anything with ``predict(masks [n, K]) -> [n, T]``.
      pairs: ``[P, 2]`` (``None``: all pairs).
      num_tasks: ``K`` (default ``surrogate.num_tasks``).
    """
    num_tasks = _surrogate_tasks(surrogate, num_tasks)
    pairs = all_pairs(num_tasks) if pairs is None else check_pairs(pairs, num_tasks)
    masks = pair_removal_masks(num_tasks, pairs, dtype=_surrogate_dtype(surrogate))
    g = jnp.asarray(surrogate.predict(masks))
    g = g.reshape(g.shape[0], -1)
    single = g[1:1 + num_tasks]
    return g[1 + num_tasks:] - single[pairs[:, 0]] - single[pairs[:, 1]] + g[:1]


def _second_differences(surrogate, pairs, contexts, dtype):
    """``ĝ(C+i+j) − ĝ(C+i) − ĝ(C+j) + ĝ(C)`` per pair ``[P, T]``, ``contexts``
    ``[P, K]`` (columns ``i, j`` of row ``p`` are overwritten)."""
    num_pairs, num_tasks = contexts.shape
    eye = jnp.eye(num_tasks, dtype=dtype)
    e_i, e_j = eye[pairs[:, 0]], eye[pairs[:, 1]]
    base = contexts * (1.0 - e_i) * (1.0 - e_j)
    masks = jnp.concatenate([base + e_i + e_j, base + e_i, base + e_j, base])
    g = surrogate.predict(masks).reshape(4, num_pairs, -1)
    return g[0] - g[1] - g[2] + g[3]


def _draw_banzhaf(sample_key, pairs, num_tasks, dtype):
    """One context for every pair: each task in with probability 1/2."""
    s = jax.random.bernoulli(sample_key, jnp.float32(0.5), (num_tasks,)).astype(dtype)
    return jnp.broadcast_to(s, (pairs.shape[0], num_tasks))


def _draw_shapley(sample_key, pairs, num_tasks, dtype):
    """One size uniform in ``0..K−2`` and one random order; pair ``(i, j)``
    takes the first ``size`` tasks of the order other than ``i, j``."""
    k_size, k_order = jax.random.split(sample_key)
    size = jax.random.randint(k_size, (), 0, num_tasks - 1)
    uniforms = jax.random.uniform(k_order, (num_tasks,), jnp.float32)
    position = jnp.argsort(jnp.argsort(uniforms))
    pi, pj = position[pairs[:, 0]], position[pairs[:, 1]]  # [P]
    # Rank of each task among the tasks other than i, j (those two are
    # overwritten by _second_differences).
    rank = (position[None, :] - (pi[:, None] < position[None, :])
            - (pj[:, None] < position[None, :]))
    return (rank < size).astype(dtype)


def _sampled_mean(surrogate, keys, pairs, draw, num_tasks, dtype, batch_size):
    def one(sample_key):
        contexts = draw(sample_key, pairs, num_tasks, dtype)
        return _second_differences(surrogate, pairs, contexts, dtype)

    return jax.lax.map(one, keys, batch_size=batch_size).mean(axis=0)


_sampled_mean_jit = jax.jit(_sampled_mean, static_argnums=(3, 4, 5, 6))


def _is_array_pytree(surrogate) -> bool:
    """Whether ``surrogate`` can be passed through ``jax.jit`` (a pytree of
    arrays, as the fitted surrogates are), so repeated calls reuse one
    compiled program."""
    leaves = jax.tree_util.tree_leaves(surrogate)
    return bool(leaves) and leaves[0] is not surrogate and all(
        isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)


def _sampled_interactions(surrogate, draw, *, key, pairs, num_tasks, num_samples,
                          batch_size):
    num_tasks = _surrogate_tasks(surrogate, num_tasks)
    pairs = all_pairs(num_tasks) if pairs is None else check_pairs(pairs, num_tasks)
    num_samples = check_positive_int(num_samples, "num_samples")
    batch_size = check_positive_int(batch_size, "batch_size")
    dtype = np.dtype(_surrogate_dtype(surrogate))
    keys = jax.random.split(as_typed_key(key), num_samples)
    run = _sampled_mean_jit if _is_array_pytree(surrogate) else _sampled_mean
    return run(surrogate, keys, jnp.asarray(pairs), draw, num_tasks, dtype,
               batch_size)


def banzhaf_interactions(surrogate, *, key, pairs=None, num_samples: int = 1000,
                         batch_size: int = 64, num_tasks: int | None = None
                         ) -> jax.Array:
    """Banzhaf interaction indices of the loss surrogate: ``[P, T]``.

    ``E_C[ĝ(C+i+j) − ĝ(C+i) − ĝ(C+j) + ĝ(C)]`` over contexts ``C`` of the other
    tasks, each in with probability 1/2 (Grabisch & Roubens' Banzhaf
    interaction index of the game ``ĝ``, i.e. minus that of the value game
    ``v = −ĝ``): the same sign as :func:`surrogate_pair_interactions`
    (positive = substitutes), averaged over random contexts instead of taken
    at the full set. Each sample draws one context for all pairs (unbiased per
    pair; ``4 P`` predictions per sample). For ``ĝ`` quadratic in the mask
    every context gives ``b_ij``. Like any semivalue it queries subsets far
    from those a surrogate is usually fit on: a property of the surrogate.

    Args:
      surrogate: anything with ``predict(masks)``.
      key: PRNG key.
      pairs: ``[P, 2]`` (``None``: all pairs).
      num_samples: contexts drawn.
      batch_size: samples per vmapped chunk (memory).
      num_tasks: ``K`` (default ``surrogate.num_tasks``).
    """
    return _sampled_interactions(surrogate, _draw_banzhaf, key=key, pairs=pairs,
                                 num_tasks=num_tasks, num_samples=num_samples,
                                 batch_size=batch_size)


def shapley_interactions(surrogate, *, key, pairs=None, num_samples: int = 1000,
                         batch_size: int = 64, num_tasks: int | None = None
                         ) -> jax.Array:
    """Shapley interaction indices of the loss surrogate: ``[P, T]``.

    Grabisch's Shapley interaction index of ``ĝ`` (minus that of ``v = −ĝ``):
    ``Σ_C |C|! (K−|C|−2)! / (K−1)! · [ĝ(C+i+j) − ĝ(C+i) − ĝ(C+j) + ĝ(C)]``
    over subsets ``C`` of the other ``K − 2`` tasks, i.e. the mean of the
    second difference over a context size uniform in ``0..K−2`` and a uniform
    context of that size. Sampled: each sample draws one size and one random
    order of the tasks, and pair ``(i, j)`` takes the first ``size`` tasks of
    that order other than ``i, j`` (one context per pair, ``4 P``
    predictions per sample). Same sign as :func:`surrogate_pair_interactions`;
    ``b_ij`` for a quadratic ``ĝ``.

    Args: as :func:`banzhaf_interactions`.
    """

    return _sampled_interactions(surrogate, _draw_shapley, key=key, pairs=pairs,
                                 num_tasks=num_tasks, num_samples=num_samples,
                                 batch_size=batch_size)


def interactions_to_matrix(values, pairs, num_tasks: int) -> np.ndarray:
    """``[P, ...]`` pair values -> a symmetric ``[K, K, ...]`` matrix, zero on
    the diagonal and at pairs not given."""
    pairs = check_pairs(pairs, num_tasks)
    values = np.asarray(values, dtype=np.float64)
    if values.shape[:1] != (pairs.shape[0],):
        raise ValueError(f"values must have {pairs.shape[0]} rows (one per pair), "
                         f"got shape {values.shape}.")
    out = np.zeros((num_tasks, num_tasks) + values.shape[1:])
    out[pairs[:, 0], pairs[:, 1]] = values
    out[pairs[:, 1], pairs[:, 0]] = values
    return out


# ----------------------------------------------------------------------------
# Scoring predictions against a truth
# ----------------------------------------------------------------------------


def _as_pt(values, name: str, shape=None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [P, T] or [P], got shape {arr.shape}.")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} must have the truth's shape {shape}, got "
                         f"{arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite.")
    return arr


def _pearson_or_nan(x, y) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(scipy.stats.pearsonr(x, y).statistic)


def compare_interactions(truth, predicted: Mapping, *, level: float = 0.95,
                         num_resamples: int = 1000, seed: int = 0) -> dict:
    """Agreement of predicted with true interactions over the pairs.

    Args:
      truth: ``[P, T]`` (or ``[P]``) true interactions, e.g.
        ``pair_interactions(...).mean``.
      predicted: ``{method: [P, T]}`` on the same pairs, same shape.
      level, num_resamples, seed: of the bootstrap intervals.

    Returns:
      ``{method: {"spearman", "spearman_interval", "spearman_mean_target",
      "spearman_mean_target_interval", "pearson", "pearson_interval",
      "pearson_mean_target", "pearson_mean_target_interval"}}``. ``spearman``
      and ``pearson`` are per-target correlations over pairs averaged over
      targets (interval: targets resampled,
      :func:`~tasksurrogate_jax.truth.reliability.interval_over_targets`);
      ``*_mean_target`` correlate the target-mean interactions (interval:
      pairs resampled, as
      :func:`~tasksurrogate_jax.truth.reliability.loo_spearman_interval`). NaN where
      a side is constant (e.g. a linear surrogate's zeros).
    """
    true = _as_pt(truth, "truth")
    if true.shape[0] < 3:
        raise ValueError(f"need at least 3 pairs to correlate, got {true.shape[0]}.")
    interval = {"level": level, "num_resamples": num_resamples, "seed": seed}
    out = {}
    for name, values in predicted.items():
        pred = _as_pt(values, f"predicted[{name!r}]", true.shape)
        row = {}
        for method in ("spearman", "pearson"):
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = metrics.loo_correlation(true_effects=true,
                                               predicted_effects=pred, method=method)
            per_target = np.asarray(corr.per_target, dtype=np.float64)
            row[method] = float(np.nanmean(per_target)) if np.isfinite(
                per_target).any() else math.nan
            row[f"{method}_interval"] = reliability.interval_over_targets(
                per_target, **interval)
            row[f"{method}_mean_target"] = float(corr.mean_target)
        row["spearman_mean_target_interval"] = reliability.loo_spearman_interval(
            pred, true, **interval)
        row["pearson_mean_target_interval"] = reliability.bootstrap_interval(
            _pearson_or_nan, (pred.mean(1), true.mean(1)), **interval)
        out[name] = row
    return out


def planted_signs_correct(predicted, planted: Mapping, *, pairs=None) -> list[int]:
    """How many planted interaction signs a prediction gets right.

    Args:
      predicted: ``[P, T]`` or ``[P]`` values on ``pairs``, or (``pairs=None``)
        a ``[K, K, T]`` or ``[K, K]`` matrix (e.g.
        ``attribution.interaction_matrix``). The sign is read on the mean over
        targets.
      planted: ``{(i, j): sign}``, sign ``+1`` (substitutes) or ``-1``
        (complements); the order of ``i, j`` does not matter.
      pairs: the ``[P, 2]`` pairs of a ``[P, ...]`` prediction.

    Returns:
      ``[correct, total]``; a value of exactly 0 counts as wrong.
    """
    values = np.asarray(predicted, dtype=np.float64)
    if pairs is None:
        if values.ndim not in (2, 3) or values.shape[0] != values.shape[1]:
            raise ValueError(
                "predicted must be a [K, K] or [K, K, T] matrix, or pass pairs= for "
                f"[P] or [P, T] values; got shape {values.shape}.")
        matrix = values if values.ndim == 2 else values.mean(2)
        num_tasks = values.shape[0]

        def lookup(i, j):
            return matrix[i, j]
    else:
        if values.ndim not in (1, 2):
            raise ValueError(f"predicted must be [P] or [P, T] with pairs, got shape "
                             f"{values.shape}.")
        num_tasks = int(np.max(pairs)) + 1
        pairs = check_pairs(pairs, num_tasks)
        if values.shape[0] != pairs.shape[0]:
            raise ValueError(f"predicted has {values.shape[0]} rows for "
                             f"{pairs.shape[0]} pairs.")
        mean = values if values.ndim == 1 else values.mean(1)
        index = {tuple(p): n for n, p in enumerate(pairs.tolist())}

        def lookup(i, j):
            if (i, j) not in index:
                raise ValueError(f"planted pair {(i, j)} is not among pairs.")
            return mean[index[(i, j)]]
    if not isinstance(planted, Mapping) or not planted:
        raise ValueError("planted must be a non-empty {(i, j): sign} mapping.")
    correct = 0
    for pair, sign in planted.items():
        i, j = sorted(int(t) for t in pair)
        if i == j or i < 0 or (pairs is None and j >= num_tasks):
            raise ValueError(f"planted pair {pair} is not a pair of two distinct "
                             f"tasks of 0..{num_tasks - 1}.")
        if sign not in (1, -1):
            raise ValueError(f"planted signs must be +1 or -1, got {sign!r} for "
                             f"{pair}.")
        correct += int(np.sign(lookup(i, j)) == sign)
    return [correct, len(planted)]


def pair_removal_errors(true_scores, predicted: Mapping) -> dict:
    """Pooled normalized error (:func:`~tasksurrogate_jax.core.metrics.
    pooled_normalized_error`, 0 = perfect, 1 = each target's mean) of each
    method's predicted losses of the pair-removal subsets.

    Args:
      true_scores: ``[n, T]`` mean true losses of the subsets (e.g. of
        :func:`pair_removal_masks`).
      predicted: ``{method: [n, T]}`` predicted losses of the same subsets
        (e.g. ``surrogate.predict(masks)``).

    Returns:
      ``{method: float}``.
    """
    true = np.asarray(true_scores, dtype=np.float64)
    return {name: float(metrics.pooled_normalized_error(
        true=true, predicted=np.asarray(values, dtype=np.float64)))
        for name, values in predicted.items()}


def normalized_error_difference(true_scores, predicted_a, predicted_b, *,
                                level: float = 0.95, num_resamples: int = 1000,
                                seed: int = 0) -> dict:
    """Pooled normalized error of ``a`` minus that of ``b``, with a paired
    bootstrap interval over the subsets (rows resampled together for both).

    Args:
      true_scores: ``[n, T]`` (or ``[n]``) true losses of the subsets.
      predicted_a, predicted_b: the two methods' predictions, same shape.
      level, num_resamples, seed: of the bootstrap interval
        (:func:`~tasksurrogate_jax.truth.reliability.bootstrap_interval`).

    Returns:
      ``{"a", "b", "difference", "difference_interval"}`` (floats; the
      interval a ``(low, high)`` tuple): a difference and interval below 0
      say ``a`` predicts these subsets better.
    """
    true = np.asarray(true_scores, dtype=np.float64)
    a = np.asarray(predicted_a, dtype=np.float64)
    b = np.asarray(predicted_b, dtype=np.float64)
    if true.ndim == 1:
        true, a, b = true[:, None], a[:, None], b[:, None]
    if not true.shape == a.shape == b.shape or true.ndim != 2:
        raise ValueError(f"true_scores, predicted_a and predicted_b must share one "
                         f"[n, T] shape, got {true.shape}, {a.shape}, {b.shape}.")

    def error(t, p):
        variance = np.mean(np.var(t, axis=0))
        return float(np.mean((p - t) ** 2) / variance) if variance > 0 else math.nan

    def statistic(rows):  # resampled row indices (as floats)
        rows = rows.astype(np.int64)
        return error(true[rows], a[rows]) - error(true[rows], b[rows])

    everything = np.arange(true.shape[0], dtype=np.float64)
    return {"a": error(true, a), "b": error(true, b),
            "difference": statistic(everything),
            "difference_interval": reliability.bootstrap_interval(
                statistic, (everything,), level=level,
                num_resamples=num_resamples, seed=seed)}
