"""Task attributions and interactions read off a fitted surrogate ``g(s) ≈ F(s)``.

Scores ``F`` are target *losses* (lower is better). Every attribution here has
one sign convention: **positive = the task helps the target** (removing it, or
leaving it out of a coalition, raises the predicted loss). All functions return
per-target arrays; average over the last axis for the mean target.

- :func:`loo_scores`: ``ĝ(1 − e_i) − ĝ(1)``, ``[K, T]``, comparable with the
  true leave-one-out effects ``F(1 − e_i) − F(1)``. For a linear surrogate this
  is ``−coef`` exactly.
- :func:`interaction_matrix`: ``ĝ(1) − ĝ(1−e_i) − ĝ(1−e_j) + ĝ(1−e_i−e_j)``,
  ``[K, K, T]``, zero on the diagonal and identically zero for a linear
  surrogate. It is (effect of removing i when j is already gone) minus (effect
  of removing i when j is there): positive when i and j are substitutes (each
  matters more without the other), negative when they are complements.
- :func:`banzhaf_values`, :func:`shapley_values`: the game ``v(s) = −ĝ(s)``,
  estimated by sampling coalitions (Banzhaf: uniform over subsets; Shapley:
  random orders), vmapped over samples and chunked. They query the surrogate
  on subsets of every size, far from the near-full subsets it was usually fit
  on; read them as properties of the surrogate.
- :func:`fixed_size_effects`, :func:`fixed_size_interactions`: the same
  questions asked only of subsets of one size (e.g. k-shot prompts, where a
  surrogate fit on k-subsets is never evaluated elsewhere): how much better a
  task fills an open slot than the average candidate, and how much a pair
  together departs from the sum of its members, in random contexts.
  :func:`fixed_size_effects_from_scores` is the quantity
  :func:`fixed_size_effects` estimates, computed from scores of the subsets
  themselves (true scores of every k-subset, say): the ground truth the
  pipeline compares it with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import (
    as_typed_key,
    check_masks,
    check_positive_int,
    check_scores,
)
from tasksurrogate_jax.core.subsets import leave_one_out_masks
from tasksurrogate_jax.core.surrogates import (
    LinearSurrogate,
    check_surrogate,
    surrogate_coefficients,
)


def _dtype(surrogate):
    return surrogate_coefficients(surrogate).dtype


def loo_scores(surrogate) -> jax.Array:
    """Predicted leave-one-out effects ``ĝ(1 − e_i) − ĝ(1)``: ``[K, T]``."""
    num_tasks = check_surrogate(surrogate)
    if isinstance(surrogate, LinearSurrogate):
        return -surrogate.coef
    masks = leave_one_out_masks(num_tasks, dtype=_dtype(surrogate))
    predictions = surrogate.predict(masks)
    return predictions[1:] - predictions[0]


def interaction_matrix(surrogate) -> jax.Array:
    """Pairwise interactions ``ĝ(1) − ĝ(1−e_i) − ĝ(1−e_j) + ĝ(1−e_i−e_j)``.

    Returns:
      ``[K, K, T]``, symmetric in the first two axes, zero on the diagonal.
    """
    num_tasks = check_surrogate(surrogate)
    if isinstance(surrogate, LinearSurrogate):
        return jnp.zeros((num_tasks, num_tasks, surrogate.coef.shape[1]),
                         surrogate.coef.dtype)
    eye = jnp.eye(num_tasks, dtype=_dtype(surrogate))
    pairs = 1.0 - jnp.clip(eye[:, None, :] + eye[None, :, :], 0.0, 1.0)  # [K, K, K]
    both = surrogate.predict(pairs.reshape(num_tasks * num_tasks, num_tasks))
    both = both.reshape(num_tasks, num_tasks, -1)
    single = jnp.diagonal(both, axis1=0, axis2=1).T  # ĝ(1 − e_i): [K, T]
    full = surrogate.predict(jnp.ones((1, num_tasks), eye.dtype))[0]
    out = full - single[:, None, :] - single[None, :, :] + both
    return out * (1.0 - eye)[:, :, None]


def _sampled_mean(values_fn, key, num_samples, batch_size):
    """Mean over ``num_samples`` keys of ``values_fn(key) -> [K, T]``, in chunks."""
    num_samples = check_positive_int(num_samples, "num_samples")
    batch_size = check_positive_int(batch_size, "batch_size")
    keys = jax.random.split(as_typed_key(key), num_samples)
    return jax.lax.map(values_fn, keys, batch_size=batch_size).mean(axis=0)


def banzhaf_values(surrogate, *, key, num_samples: int = 1000,
                   batch_size: int = 64) -> jax.Array:
    """Banzhaf values of ``v(s) = −ĝ(s)``: ``E_s[ĝ(s − e_i) − ĝ(s + e_i)]``.

    The other tasks of ``s`` are in with probability 1/2 each; each sample ``s``
    serves every task i (paired evaluations with i out and in).

    Args:
      surrogate: a fitted surrogate.
      key: PRNG key.
      num_samples: coalitions drawn.
      batch_size: samples evaluated per vmapped chunk (memory).

    Returns:
      ``[K, T]``.
    """
    num_tasks = check_surrogate(surrogate)
    dtype = _dtype(surrogate)
    eye = jnp.eye(num_tasks, dtype=dtype)

    def one(sample_key):
        s = jax.random.bernoulli(sample_key, jnp.float32(0.5), (num_tasks,))
        s = s.astype(dtype)
        without = s[None, :] * (1.0 - eye)  # row i: s with task i out
        with_task = jnp.maximum(without, eye)  # row i: s with task i in
        scores = surrogate.predict(jnp.concatenate([without, with_task]))
        return scores[:num_tasks] - scores[num_tasks:]

    return _sampled_mean(one, key, num_samples, batch_size)


def shapley_values(surrogate, *, key, num_samples: int = 1000,
                   batch_size: int = 64) -> jax.Array:
    """Shapley values of ``v(s) = −ĝ(s)`` by sampling task orders.

    For a random order, adding the tasks one by one from the empty set, task i's
    contribution is ``ĝ(before i) − ĝ(before i + e_i)``. Each order gives all K
    contributions from K + 1 predictions, and they sum to ``ĝ(∅) − ĝ(1)``
    (efficiency holds for every sample, hence for the estimate).

    Args:
      surrogate: a fitted surrogate.
      key: PRNG key.
      num_samples: orders drawn.
      batch_size: orders evaluated per vmapped chunk (memory).

    Returns:
      ``[K, T]``.
    """
    num_tasks = check_surrogate(surrogate)
    dtype = _dtype(surrogate)
    # prefixes[k] holds the first k tasks of the order (in order positions).
    prefixes = jnp.tril(jnp.ones((num_tasks + 1, num_tasks), dtype), k=-1)

    def one(sample_key):
        order = jax.random.permutation(sample_key, num_tasks)
        masks = jnp.zeros_like(prefixes).at[:, order].set(prefixes)
        scores = surrogate.predict(masks)  # [K + 1, T]
        contributions = scores[:-1] - scores[1:]  # by position in the order
        return jnp.zeros_like(contributions).at[order].set(contributions)

    return _sampled_mean(one, key, num_samples, batch_size)


def _random_context(sample_key, num_tasks, context_size, dtype):
    """``[K]`` mask of ``context_size`` tasks drawn uniformly."""
    ranks = jnp.argsort(jax.random.uniform(sample_key, (num_tasks,), jnp.float32))
    return jnp.zeros(num_tasks, dtype).at[ranks[:context_size]].set(1.0)


def _check_size(size, num_tasks, minimum):
    """A subset size in ``[minimum, num_tasks - 1]`` (one task left to choose)."""
    size = check_positive_int(size, "size", minimum=minimum)
    if size > num_tasks:
        raise ValueError(f"size must be <= num_tasks={num_tasks}, got {size}.")
    if size == num_tasks:
        raise ValueError(f"size must be < num_tasks={num_tasks} to leave a choice.")
    return size


def fixed_size_effects(surrogate, *, key, size: int, num_samples: int = 1000,
                       batch_size: int = 64) -> jax.Array:
    """Value of each task in subsets of exactly ``size`` tasks.

    For a random context ``C`` of ``size - 1`` tasks, task i's effect is the
    mean of ``ĝ(C + e_j)`` over the tasks ``j`` outside ``C`` minus
    ``ĝ(C + e_i)``: how much lower the predicted loss is with i in the open
    slot than with an average candidate (positive = helps). Averaged over the
    contexts that leave i out. Only ``size``-subsets are evaluated.

    Args:
      surrogate: a fitted surrogate.
      key: PRNG key.
      size: the subset size (e.g. the shots of a prompt).
      num_samples: contexts drawn.
      batch_size: contexts evaluated per vmapped chunk.

    Returns:
      ``[K, T]``.
    """
    num_tasks = check_surrogate(surrogate)
    size = _check_size(size, num_tasks, 1)
    dtype = _dtype(surrogate)
    eye = jnp.eye(num_tasks, dtype=dtype)

    def one(sample_key):
        context = _random_context(sample_key, num_tasks, size - 1, dtype)
        free = 1.0 - context  # [K]
        scores = surrogate.predict(jnp.maximum(context[None, :], eye))  # [K, T]
        mean = (free @ scores) / free.sum()
        return jnp.stack([(mean - scores) * free[:, None],
                          jnp.broadcast_to(free[:, None], scores.shape)])

    total, count = _sampled_mean(one, key, num_samples, batch_size)
    return total / jnp.maximum(count, 1e-30)


def fixed_size_effects_from_scores(masks, scores) -> np.ndarray:
    """The value of each task within subsets of one size, from their scores.

    With ``k`` the common size of the subsets, task i's effect is

        ``(K - k) / (K - k + 1) * (mean F(s) over the subsets without i
        - mean F(s) over the subsets with i)``

    (positive = helps). Over every k-subset (or a uniform sample of them) this
    is what :func:`fixed_size_effects` estimates by sampling contexts: a
    context ``C`` of ``k - 1`` tasks and an open slot give each k-subset with
    i once (``C + e_i``) and each k-subset without i ``k`` times, so the mean
    over the open slot minus ``F(C + e_i)``, averaged over the contexts
    without i, is the expression above.

    Args:
      masks: ``[n, K]`` subsets, every row of the same size ``k < K``.
      scores: ``[n, T]`` their scores (losses).

    Returns:
      ``[K, T]`` float64 (NumPy).
    """
    check_scores(scores, num_rows=check_masks(masks).shape[0])
    masks = np.asarray(masks, np.float64)
    scores = np.asarray(scores, np.float64).reshape(masks.shape[0], -1)
    num_tasks = masks.shape[1]
    sizes = masks.sum(1)
    size = int(sizes[0])
    if not (sizes == size).all():
        raise ValueError(
            f"masks must all hold the same number of tasks, got sizes from "
            f"{int(sizes.min())} to {int(sizes.max())}."
        )
    if not 1 <= size < num_tasks:
        raise ValueError(f"masks must hold 1 to {num_tasks - 1} tasks each, got "
                         f"{size}.")
    with_count = masks.sum(0)
    without_count = masks.shape[0] - with_count
    missing = np.nonzero((with_count == 0) | (without_count == 0))[0]
    if missing.size:
        raise ValueError(
            f"tasks {missing[:10].tolist()} are in every subset or in none; each "
            "task needs subsets with and without it (score more subsets)."
        )
    with_mean = masks.T @ scores / with_count[:, None]
    without_mean = (1.0 - masks).T @ scores / without_count[:, None]
    scale = (num_tasks - size) / (num_tasks - size + 1)
    return scale * (without_mean - with_mean)


def fixed_size_interactions(surrogate, *, key, size: int, num_samples: int = 200,
                            batch_size: int = 8) -> jax.Array:
    """Pairwise interactions within subsets of exactly ``size`` tasks.

    For a random context ``C`` of ``size - 2`` tasks, ``P_ij = ĝ(C + e_i + e_j)``
    over the pairs outside ``C``; the interaction is ``P`` double-centred
    (minus its least-squares additive part ``c + u_i + u_j``), averaged over the
    contexts that leave both i and j out. Same sign as
    :func:`interaction_matrix`: positive when i and j are substitutes (the
    pair is worse than its members' separate values add up to), negative when
    they are complements. Zero for a linear surrogate. Only ``size``-subsets
    are evaluated (``K²`` per context).

    Args:
      surrogate: a fitted surrogate.
      key: PRNG key.
      size: the subset size, from 2 to ``K - 1``.
      num_samples: contexts drawn.
      batch_size: contexts evaluated per vmapped chunk.

    Returns:
      ``[K, K, T]``, symmetric, zero on the diagonal.
    """
    num_tasks = check_surrogate(surrogate)
    size = _check_size(size, num_tasks, 2)
    dtype = _dtype(surrogate)
    eye = jnp.eye(num_tasks, dtype=dtype)
    off_diagonal = 1.0 - eye

    def one(sample_key):
        context = _random_context(sample_key, num_tasks, size - 2, dtype)
        free = 1.0 - context
        valid = free[:, None] * free[None, :] * off_diagonal  # [K, K]
        pairs = jnp.maximum(context, eye[:, None, :] + eye[None, :, :])
        scores = surrogate.predict(pairs.reshape(-1, num_tasks))
        scores = scores.reshape(num_tasks, num_tasks, -1) * valid[:, :, None]
        # Least-squares additive part c + u_i + u_j (sum u = 0) of the n x n
        # off-diagonal block, from its row sums R_i = (n-1) c + (n-2) u_i.
        n = free.sum()
        row_sums = scores.sum(1)  # [K, T]
        c = row_sums.sum(0) / (n * (n - 1))
        u = (row_sums - (n - 1) * c) / (n - 2) * free[:, None]
        centred = scores - c - u[:, None, :] - u[None, :, :]
        return jnp.stack([centred * valid[:, :, None],
                          jnp.broadcast_to(valid[:, :, None], centred.shape)])

    total, count = _sampled_mean(one, key, num_samples, batch_size)
    return total / jnp.maximum(count, 1e-30)


__all__ = [
    "banzhaf_values",
    "fixed_size_effects",
    "fixed_size_effects_from_scores",
    "fixed_size_interactions",
    "interaction_matrix",
    "loo_scores",
    "shapley_values",
]
