"""The paper's estimator: each subset's convex problem on the linearized
model, solved to convergence.

:func:`estimate_scores` minimises
``Σ_n ω_n ℓ(f_n + Φ_n w, y_n) / Σ_n ω_n + ridge / 2 ||w||²`` for every subset,
vmapped. ``ridge`` stands in for the finite length of fine-tuning;
``ridge="auto"`` picks the ridge whose update on all tasks has the norm of one
real fine-tuning on all tasks (``reference_update_norm``, :func:`calibrate_ridge`).

Solvers: ``"newton"`` (exact Hessian, d x d: best for d up to about a thousand
with ``"margin"``) and ``"lbfgs"`` (optax L-BFGS with zoom line search: no
Hessian, for ``"logits"`` with many classes). ``proj_dim=None`` works in the
full parameter space through ``jax.jvp`` (``linearize.linearize``), as a check
of the projection's error.

Each chunk of subsets is split over the devices of a mesh (``mesh``, see
:mod:`tasksurrogate_jax.truth.sharding`; default: every device): by GSPMD on
the vmapped solver (projected space) or one ``lax.map`` per device
(``jax.shard_map``, full space).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import (
    TargetData,
    TaskData,
    check_nonempty_masks,
    mask_to_weights,
)
from tasksurrogate_jax.estimate.estimation import (
    EstimationResult,
    check_params_structure,
    check_ridge,
)
from tasksurrogate_jax.estimate.features import (
    Linearized,
    check_output_mode,
    example_losses,
    linear_outputs,
    linearize_data,
    projection_from_key,
    target_losses,
    update_norms,
)
from tasksurrogate_jax.estimate.linearize import linearize
from tasksurrogate_jax.losses import margin
from tasksurrogate_jax.truth import sharding
from tasksurrogate_jax.truth.chunking import map_padded_chunks

SOLVERS = ("newton", "lbfgs")


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


def subset_objective(w, weights, train: Linearized, ridge, output_mode):
    """``Σ ω_n ℓ_n(w) / Σ ω_n + ridge/2 ||w||²`` for one subset (``w`` ``[d]``)."""
    losses = example_losses(linear_outputs(train, w), train.labels, output_mode)
    return jnp.sum(weights * losses) / jnp.sum(weights) + 0.5 * ridge * jnp.sum(w * w)


def subset_hessian(w, weights, train: Linearized, ridge, output_mode):
    """Exact Hessian ``[d, d]`` of :func:`subset_objective`, in closed form.

    Cross-entropy is ``Φ_n^T (diag(p_n) - p_n p_n^T) Φ_n`` per example on
    logits (``n C d²`` multiply-adds, a quarter of what ``jax.hessian`` spends)
    and ``σ(m)(1 - σ(m)) φ_n φ_n^T`` on margins.
    """
    outputs = linear_outputs(train, w)
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


def estimate_scores(
    apply_fn: Callable, params, data: TaskData, target: TargetData, masks, *,
    key=None, proj_dim: int | None = 128, ridge: float | str = 1e-3,
    reference_update_norm: float | None = None, output_mode: str = "logits",
    projection_kind: str = "rademacher", settings: SolverSettings | None = None,
    batch_size: int | None = 256, chunk_size: int = 64, mesh=None,
) -> EstimationResult:
    """First-order estimates of ``F(s)`` by the convex solve, from one ``θ*``.

    Args:
      apply_fn: batched model ``(params, inputs) -> logits [b, C]``.
      params: ``θ*``, trained on all tasks (same structure as ``apply_fn``
        expects).
      data: the training data (one task id per example).
      target: the target examples (one score column each).
      masks: ``[m, num_tasks]`` 0/1 masks.
      key: PRNG key of the projection (required unless ``proj_dim=None``).
      proj_dim: d; ``None`` solves in the full parameter space.
      ridge: L2 penalty on the update, or ``"auto"``: the ridge at which the
        update on all tasks has norm ``reference_update_norm`` (projected
        space only).
      reference_update_norm: ``||θ_{s*} − θ*||`` of one real fine-tuning on all
        tasks; required with ``ridge="auto"``.
      output_mode: ``"logits"`` or ``"margin"``.
      projection_kind: ``"rademacher"`` or ``"gaussian"``.
      settings: :class:`SolverSettings` (default: Newton, 50 iterations, 1e-6).
      batch_size: examples per chunk when computing features.
      chunk_size: subsets solved per compiled call (padded to a multiple of the
        device count).
      mesh: a ``jax.sharding.Mesh`` with a ``"subsets"`` axis to split each
        chunk over; ``None``: every device (see
        :func:`tasksurrogate_jax.truth.sharding.subset_mesh`).

    Returns:
      :class:`~tasksurrogate_jax.estimate.estimation.EstimationResult` with
      ``scores`` ``[m, T]``.
    """
    check_output_mode(output_mode)
    settings = _check_settings(SolverSettings() if settings is None else settings)
    auto = check_ridge(ridge, reference_update_norm, proj_dim)
    if (settings.solver == "newton" and proj_dim is not None and not auto
            and not ridge > 0):
        raise ValueError(
            f"the newton solver needs ridge > 0 (got ridge={ridge}): the softmax "
            "loss is flat along shifts of all logits, so the Hessian is singular. "
            "Use a positive ridge or SolverSettings(solver='lbfgs')."
        )
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    mesh = sharding.check_mesh(mesh)
    masks = check_nonempty_masks(masks, data)
    check_params_structure(apply_fn, params, data)
    weights = mask_to_weights(masks, data.task_ids).astype(
        jnp.result_type(*jax.tree_util.tree_leaves(params)))

    if proj_dim is None:
        return _estimate_full_space(apply_fn, params, data, target, weights,
                                    ridge=ridge, output_mode=output_mode,
                                    settings=settings, chunk_size=chunk_size,
                                    mesh=mesh)
    projection = projection_from_key(key, proj_dim, projection_kind, params)
    train, tgt = linearize_data(apply_fn, params, data, target, projection,
                                 output_mode, batch_size)
    if auto:
        ridge = calibrate_ridge(train, data, projection, params,
                                update_norm=reference_update_norm,
                                output_mode=output_mode, settings=settings)
    ridge = float(ridge)
    # The ridge goes up once, explicitly, with the features (not per chunk).
    train, tgt, projection, params, ridge_device = sharding.replicate(
        (train, tgt, projection, params, np.asarray(ridge, weights.dtype)), mesh)

    def solve_chunk(chunk):
        return _solve_chunk(train, tgt, projection, params, ridge_device, chunk,
                            output_mode=output_mode, settings=settings)

    return EstimationResult(*map_padded_chunks(solve_chunk, weights, chunk_size,
                                               mesh=mesh),
                            ridge=ridge)


@functools.partial(jax.jit, static_argnames=("output_mode", "settings"))
def _solve_chunk(train, tgt, projection, params, ridge, weights, *,
                 output_mode, settings):
    """One chunk of :func:`estimate_scores`, one program: ``(scores [m, T],
    update norms [m], gradient norms [m], iterations [m])``."""
    sol = solve_subsets(train, weights, ridge=ridge, output_mode=output_mode,
                        settings=settings)
    return (target_losses(tgt, sol.w, output_mode),
            update_norms(projection, sol.w, params), sol.grad_norm,
            sol.iterations)


def calibrate_ridge(train: Linearized, data: TaskData, projection, params, *,
                    update_norm: float, output_mode: str,
                    settings: SolverSettings, bounds=(1e-8, 1e8),
                    iterations: int = 30) -> float:
    """The ridge whose solution on all tasks has ``||P ŵ|| = update_norm``.

    ``||P ŵ(ridge)||`` falls monotonically with the ridge; bisection on
    ``log(ridge)`` within ``bounds``. A target norm outside the bracket's
    norms gives the nearer end.

    Args:
      train: the linearized training examples.
      data: the training data (for the all-tasks weights).
      projection, params: ``P`` and ``θ*`` (to measure ``||P ŵ||``).
      update_norm: ``||θ_{s*} − θ*||`` of a real fine-tuning on all tasks.
      output_mode, settings: as for :func:`solve_subsets`.
      bounds: the ridge bracket.
      iterations: bisection steps.
    """
    full = mask_to_weights(jnp.ones((1, data.num_tasks)), data.task_ids).astype(
        train.features.dtype)

    def norm_at(log_ridge):
        sol = solve_subsets(train, full, ridge=jnp.exp(log_ridge),
                            output_mode=output_mode, settings=settings)
        return float(update_norms(projection, sol.w, params)[0])

    lo, hi = (float(jnp.log(b)) for b in bounds)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if norm_at(mid) > update_norm:
            lo = mid  # the update is too long: more ridge
        else:
            hi = mid
    return float(jnp.exp(0.5 * (lo + hi)))


def _estimate_full_space(apply_fn, params, data, target, weights, *, ridge,
                         output_mode, settings, chunk_size, mesh):
    """Full-parameter-space linearized solves (L-BFGS over the update pytree)."""
    if settings.solver == "newton":
        settings = settings._replace(solver="lbfgs")  # no dense Hessian in p dims
    ridge = float(ridge)
    shared = sharding.replicate(
        (params, data.inputs, data.labels, target.inputs, target.labels,
         np.asarray(ridge, weights.dtype)), mesh)

    def solve_chunk(chunk):
        return _full_space_chunk(chunk, *shared, apply_fn=apply_fn,
                                 output_mode=output_mode, settings=settings,
                                 mesh=mesh)

    return EstimationResult(*map_padded_chunks(solve_chunk, weights, chunk_size,
                                               mesh=mesh),
                            ridge=ridge)


@functools.partial(jax.jit, static_argnames=("apply_fn", "output_mode", "settings",
                                             "mesh"))
def _full_space_chunk(weights, params, inputs, labels, target_inputs,
                      target_labels, ridge, *, apply_fn, output_mode, settings,
                      mesh):
    """One chunk of :func:`_estimate_full_space`, compiled once per model and
    shape: ``(scores [m, T], update norms [m], gradient norms [m],
    iterations [m])`` for ``weights [m, n]``."""

    def solve_rows(chunk, params, inputs, labels, target_inputs, target_labels,
                   ridge):
        def outputs_fn(p, x, y):
            logits = apply_fn(p, x)
            return logits if output_mode == "logits" else jax.vmap(margin)(logits, y)

        f_lin_train = linearize(lambda p, x: outputs_fn(p, x, labels), params)
        f_lin_target = linearize(lambda p, x: outputs_fn(p, x, target_labels),
                                 params)
        # The update lives in one flat vector: optax's state lookups must not
        # meet the attributes of framework containers (``nnx.Param.value``).
        flat_params, unravel = ravel_pytree(params)
        zero = jnp.zeros_like(flat_params)

        def one(omega):
            def objective(delta):
                losses = example_losses(f_lin_train(unravel(delta), inputs),
                                        labels, output_mode)
                penalty = 0.5 * ridge * jnp.sum(delta * delta)
                return jnp.sum(omega * losses) / jnp.sum(omega) + penalty

            sol = _minimize(objective, zero, settings)
            scores = example_losses(f_lin_target(unravel(sol.w), target_inputs),
                                    target_labels, output_mode)
            return scores, jnp.linalg.norm(sol.w), sol.grad_norm, sol.iterations

        return jax.lax.map(one, chunk)

    # lax.map is sequential: under GSPMD every device would run every row, so
    # each device maps over its own rows (shard_map).
    return sharding.per_shard(solve_rows, mesh, batched=(True,) + (False,) * 6)(
        weights, params, inputs, labels, target_inputs, target_labels, ridge)


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
