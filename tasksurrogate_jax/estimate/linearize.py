"""Gradients and Jacobians of a model at ``θ*``, projected on the fly.

The model is ``apply_fn(params, inputs[batch, ...]) -> outputs[batch, ...]`` as
in :mod:`tasksurrogate_jax.truth.retraining`; per-example functions apply it to a
batch of one. Work over examples is chunked with ``lax.map(batch_size=...)``, so
memory grows with the chunk, not with the data set.

Projected Jacobians ``J(x) P`` (``[C, d]`` per example, C outputs) are computed
in the cheaper mode for the shapes at hand (``mode="auto"``):

- reverse mode: C vector-Jacobian products per example, each projected
  (costs about C backward passes plus C·p·d multiply-adds);
- forward mode: d Jacobian-vector products with the columns of P as tangents
  (about d forward passes; the tangents are built once and shared by every
  example, at d·p memory).

``"auto"`` takes reverse mode when ``C <= d`` (the usual case: a few classes,
hundreds of projection dimensions) and forward mode otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tasksurrogate_jax.estimate.projection import Projection, project, unproject
from tasksurrogate_jax.truth.chunking import chunked_vmap

JACOBIAN_MODES = ("auto", "reverse", "forward")


def _one(apply_fn):
    """Per-example version of a batched ``apply_fn``."""
    return lambda params, x: apply_fn(params, x[None])[0]


def per_example_grads(
    loss_fn: Callable, params, inputs, labels, *, projection: Projection | None = None,
    batch_size: int | None = None,
):
    """Gradients of a per-example scalar loss, optionally projected.

    Args:
      loss_fn: ``loss_fn(params, x, y) -> scalar`` for one example.
      params: parameter pytree ``θ*``.
      inputs: ``[n, ...]``.
      labels: ``[n, ...]``.
      projection: if given, return ``∇ℓ_n(θ*)^T P``.
      batch_size: examples per chunk.

    Returns:
      ``[n, proj_dim]`` with a projection, else a params-shaped pytree with a
      leading ``n`` axis.
    """

    def one(xy):
        grad = jax.grad(loss_fn)(params, *xy)
        return grad if projection is None else project(projection, grad)

    return chunked_vmap(one, (inputs, labels), batch_size)


def projected_jacobians(
    apply_fn: Callable, params, inputs, *, projection: Projection,
    batch_size: int | None = None, mode: str = "auto",
) -> jax.Array:
    """Projected Jacobians ``J(x_n) P`` of a vector output per example.

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs[b, C]``.
      params: ``θ*``.
      inputs: ``[n, ...]``.
      projection: P, ``[p, proj_dim]`` implicitly.
      batch_size: examples per chunk.
      mode: ``"auto"``, ``"reverse"`` or ``"forward"`` (see the module doc).

    Returns:
      ``[n, C, proj_dim]``.
    """
    if mode not in JACOBIAN_MODES:
        raise ValueError(f"mode must be one of {JACOBIAN_MODES}, got {mode!r}.")
    f = _one(apply_fn)
    num_outputs = jax.eval_shape(f, params, inputs[0]).shape
    if len(num_outputs) != 1:
        raise ValueError(
            "apply_fn must return [batch, num_outputs] for projected_jacobians, got "
            f"per-example output shape {num_outputs}."
        )
    if mode == "auto":
        mode = "reverse" if num_outputs[0] <= projection.proj_dim else "forward"

    if mode == "reverse":
        def one(x):
            jac = jax.jacrev(f)(params, x)  # leaves [C, *leaf_shape]
            return project(projection, jac, batch_dims=1)

        return chunked_vmap(one, inputs, batch_size)

    tangents = unproject(projection, jnp.eye(projection.proj_dim), params)

    def one_forward(x):
        def jvp(tangent):
            return jax.jvp(lambda p: f(p, x), (params,), (tangent,))[1]

        return jax.vmap(jvp)(tangents).T  # [C, d]

    return chunked_vmap(one_forward, inputs, batch_size)


def linearize(apply_fn: Callable, params):
    """The first-order model ``f(θ* + Δ, x) ≈ f(θ*, x) + J(x) Δ``.

    Args:
      apply_fn: batched model ``(params, inputs) -> outputs``.
      params: ``θ*``.

    Returns:
      ``linear_apply(delta, inputs) -> outputs``, with ``delta`` a params-shaped
      pytree, evaluated through one ``jax.jvp`` (no Jacobian is materialised).
      It is linear in ``delta``, so it can be trained with optax like any model.
    """

    def linear_apply(delta, inputs):
        outputs, tangent = jax.jvp(lambda p: apply_fn(p, inputs), (params,), (delta,))
        return outputs + tangent

    return linear_apply


def per_task_sums(per_example, task_ids, num_tasks: int):
    """Sums per-example rows within each task (a segment sum).

    Args:
      per_example: ``[n, ...]`` array or pytree of arrays (e.g. projected
        per-example gradients ``[n, d]``).
      task_ids: ``[n]`` ints in ``[0, num_tasks)``; padding rows (``-1``, as in
        ``TaskData``, or any id outside that range) are dropped.
      num_tasks: K.

    Returns:
      ``[num_tasks, ...]`` (a pytree for pytree input).
    """
    task_ids = jnp.asarray(task_ids)
    return jax.tree_util.tree_map(
        lambda leaf: jax.ops.segment_sum(leaf, task_ids, num_segments=num_tasks),
        per_example)
