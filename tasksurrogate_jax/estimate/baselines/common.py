"""What the three baselines share: input checks, the ``"auto"`` damping rule's
power iteration, and the gradients of task sums and targets.

Names without a leading underscore are used by the method modules
(:mod:`~tasksurrogate_jax.estimate.baselines.influence`,
:mod:`~tasksurrogate_jax.estimate.baselines.tracin`,
:mod:`~tasksurrogate_jax.estimate.baselines.trak`); this module imports none
of them.

**Damping.** ``damping="auto"`` (influence and TRAK) is ``DAMPING_FRACTION``
(0.05) × the largest eigenvalue of the matrix damped, found by power iteration
(:func:`top_eigenvalue`: fixed start ``EIGEN_SEED``, at most
``POWER_MAX_ITER`` matrix-vector products, stopping once the Rayleigh quotient
changes by less than ``POWER_TOL``, relative), so the same θ* and data give
the same λ.

**Memory.** Task gradient sums ``[K, p]`` and target gradients ``[T, p]`` (p
parameters) are accumulated over chunks of ``batch_size`` training examples
(one ``lax.scan``), never the ``[n, p]`` per-example gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import TaskData, check_target_matches
from tasksurrogate_jax.estimate.linearize import per_example_grads
from tasksurrogate_jax.estimate.projection import ravel_rows

AUTO = "auto"
# damping="auto" (influence and TRAK): λ = DAMPING_FRACTION × the largest
# eigenvalue of the matrix damped (see influence_scores for why).
DAMPING_FRACTION = 0.05
# Power iteration for the largest eigenvalue: fixed start, at most
# POWER_MAX_ITER matrix-vector products, stopping once the Rayleigh quotient
# changes by less than POWER_TOL (relative).
EIGEN_SEED = 0
POWER_MAX_ITER = 100
POWER_TOL = 1e-4


def top_eigenvalue(matvec: Callable, dim: int, dtype, *,
                   max_iter: int = POWER_MAX_ITER, tol: float = POWER_TOL):
    """The eigenvalue largest in magnitude of a symmetric ``[dim, dim]``
    operator, by power iteration from a fixed start (``EIGEN_SEED``).

    Returns the Rayleigh quotient ``vᵀ A v`` of the last unit iterate, after
    ``max_iter`` products or once it changes by less than ``tol`` (relative).
    It approaches the eigenvalue from below in magnitude, at the rate
    ``(λ_2 / λ_1)²`` per step. Jittable (``max_iter`` static).
    """
    # Drawn in float32 whatever dtype: the same start with 64-bit JAX on or off.
    v = jax.random.normal(jax.random.key(EIGEN_SEED), (dim,), jnp.float32).astype(
        dtype)
    v = v / jnp.linalg.norm(v)

    def cond(state):
        k, _, value, previous = state
        return (k < max_iter) & ((k < 2) | (jnp.abs(value - previous)
                                            > tol * jnp.abs(value)))

    def body(state):
        k, v, value, _ = state
        w = matvec(v)
        norm = jnp.linalg.norm(w)
        new_v = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v)
        return k + 1, new_v, jnp.vdot(v, w), value

    zero = jnp.zeros((), dtype)
    return jax.lax.while_loop(cond, body, (0, v, zero, zero))[2]


# ---------------------------------------------------------------------------
# Gradients (inside the jitted cores).


def _example_loss(apply_fn, loss_fn):
    """``(params, x, y) -> scalar`` loss of one example."""
    return lambda p, x, y: loss_fn(apply_fn(p, x[None]), y[None])[0]


def _chunk(x, batch_size, fill=None):
    """``[n, ...]`` -> ``[num_chunks, batch_size, ...]``, padding the last chunk
    with copies of row 0 (or ``fill``)."""
    n = x.shape[0]
    size = n if batch_size is None else min(batch_size, n)
    num = -(-n // size)
    extra = num * size - n
    if extra:
        pad = (jnp.repeat(x[:1], extra, axis=0) if fill is None
               else jnp.full((extra,) + x.shape[1:], fill, x.dtype))
        x = jnp.concatenate([x, pad])
    return x.reshape((num, size) + x.shape[1:])


def training_chunks(data: TaskData, dtype, batch_size):
    """``(inputs, labels, task_ids, weights)`` chunked; padding rows have id
    ``-1`` and weight 0."""
    weights = (data.task_ids >= 0).astype(dtype)
    return (_chunk(data.inputs, batch_size), _chunk(data.labels, batch_size),
            _chunk(data.task_ids, batch_size, -1), _chunk(weights, batch_size, 0))


def scan_sum(fn, chunks):
    """``Σ_c fn(*chunk_c)`` over the leading axis of ``chunks`` (one ``lax.scan``)."""
    first = jax.tree_util.tree_map(lambda a: a[0], chunks)
    if jax.tree_util.tree_leaves(chunks)[0].shape[0] == 1:
        return fn(*first)
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  jax.eval_shape(fn, *first))

    def step(acc, chunk):
        return jax.tree_util.tree_map(jnp.add, acc, fn(*chunk)), None

    return jax.lax.scan(step, init, chunks)[0]


def task_gradient_sums(apply_fn, loss_fn, params, data, chunks):
    """Task gradient sums ``∇G_k`` ``[K, p]``.

    A task's sum is the gradient of its summed loss: ``K`` backward passes per
    chunk (vmapped), never the ``[chunk, p]`` per-example gradients, whose
    memory grows with the chunk times ``p`` (6 GB for 1,437 digits and a
    1.1M-parameter MLP in one chunk).
    """

    def chunk_task_sums(x, y, ids, w):
        del w  # padding rows have id -1: a zero row of the one-hot
        members = jax.nn.one_hot(ids, data.num_tasks, dtype=params_dtype(params)).T

        def task_sum(member):  # [b] -> [p]
            grad = jax.grad(lambda p: jnp.sum(member * loss_fn(apply_fn(p, x), y)))
            return ravel_pytree(grad(params))[0]

        return jax.vmap(task_sum)(members)

    return scan_sum(chunk_task_sums, chunks)


def target_gradients(apply_fn, loss_fn, params, target, batch_size):
    """Per-target gradients ``∇ℓ_t`` ``[T, p]`` (only where ``T`` is small)."""
    return ravel_rows(per_example_grads(_example_loss(apply_fn, loss_fn), params,
                                        target.inputs, target.labels,
                                        batch_size=batch_size))


def target_derivatives(apply_fn, loss_fn, params, target, directions):
    """``[r, T]`` directional derivatives ``∇ℓ_tᵀ v_j`` of the target losses
    along ``directions`` ``[r, p]``: one forward-mode pass per direction, never
    the ``[T, p]`` target gradients."""
    _, unravel = ravel_pytree(params)

    def along(v):
        return jax.jvp(lambda p: loss_fn(apply_fn(p, target.inputs), target.labels),
                       (params,), (unravel(v),))[1]

    return jax.vmap(along)(directions)


def params_dtype(params):
    """The result dtype of the parameters' leaves."""
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------
# Validation (concrete arguments, before the jitted cores).


