"""Subset scores without retraining: first-order estimates ``F̂(s)`` around ``θ*``.

1. At ``θ*`` (trained on all tasks), every training and target example gets its
   outputs and projected Jacobian (``linearize.projected_jacobians``):
   ``f(x; θ* + P w) ≈ f(x; θ*) + J(x) P w``.
2. For each subset ``s``, with per-example weights ``ω = mask_to_weights(s)``,
   minimise the convex problem
   ``Σ_n ω_n ℓ(f_n + Φ_n w, y_n) / Σ_n ω_n + ridge / 2 ||w||²`` over ``w ∈ R^d``.
3. ``F̂(s)`` = per-target loss of the linearized model at ``ŵ_s``.

Output modes:

- ``"logits"``: C outputs per example, multinomial cross-entropy on the
  linearized logits; features ``[n, C, d]``.
- ``"margin"``: one output per example, the correct-class log-odds
  ``m = z_y - logsumexp(z_{-y})``; since ``-log softmax(z)_y = softplus(-m)``,
  the loss is ``softplus(-m)`` (the exact cross-entropy at ``θ*``); features
  ``[n, d]``. Cheaper by a factor C.

Solvers: ``"newton"`` (exact Hessian, d x d: best for d up to about a thousand
with ``"margin"``) and ``"lbfgs"`` (optax L-BFGS with zoom line search: no
Hessian, for ``"logits"`` with many classes). All subsets of a chunk are solved
in one vmapped, jitted call. ``proj_dim=None`` solves in the full parameter
space through ``jax.jvp`` (``linearize.linearize``), as a check of the
projection's error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax import metrics, retraining
from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.chunking import map_padded_chunks
from tasksurrogate_jax.data import (
    TargetData,
    TaskData,
    check_nonempty_masks,
    mask_to_weights,
)
from tasksurrogate_jax.linearize import (
    linearize,
    per_example_grads,
    projected_jacobians,
)
from tasksurrogate_jax.losses import margin, softmax_cross_entropy
from tasksurrogate_jax.projection import make_projection, num_parameters, unproject

OUTPUT_MODES = ("logits", "margin")
SOLVERS = ("newton", "lbfgs")


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


class SolverSettings(NamedTuple):
    """How each subset's convex problem is solved.

    Attributes:
      solver: ``"newton"`` or ``"lbfgs"``.
      max_iter: iteration cap.
      tol: stop when the gradient norm of the objective is below ``tol``.
    """

    solver: str = "newton"
    max_iter: int = 50
    tol: float = 1e-6


class Solution(NamedTuple):
    """Per-subset solutions.

    Attributes:
      w: ``[m, d]`` minimisers (or a params-shaped pytree with leading ``m``).
      grad_norm: ``[m]`` final gradient norm of the objective.
      iterations: ``[m]`` iterations used.
    """

    w: object
    grad_norm: jax.Array
    iterations: jax.Array


def example_losses(outputs, labels, output_mode: str):
    """Per-example cross-entropy from logits ``[n, C]`` or margins ``[n]``."""
    if output_mode == "logits":
        return softmax_cross_entropy(outputs, labels)
    return jax.nn.softplus(-outputs)


def linearized_examples(
    apply_fn: Callable, params, inputs, labels, *, projection, output_mode: str,
    batch_size: int | None = None,
) -> Linearized:
    """Outputs and projected Jacobians at ``params`` for a set of examples.

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> logits[b, C]``.
      params: ``θ*``.
      inputs: ``[n, ...]``.
      labels: ``[n]`` integer labels.
      projection: a :class:`~tasksurrogate_jax.projection.Projection`.
      output_mode: ``"logits"`` or ``"margin"``.
      batch_size: examples per chunk.

    Returns:
      :class:`Linearized`.
    """
    _check_output_mode(output_mode)
    return _linearized_examples(apply_fn, params, inputs, labels, projection,
                                output_mode, batch_size)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _linearized_examples(apply_fn, params, inputs, labels, projection, output_mode,
                         batch_size):
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


def _linear_outputs(examples: Linearized, w):
    return examples.outputs + examples.features @ w


def subset_objective(w, weights, train: Linearized, ridge, output_mode):
    """``Σ ω_n ℓ_n(w) / Σ ω_n + ridge/2 ||w||²`` for one subset (``w`` ``[d]``)."""
    losses = example_losses(_linear_outputs(train, w), train.labels, output_mode)
    return jnp.sum(weights * losses) / jnp.sum(weights) + 0.5 * ridge * jnp.sum(w * w)


def subset_hessian(w, weights, train: Linearized, ridge, output_mode):
    """Exact Hessian ``[d, d]`` of :func:`subset_objective`, in closed form.

    Cross-entropy is ``Φ_n^T (diag(p_n) - p_n p_n^T) Φ_n`` per example on
    logits (``n C d²`` multiply-adds, a quarter of what ``jax.hessian`` spends)
    and ``σ(m)(1 - σ(m)) φ_n φ_n^T`` on margins.
    """
    outputs = _linear_outputs(train, w)
    omega = weights / jnp.sum(weights)
    if output_mode == "logits":
        probs = jax.nn.softmax(outputs, axis=-1)  # [n, C]
        weighted = train.features * (omega[:, None] * probs)[..., None]
        mean_feature = jnp.einsum("nc,ncd->nd", probs, train.features)
        curvature = (jnp.einsum("ncd,nce->de", weighted, train.features)
                     - jnp.einsum("n,nd,ne->de", omega, mean_feature, mean_feature))
    else:
        sig = jax.nn.sigmoid(outputs)
        curvature = jnp.einsum("n,nd,ne->de", omega * sig * (1 - sig),
                               train.features, train.features)
    return curvature + ridge * jnp.eye(w.shape[0], dtype=w.dtype)


def _minimize(objective, w0, settings: SolverSettings, hessian_fn=None):
    """Minimises a smooth convex ``objective`` from ``w0``; returns a Solution.

    Newton uses ``hessian_fn(w)`` when given, else ``jax.hessian(objective)``.
    """
    grad_fn = jax.grad(objective)

    if settings.solver == "newton":
        hessian_fn = jax.hessian(objective) if hessian_fn is None else hessian_fn

        def cond(state):
            _, g, it = state
            return (it < settings.max_iter) & (otu.tree_norm(g) >= settings.tol)

        def body(state):
            w, g, it = state
            step = jnp.linalg.solve(hessian_fn(w), g)
            w = w - step
            return w, grad_fn(w), it + 1

        w, g, it = jax.lax.while_loop(cond, body, (w0, grad_fn(w0), 0))
        return Solution(w, otu.tree_norm(g), it)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def cond(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        g = otu.tree_get(state, "grad")
        return (count == 0) | ((count < settings.max_iter) &
                               (otu.tree_norm(g) >= settings.tol))

    def body(carry):
        w, state = carry
        value, g = value_and_grad(w, state=state)
        updates, state = opt.update(g, state, w, value=value, grad=g,
                                    value_fn=objective)
        return optax.apply_updates(w, updates), state

    w, state = jax.lax.while_loop(cond, body, (w0, opt.init(w0)))
    return Solution(w, otu.tree_norm(grad_fn(w)), otu.tree_get(state, "count"))


@functools.partial(jax.jit, static_argnames=("output_mode", "settings"))
def solve_subsets(train: Linearized, weights, *, ridge, output_mode: str,
                  settings: SolverSettings) -> Solution:
    """Solves every subset's linearized problem, vmapped over ``weights``.

    Args:
      train: linearized training examples.
      weights: ``[m, n]`` per-example weights (``mask_to_weights``).
      ridge: L2 penalty on ``w``.
      output_mode, settings: see the module docstring.

    Returns:
      :class:`Solution` with ``w`` ``[m, d]``.
    """
    d = train.features.shape[-1]

    def one(omega):
        objective = functools.partial(subset_objective, weights=omega, train=train,
                                      ridge=ridge, output_mode=output_mode)
        hessian = functools.partial(subset_hessian, weights=omega, train=train,
                                    ridge=ridge, output_mode=output_mode)
        return _minimize(objective, jnp.zeros(d, train.features.dtype), settings,
                         hessian)

    return jax.vmap(one)(weights)


def target_losses(target: Linearized, w, output_mode: str):
    """``[m, T]`` target losses of the linearized model at ``w`` ``[m, d]``."""
    return jax.vmap(lambda wi: example_losses(_linear_outputs(target, wi),
                                              target.labels, output_mode))(w)


class EstimationResult(NamedTuple):
    """Estimated scores and solver diagnostics.

    Attributes:
      scores: ``[m, T]`` estimated per-target losses ``F̂(s)``.
      grad_norm: ``[m]`` final gradient norm of each subset's problem.
      iterations: ``[m]`` solver iterations.
      delta_norm: ``[m]`` ``||P ŵ_s||`` (or ``||Δ_s||`` in full space), to
        compare with ``||θ*||``.
    """

    scores: jax.Array
    grad_norm: jax.Array
    iterations: jax.Array
    delta_norm: jax.Array


def estimate_scores(
    apply_fn: Callable, params, data: TaskData, target: TargetData, masks, *,
    key=None, proj_dim: int | None = 128, ridge: float = 1e-3,
    output_mode: str = "logits", projection_kind: str = "rademacher",
    settings: SolverSettings | None = None, batch_size: int | None = 256,
    chunk_size: int = 64,
) -> EstimationResult:
    """First-order estimates of ``F(s)`` for many subsets from one ``θ*``.

    Args:
      apply_fn: batched model ``(params, inputs) -> logits [b, C]``.
      params: ``θ*``, trained on all tasks (same structure as ``apply_fn``
        expects).
      data: the training data (one task id per example).
      target: the target examples (one score column each).
      masks: ``[m, num_tasks]`` 0/1 masks.
      key: PRNG key of the projection (required unless ``proj_dim=None``).
      proj_dim: d; ``None`` solves in the full parameter space.
      ridge: L2 penalty on the update.
      output_mode: ``"logits"`` or ``"margin"``.
      projection_kind: ``"rademacher"`` or ``"gaussian"``.
      settings: :class:`SolverSettings` (default: Newton, 50 iterations, 1e-6).
      batch_size: examples per chunk when computing features.
      chunk_size: subsets solved per compiled call.

    Returns:
      :class:`EstimationResult` with ``scores`` ``[m, T]``.
    """
    _check_output_mode(output_mode)
    settings = _check_settings(SolverSettings() if settings is None else settings)
    if settings.solver == "newton" and proj_dim is not None and not ridge > 0:
        raise ValueError(
            f"the newton solver needs ridge > 0 (got ridge={ridge}): the softmax "
            "loss is flat along shifts of all logits, so the Hessian is singular. "
            "Use a positive ridge or SolverSettings(solver='lbfgs')."
        )
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    masks = check_nonempty_masks(masks, data)
    _check_params_structure(apply_fn, params, data)
    weights = mask_to_weights(masks, data.task_ids).astype(
        jnp.result_type(*jax.tree_util.tree_leaves(params)))

    if proj_dim is None:
        return _estimate_full_space(apply_fn, params, data, target, weights,
                                    ridge=ridge, output_mode=output_mode,
                                    settings=settings, chunk_size=chunk_size)
    if key is None:
        raise ValueError("key is required for the projection (or set proj_dim=None).")
    projection = make_projection(key, proj_dim, kind=projection_kind,
                                 num_params=num_parameters(params))
    # Training and target examples in one compiled pass, then split.
    n = data.inputs.shape[0]
    both = linearized_examples(
        apply_fn, params, jnp.concatenate([data.inputs, target.inputs]),
        jnp.concatenate([data.labels, target.labels]), projection=projection,
        output_mode=output_mode, batch_size=batch_size)
    train = Linearized(*(x[:n] for x in both))
    tgt = Linearized(*(x[n:] for x in both))
    _check_finite_features(train.features, "training")
    _check_finite_features(tgt.features, "target")

    def solve_chunk(chunk):
        sol = solve_subsets(train, chunk, ridge=ridge, output_mode=output_mode,
                            settings=settings)
        return (target_losses(tgt, sol.w, output_mode), sol.grad_norm,
                sol.iterations, _update_norms(projection, sol.w, params))

    return EstimationResult(*map_padded_chunks(solve_chunk, weights, chunk_size))


@jax.jit
def _update_norms(projection, w, params):
    """``[m]`` norms ``||P w_j||`` of the parameter updates."""
    update = unproject(projection, w, params)
    return jnp.sqrt(sum(jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1)
                        for leaf in jax.tree_util.tree_leaves(update)))


def _estimate_full_space(apply_fn, params, data, target, weights, *, ridge,
                         output_mode, settings, chunk_size):
    """Full-parameter-space linearized solves (L-BFGS over the update pytree)."""
    if settings.solver == "newton":
        settings = settings._replace(solver="lbfgs")  # no dense Hessian in p dims

    def outputs_fn(p, inputs, labels):
        logits = apply_fn(p, inputs)
        return logits if output_mode == "logits" else jax.vmap(margin)(logits, labels)

    f_lin_train = linearize(lambda p, x: outputs_fn(p, x, data.labels), params)
    f_lin_target = linearize(lambda p, x: outputs_fn(p, x, target.labels), params)
    # The update lives in one flat vector: optax's state lookups must not meet
    # the attributes of framework containers (e.g. ``nnx.Param.value``).
    flat_params, unravel = ravel_pytree(params)
    zero = jnp.zeros_like(flat_params)

    @jax.jit
    def solve_chunk(chunk):
        def one(omega):
            def objective(delta):
                losses = example_losses(f_lin_train(unravel(delta), data.inputs),
                                        data.labels, output_mode)
                penalty = 0.5 * ridge * jnp.sum(delta * delta)
                return jnp.sum(omega * losses) / jnp.sum(omega) + penalty

            sol = _minimize(objective, zero, settings)
            scores = example_losses(f_lin_target(unravel(sol.w), target.inputs),
                                    target.labels, output_mode)
            return scores, sol.grad_norm, sol.iterations, jnp.linalg.norm(sol.w)

        return jax.lax.map(one, chunk)

    return EstimationResult(*map_padded_chunks(solve_chunk, weights, chunk_size))


def _check_output_mode(output_mode):
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got "
                         f"{output_mode!r}.")


def _check_settings(settings):
    if not isinstance(settings, SolverSettings):
        raise TypeError(f"settings must be a SolverSettings, got "
                        f"{type(settings).__name__}.")
    if settings.solver not in SOLVERS:
        raise ValueError(f"settings.solver must be one of {SOLVERS}, got "
                         f"{settings.solver!r}.")
    check_positive_int(settings.max_iter, "settings.max_iter")
    if not settings.tol > 0:
        raise ValueError(f"settings.tol must be positive, got {settings.tol}.")
    return settings


def _check_params_structure(apply_fn, params, data):
    try:
        jax.eval_shape(apply_fn, params, data.inputs[:1])
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            "params do not match the model: apply_fn(params, inputs) failed with "
            f"{type(err).__name__}: {err}"
        ) from err


def _check_finite_features(features, which):
    bad = ~jnp.all(jnp.isfinite(features.reshape(features.shape[0], -1)), axis=1)
    if bool(jnp.any(bad)):
        rows = jnp.nonzero(bad)[0][:10].tolist()
        raise ValueError(
            f"non-finite {which} features (gradients) at examples {rows}: check θ* "
            "and the inputs (e.g. a diverged model)."
        )


class EstimationCheck(NamedTuple):
    """Estimated against real fine-tuning from ``θ*`` on the same subsets.

    Attributes:
      estimated: ``[m, T]`` estimated scores ``F̂(s)``.
      exact: ``[m, T]`` scores after fine-tuning from ``θ*`` on each subset.
      relative_error: ``[m]`` ``|mean_t F̂ - mean_t F| / |mean_t F|``: the error
        on the target-task score (the mean over target columns).
      column_relative_error: ``[m]`` ``mean_t |F̂_t - F_t| / |F_t|``: per column,
        then averaged (large where single losses are near zero).
      spearman: ``[T]`` Spearman of ``F̂`` against ``F`` across subsets.
      param_shift: ``[m]`` ``||θ_s - θ*|| / ||θ*||`` of the fine-tuned models.
      first_order: ``[m, T]`` target losses of the first-order model at the
        *fine-tuned* update, ``f(θ*) + J (θ_s − θ*)`` (logits linearized):
        how far the linearization itself is off where fine-tuning went,
        whatever the solver does.
    """

    estimated: jax.Array
    exact: jax.Array
    relative_error: jax.Array
    column_relative_error: jax.Array
    spearman: jax.Array
    param_shift: jax.Array
    first_order: jax.Array


def check_estimation(
    estimated, masks, *, params, data: TaskData, target: TargetData, spec, key,
    **retrain_kwargs,
) -> EstimationCheck:
    """Fine-tunes from ``θ*`` on each subset and compares with the estimates.

    Args:
      estimated: ``[m, T]`` estimated scores for ``masks``.
      masks: ``[m, num_tasks]``.
      params: ``θ*``.
      data, target: as for :func:`estimate_scores`.
      spec: the fine-tuning program (``retraining.make_train_spec``).
      key: PRNG key of the fine-tuning runs.
      **retrain_kwargs: passed to ``retraining.retrain`` (``chunk_size``,
        ``store_dir``, ``progress``, ...).

    Returns:
      :class:`EstimationCheck`.
    """
    estimated = jnp.asarray(estimated)
    if estimated.ndim != 2 or estimated.shape != (masks.shape[0], target.num_targets):
        raise ValueError(
            f"estimated must be [num_subsets, num_targets]=({masks.shape[0]}, "
            f"{target.num_targets}), got shape {estimated.shape}."
        )
    result = retraining.retrain(masks, data=data, target=target, spec=spec, key=key,
                                init_params=params, return_params=True,
                                **retrain_kwargs)
    exact = result.losses
    base_norm = otu.tree_norm(params)
    shift = jax.vmap(lambda p: otu.tree_norm(otu.tree_sub(p, params)))(result.params)
    linear_apply = linearize(spec.apply_fn, params)
    first_order = jax.lax.map(
        lambda tuned: spec.loss_fn(linear_apply(otu.tree_sub(tuned, params),
                                                target.inputs), target.labels),
        result.params)
    mean_est, mean_exact = estimated.mean(axis=1), exact.mean(axis=1)
    return EstimationCheck(
        estimated=estimated,
        exact=exact,
        relative_error=jnp.abs(mean_est - mean_exact) / jnp.abs(mean_exact),
        column_relative_error=metrics.relative_error(estimated, exact).mean(axis=1),
        spearman=metrics.spearman(exact, estimated),
        param_shift=shift / base_norm,
        first_order=first_order,
    )
