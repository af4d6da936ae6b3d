"""Subset scores without retraining: first-order estimates ``F̂(s)`` around ``θ*``.

At ``θ*`` (trained on all tasks), every training and target example gets its
outputs and projected Jacobian (``linearize.projected_jacobians``):
``f(x; θ* + P w) ≈ f(x; θ*) + J(x) P w`` (the *linearized model*). Two ways to
get each subset's update ``ŵ_s`` from it, all subsets vmapped:

- **Linearized fine-tuning** (:func:`linearized_finetune_scores`, the default
  of the workloads): run *the fine-tuning program itself* (its optimizer,
  schedule, steps, batch size and batch draws: ``retraining.train_on_weights``)
  on the linearized model, with ``w`` as the parameters, starting from 0. For
  a model linear in its parameters this *is* fine-tuning (``proj_dim=None``).
  Plain gradient descent on ``w`` follows the projected kernel ``Φ Φ^T ≈ J J^T``
  (``E[P P^T] = I``), so it tracks real gradient-descent fine-tuning in
  function space. The optimizer acts on ``w``: coordinate-wise optimizers
  (Adam) and weight decay act on ``w``'s coordinates, not on ``θ``'s.
  For Adam fine-tuning, ``preconditioner="adam"`` runs Adam with its second
  moment fixed at ``θ*`` instead: ``v`` (:func:`gradient_second_moment`) moves
  into the features, ``θ = θ* + S ⊙ P w`` with ``S = (√v + ε)^{-1/2}``
  (features ``J diag(S) P``), and ``w`` follows Adam's first moment alone
  (:meth:`Adam.momentum`: momentum with Adam's β1 and learning rate). Then
  ``Δθ ≈ −lr S ⊙ P Pᵀ (S ⊙ m̂) ≈ −lr m̂ / (√v + ε)``: Adam's step with a fixed
  ``v``, whatever P mixes. The fine-tuning optimizer must be an :class:`Adam`
  (an optax Adam whose hyperparameters stay readable).
- **Convex solve** (:func:`estimate_scores`, the paper's estimator): minimise
  ``Σ_n ω_n ℓ(f_n + Φ_n w, y_n) / Σ_n ω_n + ridge / 2 ||w||²`` to convergence.
  ``ridge`` stands in for the finite length of fine-tuning; ``ridge="auto"``
  picks the ridge whose update on all tasks has the norm of one real
  fine-tuning on all tasks (``reference_update_norm``).

``F̂(s)`` = per-target loss of the linearized model at ``ŵ_s``. The *difference
form* (:func:`difference_form`) adds the measured ``F(s*)`` of one real
fine-tuning on all tasks to ``F̂(s) − F̂(s*)``, so an error shared by every
subset cancels.

Output modes:

- ``"logits"``: C outputs per example, multinomial cross-entropy on the
  linearized logits; features ``[n, C, d]``.
- ``"margin"``: one output per example, the correct-class log-odds
  ``m = z_y - logsumexp(z_{-y})``; since ``-log softmax(z)_y = softplus(-m)``,
  the loss is ``softplus(-m)`` (the exact cross-entropy at ``θ*``); features
  ``[n, d]``. Cheaper by a factor C.

Solvers of the convex problem: ``"newton"`` (exact Hessian, d x d: best for d up
to about a thousand with ``"margin"``) and ``"lbfgs"`` (optax L-BFGS with zoom
line search: no Hessian, for ``"logits"`` with many classes). ``proj_dim=None``
works in the full parameter space through ``jax.jvp`` (``linearize.linearize``),
as a check of the projection's error.

Both split each chunk of subsets over the devices of a mesh (``mesh``, see
:mod:`tasksurrogate_jax.truth.sharding`; default: every device): linearized
fine-tuning through ``retraining.retrain``; the convex solve by GSPMD on its
vmapped solver (projected space) or one ``lax.map`` per device
(``jax.shard_map``, full space).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
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
    leading_rows_spec,
    mask_to_weights,
)
from tasksurrogate_jax.estimate.linearize import (
    linearize,
    per_example_grads,
    projected_jacobians,
)
from tasksurrogate_jax.estimate.projection import (
    make_projection,
    num_parameters,
    unproject,
)
from tasksurrogate_jax.losses import margin, softmax_cross_entropy
from tasksurrogate_jax.truth import retraining, sharding
from tasksurrogate_jax.truth.chunking import map_padded_chunks, pad_rows

OUTPUT_MODES = ("logits", "margin")
SOLVERS = ("newton", "lbfgs")
PRECONDITIONERS = ("none", "adam")


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


METHODS = ("finetune", "solve")
PROJ_DIM_CHOICES = ("auto", "full")
PROJECTIONS = ("auto", "dense", "factored")
# ``proj_dim="auto"``: the full parameter space up to this many parameters,
# else a projection to DEFAULT_PROJ_DIM (dense) or DEFAULT_FACTORED_PROJ_DIM
# of the output mode (factored: about the same cost per subset, C d; see
# EstimationSettings).
AUTO_FULL_SPACE_MAX_PARAMS = 100_000
DEFAULT_PROJ_DIM = 512
DEFAULT_FACTORED_PROJ_DIM = MappingProxyType({"logits": 4096, "margin": 32768})
# Training examples that factored.allocate_dims fits its error model on.
ALLOCATION_SAMPLE = 64
# The shared batch of a chunk (linearized_finetune_scores, factored) is
# rounded up to a multiple of this many examples (fewer compiled shapes).
SUPERBATCH_GRANULARITY = 16


@dataclasses.dataclass(frozen=True)
class EstimationSettings:
    """How a workload estimates subset scores (its ``estimate`` method).

    Attributes:
      method: ``"finetune"`` (:func:`linearized_finetune_scores`, mirroring the
        workload's fine-tuning program) or ``"solve"`` (:func:`estimate_scores`).
      proj_dim: d (an int), ``"full"`` (or ``None``) for the full parameter
        space, or ``"auto"`` (default, :meth:`resolved_proj_dim`): the full
        space for linearized fine-tuning of a model of at most
        :data:`AUTO_FULL_SPACE_MAX_PARAMS` parameters, else
        :data:`DEFAULT_PROJ_DIM`. Why: the full space linearizes without
        projection error (``benchmarks/bench_defaults.py``, LOO Spearman
        per target of directly estimated effects with one batch order: digits
        ``cpu``, p = 4,810, 0.892 in the full space against 0.742 at d = 512;
        breast cancer, p = 2,114, 0.875 against 0.819), and its cost per subset is a few
        forward-backward passes of the model, which only large models cannot
        afford per subset.
      output_mode: ``"logits"``, ``"margin"`` (the correct class's log-odds:
        integer class labels and the softmax cross-entropy loss), or
        ``"auto"`` (default, :meth:`resolved_output_mode`): margins where the
        features are factored and the loss is the softmax cross-entropy,
        logits elsewhere. Why: a margin feature is one row per example where
        logits are C, so at the same cost per subset d is C times larger. On
        the digits ``wide`` preset (``benchmarks/bench_estimation.py``, MSE
        criterion) margins at the default d = 32,768 reached 0.904 against
        0.942 on exact scores, 26.7 times cheaper per subset than fine-tuning
        (at d = 16,384: 0.889, 44 times); logits at d = 4,096 0.858.
      ridge: the convex solve's ridge, a number or ``"auto"`` (calibrated to one
        real fine-tuning on all tasks); unused by ``"finetune"``.
      difference: anchor the estimates at one real fine-tuning on all tasks
        (:func:`difference_form`).
      batch_orders: batch orders averaged by ``"finetune"`` (order ``r``
        draws the batches of replicate ``r`` of the real fine-tuning). Default
        4: the ground truth is an expectation over batch orders, and one
        order's noise costs accuracy (measured with
        ``benchmarks/bench_defaults.py``, LOO Spearman per target of directly
        estimated effects in the full space, digits ``cpu``: 0.892 with one
        order against 0.934 with four; breast cancer 0.875 against 0.927), at
        four times the cost.
      preconditioner: ``"none"`` (the fine-tuning optimizer runs on ``w``) or
        ``"adam"`` (Adam with its second moment fixed at ``θ*``, moved into the
        features; needs ``method="finetune"``, a ``proj_dim`` and an
        :class:`Adam` fine-tuning optimizer: see
        :func:`linearized_finetune_scores`).
      projection: how a projected ``"finetune"`` gets its features:
        ``"dense"`` (a Rademacher ``P`` ``[p, d]`` applied to per-example
        Jacobians: about ``2 p C d`` flops per example), ``"factored"``
        (per-layer Kronecker-factored projections of the dense layers,
        :mod:`tasksurrogate_jax.estimate.factored`, never ``[n, p]``; dimensions
        allocated by ``factored.allocate_dims``; the chunk's subsets share
        each step's batch as one matrix product) or ``"auto"`` (default,
        :meth:`resolved_projection`): factored for a model of more than
        :data:`AUTO_FULL_SPACE_MAX_PARAMS` parameters whose parameters are all
        dense layers, else dense. ``proj_dim="auto"`` then means
        :data:`DEFAULT_FACTORED_PROJ_DIM` of the output mode (4,096 logits,
        32,768 margins: the same cost per subset). Why (measured with
        ``benchmarks/bench_estimation.py``, LOO Spearman per target of the
        kernel surrogate on estimated scores, 4 batch orders other than the
        truth's): factored features cost seconds where dense ones cost
        minutes on the digits ``wide`` preset (1.1M parameters), and are more
        accurate for their cost: on digits ``cpu`` (p = 4,810) 0.911 at
        factored d = 4,096 and 0.810 at d = 1,024 against 0.779 dense at
        d = 512; on ``wide``, 0.782 / 0.826 / 0.858 at d = 1,024 / 2,048 /
        4,096 with logits, and with margins (C = 1, a tenth of the cost per
        d) 0.857 / 0.882 / 0.890 / 0.903 at d = 4,096 / 8,192 / 16,384 /
        32,768 (ceiling 0.941). So on ``wide`` margins at a 10x larger d beat
        logits at the same cost: prefer ``output_mode="margin"`` there.
    """

    method: str = "finetune"
    proj_dim: int | str | None = "auto"
    output_mode: str = "auto"
    ridge: float | str = "auto"
    difference: bool = False
    batch_orders: int = 4
    preconditioner: str = "none"
    projection: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        if isinstance(self.proj_dim, str):
            if self.proj_dim not in PROJ_DIM_CHOICES:
                raise ValueError(f"proj_dim must be a positive int, 'auto' or 'full', "
                                 f"got {self.proj_dim!r}.")
        elif self.proj_dim is not None:
            check_positive_int(self.proj_dim, "proj_dim")
        full = self.proj_dim in (None, "full")
        if self.output_mode != "auto":
            _check_output_mode(self.output_mode)
        if full and self.output_mode == "margin":
            raise ValueError(f"output_mode={self.output_mode!r} needs a projection: "
                             "set proj_dim to an int or 'auto'.")
        _check_preconditioner(self.preconditioner, None if full else self.proj_dim)
        if self.preconditioner != "none" and self.method != "finetune":
            raise ValueError(
                f"preconditioner={self.preconditioner!r} needs method='finetune' "
                f"(it preconditions the fine-tuning program), got {self.method!r}.")
        # Checked whatever the method: a bad value is never silently kept.
        _check_ridge(self.ridge, 1.0,
                     None if full and self.method == "solve" else 1)
        if not isinstance(self.difference, bool):
            raise TypeError(f"difference must be a bool, got {self.difference!r}.")
        check_positive_int(self.batch_orders, "batch_orders")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got "
                             f"{self.projection!r}.")
        if self.projection == "factored":
            _check_factored(self.method, full, self.preconditioner)

    def resolved_output_mode(self, projection: str, *,
                             classification: bool = True) -> str:
        """``"logits"`` or ``"margin"`` (see ``output_mode``): ``"auto"`` is
        ``"margin"`` for the ``"factored"`` projection (``projection``: as
        :meth:`resolved_projection` returns it) of a ``classification`` model
        (softmax cross-entropy on integer labels), else ``"logits"``."""
        _check_resolved_projection(projection)
        if self.output_mode != "auto":
            return self.output_mode
        return "margin" if projection == "factored" and classification else "logits"

    def resolved_proj_dim(self, num_params: int, projection: str = "dense", *,
                          output_mode: str | None = None) -> int | None:
        """The projection dimension for a model of ``num_params`` parameters,
        ``None`` for the full space (see ``proj_dim``). ``"auto"`` keeps a
        projection wherever the full space cannot run: the convex solve with
        ``ridge="auto"``, ``output_mode="margin"`` and the Adam
        preconditioner; it is :data:`DEFAULT_FACTORED_PROJ_DIM` of the output
        mode for the ``"factored"`` projection (``projection``: as
        :meth:`resolved_projection` returns it), else
        :data:`DEFAULT_PROJ_DIM`. ``output_mode``: the resolved one (default:
        :meth:`resolved_output_mode` of a classification model)."""
        _check_resolved_projection(projection)
        mode = output_mode or self.resolved_output_mode(projection)
        if self.proj_dim in (None, "full"):
            return None
        if self.proj_dim != "auto":
            return int(self.proj_dim)
        full_ok = (self.method == "finetune" and self.preconditioner == "none"
                   and mode == "logits"
                   and num_params <= AUTO_FULL_SPACE_MAX_PARAMS)
        if full_ok:
            return None
        return DEFAULT_FACTORED_PROJ_DIM[mode] \
            if projection == "factored" else DEFAULT_PROJ_DIM

    def resolved_projection(self, apply_fn: Callable, params, inputs) -> str:
        """``"dense"`` or ``"factored"`` for this model (see ``projection``).

        ``"auto"`` is ``"factored"`` where it can run and pays: linearized
        fine-tuning without preconditioner in a projected space, a model of
        more than :data:`AUTO_FULL_SPACE_MAX_PARAMS` parameters, and every
        parameter in a dense layer that ``factored.find_dense_layers`` finds
        in ``apply_fn`` (traced on one example of ``inputs`` ``[n, ...]``).
        """
        if self.projection != "auto":
            return self.projection
        num_params = num_parameters(params)
        if (self.method != "finetune" or self.preconditioner != "none"
                or num_params <= AUTO_FULL_SPACE_MAX_PARAMS
                or self.proj_dim in (None, "full")):
            return "dense"
        from tasksurrogate_jax.estimate import factored  # factored imports this module

        try:
            structure = factored.find_dense_layers(apply_fn, params, inputs)
        except ValueError:  # a parameter outside a dense layer
            return "dense"
        return "factored" if structure.num_params == num_params else "dense"

    @property
    def needs_reference_run(self) -> bool:
        """Whether one real fine-tuning on all tasks is needed."""
        return self.difference or (self.method == "solve" and self.ridge == "auto")


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
    return margin_cross_entropy(outputs, labels)


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
        (the Adam preconditioner's, see :func:`linearized_finetune_scores`).

    Returns:
      :class:`Linearized`: features ``[n, C, d]`` (``"logits"``) or ``[n, d]``.
    """
    _check_output_mode(output_mode)
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
    """Estimated scores and diagnostics.

    Attributes:
      scores: ``[m, T]`` estimated per-target losses ``F̂(s)``.
      delta_norm: ``[m]`` ``||P ŵ_s||`` (or ``||Δ_s||`` in full space), to
        compare with ``||θ*||`` and with real fine-tuning's update.
      grad_norm: ``[m]`` final gradient norm of each subset's convex problem
        (``None`` for linearized fine-tuning).
      iterations: ``[m]`` solver iterations (``None`` for linearized
        fine-tuning).
      ridge: the ridge used by the convex solve (the calibrated value for
        ``ridge="auto"``; ``None`` for linearized fine-tuning).
      seconds: ``{"features": s, "subsets": s}``, the one-time cost of the
        features at ``θ*`` (with the factored projection: finding the layers
        and allocating the dimensions too) apart from the cost of the
        subsets' programs (factored linearized fine-tuning only, else
        ``None``).
    """

    scores: jax.Array
    delta_norm: jax.Array
    grad_norm: jax.Array | None = None
    iterations: jax.Array | None = None
    ridge: float | None = None
    seconds: dict | None = None


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
      :class:`EstimationResult` with ``scores`` ``[m, T]``.
    """
    _check_output_mode(output_mode)
    settings = _check_settings(SolverSettings() if settings is None else settings)
    auto = _check_ridge(ridge, reference_update_norm, proj_dim)
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
    _check_params_structure(apply_fn, params, data)
    weights = mask_to_weights(masks, data.task_ids).astype(
        jnp.result_type(*jax.tree_util.tree_leaves(params)))

    if proj_dim is None:
        return _estimate_full_space(apply_fn, params, data, target, weights,
                                    ridge=ridge, output_mode=output_mode,
                                    settings=settings, chunk_size=chunk_size,
                                    mesh=mesh)
    projection = _projection(key, proj_dim, projection_kind, params)
    train, tgt = _linearize_data(apply_fn, params, data, target, projection,
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
            _update_norms(projection, sol.w, params), sol.grad_norm,
            sol.iterations)


def _projection(key, proj_dim, projection_kind, params):
    if key is None:
        raise ValueError("key is required for the projection (or set proj_dim=None).")
    return make_projection(key, proj_dim, kind=projection_kind,
                           num_params=num_parameters(params))


def _linearize_data(apply_fn, params, data, target, projection, output_mode,
                    batch_size, scale=None) -> tuple[Linearized, Linearized]:
    """Linearized training and target examples, in one compiled pass."""
    n = data.inputs.shape[0]
    both = linearized_examples(
        apply_fn, params, jnp.concatenate([data.inputs, target.inputs]),
        jnp.concatenate([data.labels, target.labels]), projection=projection,
        output_mode=output_mode, batch_size=batch_size, scale=scale)
    train = Linearized(*(x[:n] for x in both))
    tgt = Linearized(*(x[n:] for x in both))
    _check_finite_features(train.features, "training")
    _check_finite_features(tgt.features, "target")
    return train, tgt


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
        return float(_update_norms(projection, sol.w, params)[0])

    lo, hi = (float(jnp.log(b)) for b in bounds)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if norm_at(mid) > update_norm:
            lo = mid  # the update is too long: more ridge
        else:
            hi = mid
    return float(jnp.exp(0.5 * (lo + hi)))


@jax.jit
def _update_norms(projection, w, params, scale=None):
    """``[m]`` norms ``||P w_j||`` (``||S ⊙ P w_j||`` with a scale) of the
    parameter updates."""
    update = unproject(projection, w, params)
    if scale is not None:
        update = jax.tree.map(lambda u, s: u * s, update, scale)
    return jnp.sqrt(sum(jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1)
                        for leaf in jax.tree_util.tree_leaves(update)))


@jax.jit
def _full_space_summary(losses, run_params, params):
    """``(scores [m, T], shifts [m])`` of full-space linearized runs: the mean
    over replicates of ``losses [R, m, T]``, and ``||θ_s − θ*||`` of the first
    replicate's parameters (leaves ``[R, m, ...]``). One program, so that no
    eager op uploads a constant."""
    first = jax.tree.map(lambda leaf: leaf[0], run_params)
    shift = jax.vmap(lambda p: otu.tree_norm(otu.tree_sub(p, params)))(first)
    return losses.mean(0), shift


@jax.jit
def _projected_summary(losses, run_weights, projection, params, scale):
    """:func:`_full_space_summary` for runs in the projected space
    (``run_weights [R, m, d]``)."""
    return losses.mean(0), _update_norms(projection, run_weights[0], params, scale)


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


# ---------------------------------------------------------------------------
# Linearized fine-tuning: the fine-tuning program on the linearized model.


def linear_model(w, inputs):
    """The projected linearized model on stacked inputs.

    Args:
      w: ``[d]`` update coordinates.
      inputs: ``[..., 1 + d]``: ``f(x; θ*)`` in slot 0, then ``J(x) P``.

    Returns:
      ``[...]``: ``f(x; θ*) + J(x) P w``.
    """
    return inputs[..., 0] + inputs[..., 1:] @ w


def margin_cross_entropy(margins, labels):
    """Cross-entropy ``softplus(-m)`` of correct-class log-odds ``[b]``."""
    del labels  # the margin is already the correct class's
    return jax.nn.softplus(-margins)


@dataclasses.dataclass(frozen=True)
class Adam:
    """Adam(W) as an optax optimizer whose hyperparameters stay readable.

    ``init`` and ``update`` are those of ``optax.adam`` (``weight_decay=0``) or
    ``optax.adamw`` with these hyperparameters, so training with it is
    bitwise the same as with them; unlike them it tells
    ``preconditioner="adam"`` its β1, ε and learning rate. Use it as the
    fine-tuning optimizer (``TrainSettings(Adam(1e-3), num_steps, batch_size)``).

    Attributes:
      learning_rate: a positive number or an optax schedule (step -> rate).
      b1: decay of the first moment, in ``[0, 1)``.
      b2: decay of the second moment, in ``[0, 1)``.
      eps: added to ``√v̂`` in the denominator, ``>= 0``.
      weight_decay: decoupled weight decay (AdamW), ``>= 0``.
    """

    learning_rate: float | Callable
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        if not callable(self.learning_rate) and not (
                isinstance(self.learning_rate, numbers.Real)
                and self.learning_rate > 0):
            raise ValueError("learning_rate must be a positive number or a "
                             f"schedule, got {self.learning_rate!r}.")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got "
                                 f"{getattr(self, name)!r}.")
        for name in ("eps", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")

    @property
    def transformation(self) -> optax.GradientTransformation:
        """The optax Adam (or AdamW) of these hyperparameters."""
        if self.weight_decay == 0:
            return optax.adam(self.learning_rate, b1=self.b1, b2=self.b2,
                              eps=self.eps)
        return optax.adamw(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                           weight_decay=self.weight_decay)

    def init(self, params):
        return self.transformation.init(params)

    def update(self, updates, state, params=None):
        return self.transformation.update(updates, state, params)

    def momentum(self) -> optax.GradientTransformation:
        """Adam with a fixed second moment, once that moment is in the features:
        momentum descent ``w ← w − lr_t m̂_t`` with Adam's bias-corrected first
        moment ``m̂`` (β1) and learning rate (the same object for equal
        hyperparameters, so its programs compile once)."""
        return _momentum(self.b1, self.learning_rate)


@functools.cache
def _momentum(b1, learning_rate) -> optax.GradientTransformation:
    return optax.chain(optax.ema(b1, debias=True),
                       optax.scale_by_learning_rate(learning_rate))


def gradient_second_moment(apply_fn: Callable, params, data: TaskData, *,
                           loss_fn: Callable = softmax_cross_entropy,
                           batch_size: int | None,
                           chunk_size: int | None = 256):
    """The second moment of a mini-batch loss gradient at ``θ*``, per parameter.

    ``ĝ`` is the mean gradient of ``batch_size`` examples drawn without
    replacement from the training examples (as ``retraining`` draws them), so
    ``E[ĝ ⊙ ĝ] = ḡ² + σ² (n − B) / (B (n − 1))`` with ``ḡ`` and ``σ²`` the mean
    and variance over the ``n`` examples of the per-example gradients
    (``linearize.per_example_grads``), accumulated ``chunk_size`` examples at a
    time (memory ``[chunk_size, p]``, never ``[n, p]``). Full batch
    (``batch_size`` ``None`` or ``>= n``): ``ḡ²``. This is the ``v`` Adam
    normalises by, at ``θ*``.

    Args:
      apply_fn: batched model ``(params, inputs) -> outputs``.
      params: ``θ*``.
      data: the training data (padding rows left out).
      loss_fn: per-example loss ``(outputs, labels) -> [b]``.
      batch_size: the fine-tuning's mini-batch size B, or ``None``.
      chunk_size: examples per chunk (``None``: all at once).

    Returns:
      A pytree shaped like ``params``.
    """
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    return _gradient_second_moment(apply_fn, loss_fn, params, data.inputs,
                                   data.labels, data.task_ids >= 0, batch_size,
                                   chunk_size)


@functools.partial(jax.jit, static_argnums=(0, 1, 6, 7))
def _gradient_second_moment(apply_fn, loss_fn, params, inputs, labels, valid,
                            batch_size, chunk_size):
    def example_loss(p, x, y):
        return loss_fn(apply_fn(p, x[None]), y[None])[0]

    rows = inputs.shape[0]
    size = rows if chunk_size is None else min(chunk_size, rows)
    total = -(-rows // size) * size
    chunks = [pad_rows(x, total).reshape(total // size, size, *x.shape[1:])
              for x in (inputs, labels)]
    weights = jnp.arange(total) < rows
    weights = (weights & pad_rows(valid, total)).astype(
        jax.tree.leaves(params)[0].dtype).reshape(total // size, size)

    def add_chunk(sums, chunk):
        x, y, w = chunk
        grads = per_example_grads(example_loss, params, x, y)

        def weighted(power):
            return jax.tree.map(lambda g: jnp.tensordot(w, g ** power, axes=1), grads)

        return jax.tree.map(jnp.add, sums, (weighted(1), weighted(2))), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (first, second), _ = jax.lax.scan(add_chunk, (zeros, zeros),
                                      (*chunks, weights))
    n = jnp.sum(weights)
    full_batch = batch_size is None or batch_size >= rows
    # E[ĝ²] = c E[g²] + (1 − c) ḡ² with c = (n − B) / (B (n − 1)) (0: full batch).
    c = 0.0 if full_batch else (n - batch_size) / (batch_size * jnp.maximum(n - 1, 1))
    c = jnp.clip(c, 0.0, 1.0)
    return jax.tree.map(lambda s1, s2: c * s2 / n + (1 - c) * (s1 / n) ** 2,
                        first, second)


def linearized_finetune_scores(
    apply_fn: Callable, params, data: TaskData, target: TargetData, masks, *,
    finetune: retraining.TrainSpec, key, batch_key, proj_dim: int | None = 512,
    output_mode: str = "logits", projection_kind: str = "rademacher",
    projection: str = "dense", preconditioner: str = "none", batch_orders: int = 1,
    batch_size: int | None = 256, chunk_size: int = 64, mesh=None, store_dir=None,
    store_config: Mapping | None = None,
) -> EstimationResult:
    """First-order estimates of ``F(s)`` by linearized fine-tuning.

    Every subset runs ``finetune``'s program (``retraining.retrain``: same
    optimizer, schedule, steps, batch size, and with ``batch_key`` the same
    mini-batches as ``retrain(..., key=batch_key, replicates=batch_orders)``)
    on the linearized model around ``θ*``: ``w ∈ R^d`` from 0 in the projected
    space, or ``θ`` from ``θ*`` in the full space (``proj_dim=None``, exact for
    a model linear in its parameters, whatever the optimizer).

    With ``preconditioner="adam"`` (projected space, ``finetune.optimizer`` an
    :class:`Adam` without weight decay), Adam's second moment is held at its
    value at ``θ*``, ``v`` ``= gradient_second_moment(...)`` (``finetune``'s
    loss and batch size), and moved into the features: ``θ = θ* + S ⊙ P w``,
    ``S = (√v + ε)^{-1/2}``, features ``J diag(S) P`` ``[n, (C,) d]``; ``w``
    runs :meth:`Adam.momentum` (β1, learning rate and schedule of
    ``finetune.optimizer``) on the same batches. ``delta_norm`` is then
    ``||S ⊙ P ŵ_s||``. It models mini-batch Adam, whose gradient noise keeps
    ``v`` away from 0; with full-batch fine-tuning from a ``θ*`` where the
    mean gradient vanishes, ``v ≈ 0`` and the fixed-``v`` steps overshoot
    (measured on the modular ``tiny`` preset: relative errors above 100x).

    With ``projection="factored"`` the features are per-layer Kronecker-
    factored projections (:mod:`tasksurrogate_jax.estimate.factored`: the dense layers
    found in ``apply_fn``, dimensions ``factored.allocate_dims`` at
    ``proj_dim`` fitted on :data:`ALLOCATION_SAMPLE` training examples),
    computed once at ``θ*`` without any ``[n, p]`` array, and the subsets run
    by :func:`shared_linearized_finetune`: the same program and batches, with
    each step of a chunk one matrix product over its subsets. Its cost per
    subset and step is about ``4 K C d`` flops (``K`` a little over the batch
    size), whatever p. ``result.seconds`` holds the one-time feature cost
    apart from the subsets' cost.

    Args:
      apply_fn: batched model ``(params, inputs) -> logits [b, C]``.
      params: ``θ*``.
      data, target: the training data and target examples.
      masks: ``[m, num_tasks]`` 0/1 masks.
      finetune: the fine-tuning program to mirror (its ``loss_fn`` is the loss
        in ``"logits"`` mode; ``"margin"`` mode assumes cross-entropy).
      key: PRNG key of the projection (unused with ``proj_dim=None``).
      batch_key: the fine-tuning's key (its mini-batch draws).
      proj_dim: d, or ``None`` for the full parameter space.
      output_mode: ``"logits"`` or ``"margin"`` (projected space only).
      projection_kind: ``"rademacher"`` or ``"gaussian"``.
      projection: ``"dense"`` or ``"factored"`` (see above; projected space,
        no preconditioner, no ``store_dir``).
      preconditioner: ``"none"`` or ``"adam"`` (see above).
      batch_orders: batch orders averaged (replicate ``r`` draws the batches of
        ``retraining.replicate_key(batch_key, r)``).
      batch_size: examples per chunk when computing features.
      chunk_size: subsets per compiled call (padded to a multiple of the device
        count).
      mesh: a ``jax.sharding.Mesh`` with a ``"subsets"`` axis, passed to
        ``retraining.retrain``; ``None``: every device.
      store_dir: folder to save each finished chunk to and resume from (the
        ``retraining.retrain`` store of the linearized runs: its digests cover
        ``θ*`` and the projection through the linearized data).
      store_config: optional JSON-serialisable description recorded beside
        the store's key (the key holds digests of ``θ*``, the linearized
        data and the linearized fine-tuning program: ``retraining.retrain``).

    Returns:
      :class:`EstimationResult` with ``scores`` ``[m, T]`` (the mean over
      batch orders) and ``delta_norm`` (batch order 0's).
    """
    _check_output_mode(output_mode)
    if not isinstance(finetune, retraining.TrainSpec):
        raise TypeError(f"finetune must be a retraining.TrainSpec, got "
                        f"{type(finetune).__name__}.")
    _check_preconditioner(preconditioner, proj_dim)
    if preconditioner == "adam":
        _check_adam(finetune.optimizer)
    if projection not in PROJECTIONS[1:]:
        raise ValueError(f"projection must be 'dense' or 'factored', got "
                         f"{projection!r}.")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    batch_orders = check_positive_int(batch_orders, "batch_orders")
    masks = check_nonempty_masks(masks, data)
    _check_params_structure(apply_fn, params, data)
    mesh = sharding.check_mesh(mesh)
    if projection == "factored":
        _check_factored("finetune", proj_dim is None, preconditioner)
        if store_dir is not None:
            raise ValueError("store_dir is not supported with projection='factored' "
                             "(its chunks are not retraining runs); pass "
                             "store_dir=None.")
        return _factored_finetune_scores(
            apply_fn, params, data, target, masks, finetune=finetune, key=key,
            batch_key=batch_key, proj_dim=proj_dim, output_mode=output_mode,
            projection_kind=projection_kind, batch_orders=batch_orders,
            batch_size=batch_size, chunk_size=chunk_size, mesh=mesh)
    run = {"masks": masks, "key": batch_key, "replicates": batch_orders,
           "chunk_size": chunk_size, "return_params": True, "progress": False,
           "mesh": mesh, "store_dir": store_dir}
    if store_dir is not None:
        run["store_config"] = {
            "estimation": "linearized_finetune", "proj_dim": proj_dim,
            "output_mode": output_mode, "projection_kind": projection_kind,
            "preconditioner": preconditioner, "user": dict(store_config or {})}

    if proj_dim is None:
        if output_mode != "logits":
            raise ValueError("output_mode='margin' needs a projection: set "
                             "proj_dim, or use output_mode='logits'.")
        linear = linearize(apply_fn, params)

        def linear_apply(theta, inputs):
            return linear(otu.tree_sub(theta, params), inputs)

        spec = dataclasses.replace(finetune, apply_fn=linear_apply, accuracy_fn=None)
        result = retraining.retrain(data=data, target=target, spec=spec,
                                    init_params=params, **run)
        return EstimationResult(*_full_space_summary(result.losses,
                                                     result.params, params))

    dense = _projection(key, proj_dim, projection_kind, params)
    scale, optimizer = None, finetune.optimizer
    if preconditioner == "adam":
        second_moment = gradient_second_moment(
            apply_fn, params, data, loss_fn=finetune.loss_fn,
            batch_size=finetune.batch_size, chunk_size=batch_size)
        scale = jax.tree.map(lambda v: (jnp.sqrt(v) + optimizer.eps) ** -0.5,
                             second_moment)
        optimizer = optimizer.momentum()
    train, tgt = _linearize_data(apply_fn, params, data, target, dense,
                                 output_mode, batch_size, scale)
    loss_fn = finetune.loss_fn if output_mode == "logits" else margin_cross_entropy
    spec = dataclasses.replace(finetune, apply_fn=linear_model, loss_fn=loss_fn,
                               optimizer=optimizer, accuracy_fn=None)
    lin_data = dataclasses.replace(data, inputs=_stacked_inputs(train))
    lin_target = dataclasses.replace(target, inputs=_stacked_inputs(tgt))
    w0 = jnp.zeros(dense.proj_dim, train.features.dtype)
    result = retraining.retrain(data=lin_data, target=lin_target, spec=spec,
                                init_params=w0, **run)
    return EstimationResult(*_projected_summary(result.losses, result.params,
                                                dense, params, scale))


def _factored_finetune_scores(apply_fn, params, data, target, masks, *, finetune,
                              key, batch_key, proj_dim, output_mode,
                              projection_kind, batch_orders, batch_size, chunk_size,
                              mesh) -> EstimationResult:
    """:func:`linearized_finetune_scores` with ``projection="factored"``."""
    from tasksurrogate_jax.estimate import factored  # factored imports this module

    if key is None:
        raise ValueError("key is required for the projection.")
    start = time.perf_counter()
    valid = np.flatnonzero(np.asarray(data.task_ids) >= 0)
    structure = factored.find_dense_layers(apply_fn, params, data.inputs)
    sample = np.asarray(jax.random.choice(
        jax.random.fold_in(key, 1), valid, (min(ALLOCATION_SAMPLE, valid.size),),
        replace=False))
    _, factors = factored.layer_factors(apply_fn, params, data.inputs[sample],
                                        structure=structure, batch_size=batch_size)
    dims = factored.allocate_dims(structure, factors, proj_dim)
    projection = factored.make_factored_projection(
        key, structure=structure, dims=dims, kind=projection_kind)
    n = data.inputs.shape[0]
    both = factored.factored_linearized_examples(
        apply_fn, params, jnp.concatenate([data.inputs, target.inputs]),
        jnp.concatenate([data.labels, target.labels]), projection=projection,
        output_mode=output_mode, batch_size=batch_size)
    train = Linearized(*(x[:n] for x in both))
    tgt = Linearized(*(x[n:] for x in both))
    _check_finite_features(train.features, "training")
    _check_finite_features(tgt.features, "target")
    jax.block_until_ready((train, tgt))
    features_s = time.perf_counter() - start

    start = time.perf_counter()
    loss_fn = finetune.loss_fn if output_mode == "logits" else margin_cross_entropy
    losses, norms = shared_linearized_finetune(
        train, tgt, mask_to_weights(masks, data.task_ids),
        spec=dataclasses.replace(finetune, loss_fn=loss_fn),
        batch_key=batch_key, batch_orders=batch_orders, chunk_size=chunk_size,
        mesh=mesh, norm_fn=lambda w: factored.factored_update_norms(projection, w))
    scores = jax.block_until_ready(losses.mean(0))
    return EstimationResult(scores, norms, seconds={
        "features": features_s, "subsets": time.perf_counter() - start})


def shared_linearized_finetune(
    train: Linearized, target: Linearized, weights, *, spec: retraining.TrainSpec,
    batch_key, batch_orders: int = 1, chunk_size: int = 64, mesh=None,
    norm_fn: Callable | None = None,
):
    """Linearized fine-tuning of many subsets, each step one matrix product.

    Runs ``spec``'s program (optimizer, schedule, steps, batch size, loss) on
    the linearized model ``w ↦ outputs + features @ w`` from ``w = 0`` for
    every row of ``weights``, with the mini-batches of
    ``retraining.retrain(..., key=batch_key, replicates=batch_orders)``: at each
    step, the ``batch_size`` examples of largest Gumbel score among the
    subset's (``retraining.train_on_weights``). Those Gumbel scores are shared
    by every subset of a replicate, so all batches of a chunk lie in the
    ``K`` examples of largest score, with ``K`` the smallest number (rounded
    up to :data:`SUPERBATCH_GRANULARITY`, at most n) that holds each
    subset's batch at every step. A step then gathers ``[K, C, d]`` features
    once for the chunk and runs as two matrix products, ``[K C, d] × [d, S]``
    for the outputs and ``[S, K C] × [K C, d]`` for the gradients, with each
    subset's batch as its column's weights: about ``4 K C d`` flops per
    subset, and no per-subset gather.

    Args:
      train: linearized training examples (outputs ``[n, (C)]``, features
        ``[n, (C,) d]``, labels ``[n]``).
      target: linearized target examples, the same way.
      weights: ``[m, n]`` per-example weights (``data.mask_to_weights``).
      spec: the program; its ``loss_fn`` takes the linearized outputs
        (``apply_fn`` and ``accuracy_fn`` are not used).
      batch_key: the fine-tuning's key.
      batch_orders: batch orders (replicate ``r``: the batches of
        ``retraining.replicate_key(batch_key, r)``).
      chunk_size: subsets per compiled call.
      mesh: a ``jax.sharding.Mesh`` with a ``"subsets"`` axis to split each
        chunk's subsets over (``None``: every device).
      norm_fn: ``w [S, d] -> [S]``, the norm of the update in parameter space
        (default: ``||w||``).

    Returns:
      ``(losses [batch_orders, m, T], norms [m])``: per-target losses of each
      replicate and subset, and ``norm_fn`` of replicate 0's updates.
    """
    if not isinstance(spec, retraining.TrainSpec):
        raise TypeError(f"spec must be a retraining.TrainSpec, got "
                        f"{type(spec).__name__}.")
    batch_orders = check_positive_int(batch_orders, "batch_orders")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    mesh = sharding.check_mesh(mesh)
    weights = jnp.asarray(weights)
    n = train.features.shape[0]
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must be [num_subsets, {n}] (one weight per "
                         f"training example), got shape {weights.shape}.")
    if train.features.shape[-1] != target.features.shape[-1]:
        raise ValueError("train and target features differ in dimension: "
                         f"{train.features.shape[-1]} and "
                         f"{target.features.shape[-1]}.")
    norm_fn = _row_norms if norm_fn is None else norm_fn
    full_batch = spec.batch_size is None or spec.batch_size >= n
    train, target = sharding.replicate((train, target), mesh)
    losses, norms = [], None
    for r in range(batch_orders):
        run_key = jax.random.split(retraining.replicate_key(batch_key, r))[1]
        step_keys = jax.random.split(run_key, spec.num_steps)

        def chunk_fn(chunk, step_keys=step_keys):
            size = n if full_batch else min(n, _round_up(int(jnp.max(
                _superbatch_sizes(chunk, step_keys, spec.batch_size))),
                SUPERBATCH_GRANULARITY))
            chunk_losses, w = _shared_finetune_chunk(
                chunk, step_keys, train, target, spec=spec, superbatch=size)
            return chunk_losses, norm_fn(w)

        rep_losses, rep_norms = map_padded_chunks(chunk_fn, weights, chunk_size,
                                                  mesh=mesh)
        losses.append(rep_losses)
        norms = rep_norms if r == 0 else norms
    return jnp.stack(losses), norms


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@jax.jit
def _row_norms(w):
    return jnp.linalg.norm(w, axis=-1)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _superbatch_sizes(weights, step_keys, batch_size):
    """``[S]``: per subset, the fewest examples of largest Gumbel score that
    hold its batch of ``min(batch_size, |s|)`` examples at every step."""
    member = weights > 0
    need = jnp.minimum(batch_size, jnp.sum(member, axis=1))

    def one(step_key):
        gumbel = jax.random.gumbel(step_key, (weights.shape[1],), jnp.float32)
        counts = jnp.cumsum(member[:, jnp.argsort(-gumbel)], axis=1)
        return jnp.where(need > 0, jnp.sum(counts < need[:, None], axis=1) + 1, 0)

    return jnp.max(jax.lax.map(one, step_keys), axis=0)


@functools.partial(jax.jit, static_argnames=("spec", "superbatch"))
def _shared_finetune_chunk(weights, step_keys, train: Linearized,
                           target: Linearized, *, spec, superbatch):
    """One chunk of :func:`shared_linearized_finetune`: ``(losses [S, T],
    w [S, d])``; ``superbatch`` is K (n for full-batch programs)."""
    num_subsets, n = weights.shape
    d = train.features.shape[-1]
    w0 = jnp.zeros((num_subsets, d), train.features.dtype)
    full_batch = spec.batch_size is None or spec.batch_size >= n

    def outputs(examples, w):  # [S, k, (C)]
        flat = examples.features.reshape(-1, d) @ w.T  # [k (C), S]
        return examples.outputs[None] + flat.T.reshape(
            num_subsets, *examples.outputs.shape)

    def step(carry, step_key):
        w, state = carry
        if full_batch:
            batch, coef = train, weights
        else:
            gumbel = jax.random.gumbel(step_key, (n,), jnp.float32)
            _, idx = jax.lax.top_k(gumbel, superbatch)
            batch = Linearized(*(x[idx] for x in train))
            coef = weights[:, idx]
            rank = jnp.cumsum(coef > 0, axis=1)
            coef = jnp.where((coef > 0) & (rank <= spec.batch_size), coef, 0)
        coef = coef.astype(train.features.dtype)
        coef = coef / jnp.maximum(jnp.sum(coef, axis=1, keepdims=True), 1e-30)

        def total_loss(z):
            losses = jax.vmap(spec.loss_fn, in_axes=(0, None))(z, batch.labels)
            return jnp.sum(coef * losses)

        residual = jax.grad(total_loss)(outputs(batch, w))
        grads = residual.reshape(num_subsets, -1) @ batch.features.reshape(-1, d)
        updates, state = jax.vmap(spec.optimizer.update)(grads, state, w)
        return (optax.apply_updates(w, updates), state), None

    state = jax.vmap(spec.optimizer.init)(w0)
    (w, _), _ = jax.lax.scan(step, (w0, state), step_keys)
    losses = jax.vmap(spec.loss_fn, in_axes=(0, None))(outputs(target, w),
                                                      target.labels)
    return losses, w


def _stacked_inputs(examples: Linearized):
    """``[n, (C,) 1 + d]``: outputs at ``θ*`` then the projected Jacobian."""
    return jnp.concatenate([examples.outputs[..., None], examples.features], axis=-1)


def difference_form(estimated, estimated_all, measured_all):
    """``F̂(s) − F̂(s*) + F(s*)``: the estimates anchored at one real run.

    Args:
      estimated: ``[m, T]`` estimates ``F̂(s)``.
      estimated_all: ``[T]`` the estimate for all tasks, ``F̂(s*)``.
      measured_all: ``[T]`` the real fine-tuning on all tasks, ``F(s*)``.

    Returns:
      ``[m, T]``; equal to ``measured_all`` where ``s = s*``.
    """
    estimated = jnp.asarray(estimated)
    for name, value in (("estimated_all", estimated_all),
                        ("measured_all", measured_all)):
        if jnp.shape(value) != estimated.shape[1:]:
            raise ValueError(f"{name} must have shape {estimated.shape[1:]} (one "
                             f"value per target), got {jnp.shape(value)}.")
    return estimated - jnp.asarray(estimated_all) + jnp.asarray(measured_all)


def _check_resolved_projection(projection):
    if projection not in PROJECTIONS[1:]:
        raise ValueError(f"projection must be 'dense' or 'factored' (resolved), "
                         f"got {projection!r}.")


def _check_output_mode(output_mode):
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got "
                         f"{output_mode!r}.")


def _check_preconditioner(preconditioner, proj_dim):
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got "
                         f"{preconditioner!r}.")
    if preconditioner != "none" and proj_dim is None:
        raise ValueError(
            f"preconditioner={preconditioner!r} needs a projection (proj_dim): "
            "with proj_dim=None the fine-tuning optimizer runs on θ itself.")


def _check_factored(method, full, preconditioner):
    if method != "finetune":
        raise ValueError("projection='factored' needs method='finetune' (the "
                         f"convex solve projects densely), got {method!r}.")
    if full:
        raise ValueError("projection='factored' needs a projection: set proj_dim "
                         "to an int or 'auto'.")
    if preconditioner != "none":
        raise ValueError(
            f"projection='factored' does not support preconditioner="
            f"{preconditioner!r}: a per-parameter scale is not Kronecker-"
            "factored. Use projection='dense'.")


def _check_adam(optimizer) -> None:
    if not isinstance(optimizer, Adam):
        raise ValueError(
            "preconditioner='adam' reads Adam's hyperparameters from the "
            "fine-tuning optimizer (finetune.optimizer), which must be an "
            f"estimation.Adam; got {type(optimizer).__name__}. Build it as "
            "Adam(learning_rate, b1=..., b2=..., eps=...), the same training as "
            "optax.adam.")
    if optimizer.weight_decay != 0:
        raise ValueError(
            "preconditioner='adam' models Adam without weight decay (the decay "
            "of θ* leaves the projected subspace); finetune.optimizer has "
            f"weight_decay={optimizer.weight_decay}.")


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
        jax.eval_shape(apply_fn, params, leading_rows_spec(data.inputs))
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


def _check_ridge(ridge, reference_update_norm, proj_dim) -> bool:
    """Whether ``ridge`` is ``"auto"`` (validated); a ``ValueError`` otherwise."""
    if isinstance(ridge, str):
        if ridge != "auto":
            raise ValueError(f"ridge must be a number >= 0 or 'auto', got {ridge!r}.")
        if proj_dim is None:
            raise ValueError("ridge='auto' needs a projection (proj_dim).")
        if reference_update_norm is None or not reference_update_norm > 0:
            raise ValueError(
                "ridge='auto' needs reference_update_norm > 0, the norm "
                "||θ_s* − θ*|| of one real fine-tuning on all tasks; got "
                f"{reference_update_norm}.")
        return True
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0 or 'auto', got {ridge}.")
    return False