def check_common(apply_fn, params, data, target, loss_fn, batch_size):
    """The checks of every baseline: callables, ``TaskData`` with training
    examples, a matching target (unless ``None``), floating parameters that fit
    the model and a per-example loss."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a TaskData, got {type(data).__name__}.")
    if target is not None:
        check_target_matches(data, target)
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if not int(np.sum(np.asarray(data.task_ids) >= 0)):
        raise ValueError("data has no training examples (every row is padding).")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
                             for leaf in leaves):
        raise TypeError("params must be a non-empty pytree of floating arrays.")
    try:
        losses = jax.eval_shape(
            lambda p, x, y: loss_fn(apply_fn(p, x), y), params, data.inputs[:2],
            data.labels[:2])
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            "params do not match the model or the loss: "
            f"loss_fn(apply_fn(params, inputs), labels) failed with "
            f"{type(err).__name__}: {err}"
        ) from err
    if losses.shape != (min(2, data.num_examples),):
        raise ValueError(
            "loss_fn must return per-example losses [batch], got shape "
            f"{losses.shape} for a batch of {min(2, data.num_examples)}."
        )


def is_number(value) -> bool:
    """A Python or NumPy number, not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number))


def is_auto(value, name, what="a number") -> bool:
    """``value == "auto"``; any other string is an error."""
    if isinstance(value, str):
        if value != AUTO:
            raise ValueError(f"{name} must be {what} or 'auto', got {value!r}.")
        return True
    return False


def check_damping(damping) -> float:
    """A numeric damping: finite and >= 0, as a float."""
    if not is_number(damping):
        raise TypeError(
            f"damping must be a number or 'auto', got {type(damping).__name__}.")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be finite and >= 0, got {damping}.")
    return float(damping)


def check_finite(scores, what, fix):
    """``scores``, or a ValueError naming ``what`` and the ``fix`` if any entry
    is not finite."""
    bad = ~np.isfinite(np.asarray(scores))
    if bad.any():
        raise ValueError(
            f"{what} are not finite ({int(bad.sum())} entries): {fix}, and check "
            "that θ* and the data are finite."
        )
    return scores
