"""The first-order (linearized) model at ``θ*``: outputs and projected
features of examples, and its losses.

Every training and target example gets its outputs and projected Jacobian at
``θ*`` (``linearize.projected_jacobians``):
``f(x; θ* + P w) ≈ f(x; θ*) + J(x) P w``. Both estimators
(:mod:`~tasksurrogate_jax.estimate.convex`,
:mod:`~tasksurrogate_jax.estimate.finetune`) work on these
:class:`Linearized` examples.

Output modes:

- ``"logits"``: C outputs per example, multinomial cross-entropy on the
  linearized logits; features ``[n, C, d]``.
- ``"margin"``: one output per example, the correct-class log-odds
  ``m = z_y - logsumexp(z_{-y})``; since ``-log softmax(z)_y = softplus(-m)``,
  the loss is ``softplus(-m)`` (the exact cross-entropy at ``θ*``); features
  ``[n, d]``. Cheaper by a factor C.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from tasksurrogate_jax.estimate.linearize import (
    per_example_grads,
    projected_jacobians,
)
from tasksurrogate_jax.estimate.projection import (
    make_projection,
    num_parameters,
    unproject,
)
from tasksurrogate_jax.losses import margin, softmax_cross_entropy

OUTPUT_MODES = ("logits", "margin")


class Linearized(NamedTuple):
    """Outputs and projected Jacobians of examples at ``θ*``.

    Attributes:
      outputs: ``[n, C]`` logits (``"logits"``) or ``[n]`` margins (``"margin"``).
      features: ``[n, C, d]`` or ``[n, d]``: ``J(x_n) P``.
      labels: ``[n]`` integer labels.
    """

    outputs: jax.Array
    features: jax.Array
    labels: jax.Array


def example_losses(outputs, labels, output_mode: str):
    """Per-example cross-entropy from logits ``[n, C]`` or margins ``[n]``."""
    if output_mode == "logits":
        return softmax_cross_entropy(outputs, labels)
    return margin_cross_entropy(outputs, labels)


def margin_cross_entropy(margins, labels):
    """Cross-entropy ``softplus(-m)`` of correct-class log-odds ``[b]``."""
    del labels  # the margin is already the correct class's
    return jax.nn.softplus(-margins)


def linear_model(w, inputs):
    """The projected linearized model on stacked inputs.

    Args:
      w: ``[d]`` update coordinates.
      inputs: ``[..., 1 + d]``: ``f(x; θ*)`` in slot 0, then ``J(x) P``.

    Returns:
      ``[...]``: ``f(x; θ*) + J(x) P w``.
    """
    return inputs[..., 0] + inputs[..., 1:] @ w


def linear_outputs(examples: Linearized, w):
    return examples.outputs + examples.features @ w


def target_losses(target: Linearized, w, output_mode: str):
    """``[m, T]`` target losses of the linearized model at ``w`` ``[m, d]``."""
    return jax.vmap(lambda wi: example_losses(linear_outputs(target, wi),
                                              target.labels, output_mode))(w)


def linearized_examples(
    apply_fn: Callable, params, inputs, labels, *, projection, output_mode: str,
    batch_size: int | None = None, scale=None,
) -> Linearized:
    """Outputs and projected Jacobians at ``params`` for a set of examples.

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> logits[b, C]``.
      params: ``θ*``.
      inputs: ``[n, ...]``.
      labels: ``[n]`` integer labels.
      projection: a :class:`~tasksurrogate_jax.estimate.projection.Projection` (P,
        ``[p, d]`` implicitly).
      output_mode: ``"logits"`` or ``"margin"``.
      batch_size: examples per chunk.
      scale: ``None``, or a params-shaped pytree ``S``: the features are then
        ``J(x) diag(S) P``, the Jacobian of ``w ↦ f(x; θ* + S ⊙ P w)`` at 0
        (the Adam preconditioner's, see
        :func:`~tasksurrogate_jax.estimate.finetune.linearized_finetune_scores`).

    Returns:
      :class:`Linearized`: features ``[n, C, d]`` (``"logits"``) or ``[n, d]``.
    """
    check_output_mode(output_mode)
    if scale is not None and (jax.tree.structure(scale)
                              != jax.tree.structure(params)):
        raise ValueError("scale must be a pytree shaped like params (one factor "
                         "per parameter).")
    return _linearized_examples(apply_fn, params, inputs, labels, projection,
                                output_mode, batch_size, scale)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _linearized_examples(apply_fn, params, inputs, labels, projection, output_mode,
                         batch_size, scale):
    if scale is not None:  # the model of u = P w around u = 0: θ* + S ⊙ u
        model, theta = apply_fn, params
        params = jax.tree.map(jnp.zeros_like, theta)

        def apply_fn(u, x):
            return model(jax.tree.map(lambda t, s, v: t + s * v, theta, scale, u), x)

    logits = _chunked_apply(apply_fn, params, inputs, batch_size)
    if output_mode == "logits":
        features = projected_jacobians(apply_fn, params, inputs, projection=projection,
                                       batch_size=batch_size)
        return Linearized(logits, features, labels)

    def example_margin(p, x, y):
        return margin(apply_fn(p, x[None])[0], y)

    features = per_example_grads(example_margin, params, inputs, labels,
                                 projection=projection, batch_size=batch_size)
    margins = jax.vmap(margin)(logits, labels)
    return Linearized(margins, features, labels)


def _chunked_apply(apply_fn, params, inputs, batch_size):
    if batch_size is None or batch_size >= inputs.shape[0]:
        return apply_fn(params, inputs)
    return jax.lax.map(lambda x: apply_fn(params, x[None])[0], inputs,
                       batch_size=batch_size)


def projection_from_key(key, proj_dim, projection_kind, params):
    if key is None:
        raise ValueError("key is required for the projection (or set proj_dim=None).")
    return make_projection(key, proj_dim, kind=projection_kind,
                           num_params=num_parameters(params))


def linearize_data(apply_fn, params, data, target, projection, output_mode,
                    batch_size, scale=None) -> tuple[Linearized, Linearized]:
    """Linearized training and target examples, in one compiled pass."""
    n = data.inputs.shape[0]
    both = linearized_examples(
        apply_fn, params, jnp.concatenate([data.inputs, target.inputs]),
        jnp.concatenate([data.labels, target.labels]), projection=projection,
        output_mode=output_mode, batch_size=batch_size, scale=scale)
    train = Linearized(*(x[:n] for x in both))
    tgt = Linearized(*(x[n:] for x in both))
    check_finite_features(train.features, "training")
    check_finite_features(tgt.features, "target")
    return train, tgt


@jax.jit
def update_norms(projection, w, params, scale=None):
    """``[m]`` norms ``||P w_j||`` (``||S ⊙ P w_j||`` with a scale) of the
    parameter updates."""
    update = unproject(projection, w, params)
    if scale is not None:
        update = jax.tree.map(lambda u, s: u * s, update, scale)
    return jnp.sqrt(sum(jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1)
                        for leaf in jax.tree_util.tree_leaves(update)))


@jax.jit
def full_space_summary(losses, run_params, params):
    """``(scores [m, T], shifts [m])`` of full-space linearized runs: the mean
    over replicates of ``losses [R, m, T]``, and ``||θ_s − θ*||`` of the first
    replicate's parameters (leaves ``[R, m, ...]``). One program, so that no
    eager op uploads a constant."""
    first = jax.tree.map(lambda leaf: leaf[0], run_params)
    shift = jax.vmap(lambda p: otu.tree_norm(otu.tree_sub(p, params)))(first)
    return losses.mean(0), shift


@jax.jit
def projected_summary(losses, run_weights, projection, params, scale):
    """:func:`full_space_summary` for runs in the projected space
    (``run_weights [R, m, d]``)."""
    return losses.mean(0), update_norms(projection, run_weights[0], params, scale)


def check_output_mode(output_mode):
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got "
                         f"{output_mode!r}.")


def check_finite_features(features, which):
    bad = ~jnp.all(jnp.isfinite(features.reshape(features.shape[0], -1)), axis=1)
    if bool(jnp.any(bad)):
        rows = jnp.nonzero(bad)[0][:10].tolist()
        raise ValueError(
            f"non-finite {which} features (gradients) at examples {rows}: check θ* "
            "and the inputs (e.g. a diverged model)."
        )
