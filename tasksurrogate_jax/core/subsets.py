"""Subset masks over K tasks: ``[num_subsets, num_tasks]`` arrays of 0/1.

A mask row ``s`` keeps task ``i`` when ``s[i] == 1``. All random samplers take an
explicit PRNG key: the same key gives the same masks, with 64-bit JAX on or
off (the random numbers are drawn in float32 either way). Masks are floating point
(``float32`` by default) because they are fed straight into kernels and
linear models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import (
    check_bool,
    check_float_dtype,
    check_key,
    check_masks,
    check_positive_int,
)

MAX_EXHAUSTIVE_TASKS = 20


def bernoulli_masks(
    key, num_subsets: int, num_tasks: int, *, p: float = 0.5, unique: bool = False,
    dtype=jnp.float32,
) -> jax.Array:
    """Keeps each task independently with probability ``p``.

    Args:
      key: PRNG key.
      num_subsets: number of rows ``m``.
      num_tasks: number of tasks ``K``.
      p: keep probability, in (0, 1].
      unique: if True, return ``m`` distinct rows (draws more until there are
        enough; not jittable, since it inspects the draws).
      dtype: floating dtype of the masks.

    Returns:
      ``[num_subsets, num_tasks]`` masks.
    """
    num_subsets = check_positive_int(num_subsets, "num_subsets")
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    if isinstance(p, (bool, np.bool_)) or not isinstance(
            p, (int, float, np.integer, np.floating)):
        raise TypeError(f"p must be a number in (0, 1], got {p!r}.")
    if not 0.0 < float(p) <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}.")
    unique = check_bool(unique, "unique")
    check_float_dtype(dtype)

    def draw(k, m):
        return jax.random.bernoulli(k, jnp.float32(p), (m, num_tasks)).astype(dtype)

    if unique:
        possible = 2**num_tasks if p < 1 else 1
        return _distinct_rows(key, num_subsets, draw, possible)
    return draw(check_key(key), num_subsets)


def fixed_size_masks(
    key, num_subsets: int, num_tasks: int, *, subset_size: int, unique: bool = False,
    dtype=jnp.float32,
) -> jax.Array:
    """Subsets of exactly ``subset_size`` tasks, each drawn uniformly.

    The paper's modular-arithmetic protocol drops 3 of 25 tasks: ``subset_size=22``.

    Returns:
      ``[num_subsets, num_tasks]`` masks whose rows each sum to ``subset_size``.
    """
    num_subsets = check_positive_int(num_subsets, "num_subsets")
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    subset_size = check_positive_int(subset_size, "subset_size", minimum=0)
    if subset_size > num_tasks:
        raise ValueError(
            f"subset_size must be <= num_tasks={num_tasks}, got {subset_size}."
        )
    unique = check_bool(unique, "unique")
    check_float_dtype(dtype)

    def draw(k, m):
        # The ranks of i.i.d. uniforms form a uniform random permutation.
        uniforms = jax.random.uniform(k, (m, num_tasks), jnp.float32)
        ranks = jnp.argsort(jnp.argsort(uniforms, 1), 1)
        return (ranks < subset_size).astype(dtype)

    if unique:
        return _distinct_rows(key, num_subsets, draw, _binomial(num_tasks, subset_size))
    return draw(check_key(key), num_subsets)


def size_range_masks(
    key, num_subsets: int, num_tasks: int, *, min_size: int, max_size: int,
    unique: bool = False, dtype=jnp.float32,
) -> jax.Array:
    """Subsets of ``min_size`` to ``max_size`` tasks, uniform over all of them.

    Each of the ``sum_s C(K, s)`` subsets is equally likely: the size ``s`` is
    drawn with probability proportional to ``C(K, s)``, then a uniform subset of
    that size. This is ``bernoulli_masks(p=0.5)`` conditioned on the size, e.g.
    ``min_size=1, max_size=K - 2``: every subset but the empty one, the full
    set and the leave-one-out sets.

    Returns:
      ``[num_subsets, num_tasks]`` masks.
    """
    num_subsets = check_positive_int(num_subsets, "num_subsets")
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    min_size = check_positive_int(min_size, "min_size", minimum=0)
    max_size = check_positive_int(max_size, "max_size", minimum=0)
    if not min_size <= max_size <= num_tasks:
        raise ValueError(
            f"need 0 <= min_size <= max_size <= num_tasks={num_tasks}, got "
            f"min_size={min_size}, max_size={max_size}."
        )
    unique = check_bool(unique, "unique")
    check_float_dtype(dtype)
    sizes = np.arange(min_size, max_size + 1)
    counts = [_binomial(num_tasks, int(s)) for s in sizes]
    log_counts = jnp.log(jnp.asarray(counts, jnp.float32))

    def draw(k, m):
        k_size, k_order = jax.random.split(k)
        size = jnp.asarray(sizes)[jax.random.categorical(k_size, log_counts,
                                                         shape=(m,))]
        ranks = jnp.argsort(jnp.argsort(
            jax.random.uniform(k_order, (m, num_tasks), jnp.float32), 1), 1)
        return (ranks < size[:, None]).astype(dtype)

    if unique:
        return _distinct_rows(key, num_subsets, draw, sum(counts))
    return draw(check_key(key), num_subsets)


def leave_one_out_masks(num_tasks: int, *, dtype=jnp.float32) -> jax.Array:
    """The full set and the K leave-one-out subsets.

    Returns:
      ``[num_tasks + 1, num_tasks]``: row 0 keeps every task, row ``i + 1`` keeps
      every task but task ``i``.
    """
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    check_float_dtype(dtype)
    full = jnp.ones((1, num_tasks), dtype)
    return jnp.concatenate([full, 1 - jnp.eye(num_tasks, dtype=dtype)], axis=0)


def all_masks(num_tasks: int, *, include_empty: bool = False, dtype=jnp.float32):
    """Every non-empty subset of K tasks (K at most 20), in binary counting order.

    Row ``j`` keeps task ``i`` when bit ``i`` of ``j + 1`` is set (of ``j``
    with ``include_empty=True``).

    The empty set is left out by default: no model can be trained on it
    (:func:`retraining.retrain` refuses masks that keep no example), so these
    masks can be retrained as they are. Pass ``include_empty=True`` for every
    subset, e.g. for exact semivalues of a surrogate, which query ``g(∅)``.

    Returns:
      ``[2**num_tasks - 1, num_tasks]`` masks (``[2**num_tasks, num_tasks]``,
      the empty set first, with ``include_empty=True``).
    """
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    include_empty = check_bool(include_empty, "include_empty")
    check_float_dtype(dtype)
    if num_tasks > MAX_EXHAUSTIVE_TASKS:
        raise ValueError(
            f"num_tasks must be <= {MAX_EXHAUSTIVE_TASKS} to list every subset "
            f"(2**{num_tasks} rows), got {num_tasks}; sample masks instead."
        )
    index = jnp.arange(2**num_tasks, dtype=jnp.uint32)
    bits = (index[:, None] >> jnp.arange(num_tasks, dtype=jnp.uint32)) & 1
    masks = bits.astype(dtype)
    return masks if include_empty else masks[1:]


def unique_masks(masks, *, return_index: bool = False):
    """Removes duplicate rows, keeping first occurrences in their original order.

    Not jittable: the number of rows returned depends on the values.

    Returns:
      ``[num_unique, num_tasks]`` masks, and with ``return_index`` the indices of
      the kept rows in ``masks``.
    """
    arr = check_masks(masks)
    _, first = np.unique(np.asarray(arr), axis=0, return_index=True)
    keep = np.sort(first)
    out = arr[keep]
    return (out, keep) if return_index else out


def _distinct_rows(key, num_subsets: int, draw, num_possible: int) -> jax.Array:
    """Draws batches from ``draw(key, m)`` until ``num_subsets`` distinct rows."""
    if num_subsets > num_possible:
        raise ValueError(
            f"num_subsets={num_subsets} distinct subsets were asked for but only "
            f"{num_possible} exist."
        )
    key = check_key(key)
    rows = draw(key, num_subsets)
    rows = unique_masks(rows)
    attempt = 0
    while rows.shape[0] < num_subsets:
        attempt += 1
        if attempt > 10_000:
            raise RuntimeError("could not draw enough distinct subsets.")
        more = draw(jax.random.fold_in(key, attempt), num_subsets)
        rows = unique_masks(jnp.concatenate([rows, more], axis=0))
    return rows[:num_subsets]


def _binomial(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)
