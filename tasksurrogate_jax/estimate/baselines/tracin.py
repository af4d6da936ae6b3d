"""TracIn at ``θ*`` (or along checkpoints), at task level.

The classic, uncentred form: ``tracin[i, t] = Σ_c η_c ∇ℓ_t(θ_c)ᵀ ∇G_i(θ_c) / W``,
task i's first-order share of a full-batch gradient step ``−η_c ∇L`` at each
checkpoint ``θ_c`` (``L``, ``G_i`` and ``W`` as in
:mod:`~tasksurrogate_jax.estimate.baselines`).

Memory: ``[K, p]`` task gradient sums (p parameters), accumulated over chunks
of ``batch_size`` training examples (never ``[n, p]``); one jitted program per
checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax.data import TargetData, TaskData
from tasksurrogate_jax.estimate.baselines.common import (
    check_common,
    check_finite,
    params_dtype,
    target_derivatives,
    task_gradient_sums,
    training_chunks,
)
from tasksurrogate_jax.losses import softmax_cross_entropy


def tracin_scores(
    apply_fn: Callable, checkpoints: Sequence, data: TaskData, target: TargetData,
    *, loss_fn: Callable = softmax_cross_entropy, learning_rates=None,
    batch_size: int | None = None,
) -> jax.Array:
    """TracIn at task level: ``Σ_c η_c ∇ℓ_t(θ_c)ᵀ ∇G_i(θ_c) / W`` (module doc).

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs[b, ...]``.
      checkpoints: a list or tuple of parameter pytrees of one structure; pass
        ``[params]`` for ``θ*`` alone.
      data: the training data (padding rows are ignored).
      target: the target examples.
      loss_fn: per-example loss ``(outputs, labels) -> [b]``.
      learning_rates: ``[num_checkpoints]`` weights ``η_c`` (default all 1).
      batch_size: training / target examples per chunk.

    Returns:
      ``[num_tasks, num_targets]`` (positive = helps).
    """
    if not isinstance(checkpoints, (list, tuple)) or not checkpoints:
        raise TypeError(
            "checkpoints must be a non-empty list or tuple of parameter pytrees, got "
            f"{type(checkpoints).__name__}; for θ* alone pass [params]."
        )
    structure = jax.tree_util.tree_structure(checkpoints[0])
    for c, ckpt in enumerate(checkpoints):
        if jax.tree_util.tree_structure(ckpt) != structure:
            raise ValueError(
                f"checkpoints[{c}] has a different pytree structure from "
                "checkpoints[0]; every checkpoint must be parameters of one model."
            )
    check_common(apply_fn, checkpoints[0], data, target, loss_fn, batch_size)
    if learning_rates is None:
        rates = np.ones(len(checkpoints))
    else:
        rates = np.asarray(learning_rates, dtype=float)
        if rates.shape != (len(checkpoints),):
            raise ValueError(
                f"learning_rates must have shape ({len(checkpoints)},) (one per "
                f"checkpoint), got {rates.shape}."
            )
        if not np.all(np.isfinite(rates)):
            raise ValueError(f"learning_rates must be finite, got {rates.tolist()}.")
    scores = None
    for rate, ckpt in zip(rates, checkpoints, strict=True):
        term = _tracin_one(apply_fn, loss_fn, ckpt, data, target,
                           batch_size=batch_size)
        term = jnp.asarray(rate, term.dtype) * term
        scores = term if scores is None else scores + term
    return check_finite(scores, "TracIn scores", "check the checkpoints")


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("batch_size",))
def _tracin_one(apply_fn, loss_fn, params, data, target, *, batch_size):
    dtype = params_dtype(params)
    chunks = training_chunks(data, dtype, batch_size)
    total = jnp.sum((data.task_ids >= 0).astype(dtype))
    task_sums = task_gradient_sums(apply_fn, loss_fn, params, data, chunks)
    return target_derivatives(apply_fn, loss_fn, params, target, task_sums) / total
