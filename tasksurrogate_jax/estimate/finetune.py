"""Linearized fine-tuning: the fine-tuning program itself, run on the
linearized model (the default estimator of the workloads).

:func:`linearized_finetune_scores` runs the program's optimizer, schedule,
steps, batch size and batch draws (``retraining.train_on_weights``) on the
linearized model, with ``w`` as the parameters, starting from 0. For a model
linear in its parameters this *is* fine-tuning (``proj_dim=None``). Plain
gradient descent on ``w`` follows the projected kernel ``Φ Φ^T ≈ J J^T``
(``E[P P^T] = I``), so it tracks real gradient-descent fine-tuning in function
space. The optimizer acts on ``w``: coordinate-wise optimizers (Adam) and
weight decay act on ``w``'s coordinates, not on ``θ``'s.

For Adam fine-tuning, ``preconditioner="adam"`` runs Adam with its second
moment fixed at ``θ*`` instead: ``v`` (:func:`gradient_second_moment`) moves
into the features, ``θ = θ* + S ⊙ P w`` with ``S = (√v + ε)^{-1/2}`` (features
``J diag(S) P``), and ``w`` follows Adam's first moment alone
(:meth:`Adam.momentum`: momentum with Adam's β1 and learning rate). Then
``Δθ ≈ −lr S ⊙ P Pᵀ (S ⊙ m̂) ≈ −lr m̂ / (√v + ε)``: Adam's step with a fixed
``v``, whatever P mixes. The fine-tuning optimizer must be an :class:`Adam`
(an optax Adam whose hyperparameters stay readable).

With Kronecker-factored features (:mod:`~tasksurrogate_jax.estimate.factored`)
the subsets of a chunk share each step's batch and run as one matrix product
(:func:`shared_linearized_finetune`). Each chunk is split over the devices of
a mesh through ``retraining.retrain``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import (
    TargetData,
    TaskData,
    check_nonempty_masks,
    mask_to_weights,
)
from tasksurrogate_jax.estimate import factored
from tasksurrogate_jax.estimate.estimation import (
    PROJECTIONS,
    EstimationResult,
    check_factored,
    check_params_structure,
    check_preconditioner,
)
from tasksurrogate_jax.estimate.features import (
    Linearized,
    check_finite_features,
    check_output_mode,
    full_space_summary,
    linear_model,
    linearize_data,
    margin_cross_entropy,
    projected_summary,
    projection_from_key,
)
from tasksurrogate_jax.estimate.linearize import (
    linearize,
    per_example_grads,
)
from tasksurrogate_jax.losses import softmax_cross_entropy
from tasksurrogate_jax.truth import retraining, sharding
from tasksurrogate_jax.truth.chunking import map_padded_chunks, pad_rows

# Training examples that factored.allocate_dims fits its error model on.
ALLOCATION_SAMPLE = 64
# The shared batch of a chunk (linearized_finetune_scores, factored) is
# rounded up to a multiple of this many examples (fewer compiled shapes).
SUPERBATCH_GRANULARITY = 16
# Subsets per compiled call of the shared program (shared_linearized_finetune).
# Its steps are matrix products over the chunk's subsets, whose rate grows with
# the chunk: on digits ``wide`` (d = 32,768, 2-core CPU) 1,024 subsets took
# 33.6 / 27.8 / 23.2 / 20.7 s at 64 / 128 / 256 / 512 per chunk. Memory per
# subset is a few ``[d]`` vectors (the update and Adam's moments).
SHARED_CHUNK_SIZE = 256
# Subsets per compiled call of the per-subset (vmapped) linearized runs.
VMAPPED_CHUNK_SIZE = 64


def default_chunk_size(projection: str) -> int:
    """Subsets per compiled call of :func:`linearized_finetune_scores` when
    ``chunk_size=None``: :data:`SHARED_CHUNK_SIZE` for ``"factored"``,
    :data:`VMAPPED_CHUNK_SIZE` otherwise."""
    return SHARED_CHUNK_SIZE if projection == "factored" else VMAPPED_CHUNK_SIZE


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
    batch_size: int | None = 256, chunk_size: int | None = None, mesh=None,
    store_dir=None, store_config: Mapping | None = None,
    linearization_points: int = 1,
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

    With ``linearization_points=S > 1`` (full space only) the model is
    re-linearized along one real fine-tuning on all tasks (same program and
    batches): its parameters ``θ_k`` at the start of each of S equal segments
    of the steps. In segment k every subset trains the model linearized at
    ``θ_k``, ``f(θ_k) + J_k (θ − θ_k)``, carrying its parameters and optimizer
    state across segments, and its target loss is read through the
    linearization at the last point. A subset stays close to the full set's
    path where it may move far from ``θ*``: on the modular ``cpu`` preset
    S = 5 cut the median relative error from 52.7% to 8.3% (4 batch orders,
    ``tasksurrogate run modular --preset cpu``). Each subset's run costs the
    same at any S; each batch order adds one real fine-tuning on all tasks.

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
        count; ``None``: :data:`SHARED_CHUNK_SIZE` for ``"factored"``,
        :data:`VMAPPED_CHUNK_SIZE` otherwise).
      mesh: a ``jax.sharding.Mesh`` with a ``"subsets"`` axis, passed to
        ``retraining.retrain``; ``None``: every device.
      store_dir: folder to save each finished chunk to and resume from (the
        ``retraining.retrain`` store of the linearized runs: its digests cover
        ``θ*`` and the projection through the linearized data).
      linearization_points: S, the points of the full set's fine-tuning path
        the model is linearized at (see above; ``1``: ``θ*`` only).
      store_config: optional JSON-serialisable description recorded beside
        the store's key (the key holds digests of ``θ*``, the linearized
        data and the linearized fine-tuning program: ``retraining.retrain``).

    Returns:
      :class:`~tasksurrogate_jax.estimate.estimation.EstimationResult` with
      ``scores`` ``[m, T]`` (the mean over
      batch orders) and ``delta_norm`` (batch order 0's).
    """
    check_output_mode(output_mode)
    if not isinstance(finetune, retraining.TrainSpec):
        raise TypeError(f"finetune must be a retraining.TrainSpec, got "
                        f"{type(finetune).__name__}.")
    check_preconditioner(preconditioner, proj_dim)
    if preconditioner == "adam":
        _check_adam(finetune.optimizer)
    if projection not in PROJECTIONS[1:]:
        raise ValueError(f"projection must be 'dense' or 'factored', got "
                         f"{projection!r}.")
    chunk_size = check_positive_int(
        default_chunk_size(projection) if chunk_size is None else chunk_size,
        "chunk_size")
    batch_orders = check_positive_int(batch_orders, "batch_orders")
    masks = check_nonempty_masks(masks, data)
    check_params_structure(apply_fn, params, data)
    mesh = sharding.check_mesh(mesh)
    linearization_points = check_positive_int(linearization_points,
                                              "linearization_points")
    if linearization_points > 1 and (proj_dim is not None or store_dir is not None):
        raise ValueError(
            f"linearization_points={linearization_points} re-linearizes in the "
            "full parameter space and keeps no store: pass proj_dim=None and "
            f"store_dir=None (got proj_dim={proj_dim!r}, store_dir={store_dir!r}).")
    if projection == "factored":
        check_factored("finetune", proj_dim is None, preconditioner)
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
        if linearization_points > 1:
            return _segmented_finetune_scores(
                apply_fn, params, data, target, masks, finetune=finetune,
                batch_key=batch_key, batch_orders=batch_orders,
                points=linearization_points, chunk_size=chunk_size, mesh=mesh)
        return _full_space_finetune_scores(apply_fn, params, data, target,
                                           finetune=finetune, run=run)
    return _dense_finetune_scores(
        apply_fn, params, data, target, finetune=finetune, key=key,
        proj_dim=proj_dim, output_mode=output_mode, projection_kind=projection_kind,
        preconditioner=preconditioner, batch_size=batch_size, run=run)


def _full_space_finetune_scores(apply_fn, params, data, target, *, finetune, run):
    """:func:`linearized_finetune_scores` in the full space: ``retrain`` of
    the model linearized at ``θ*`` (``run``: its other arguments)."""
    linear = linearize(apply_fn, params)

    def linear_apply(theta, inputs):
        return linear(otu.tree_sub(theta, params), inputs)

    spec = dataclasses.replace(finetune, apply_fn=linear_apply, accuracy_fn=None)
    result = retraining.retrain(data=data, target=target, spec=spec,
                                init_params=params, **run)
    return EstimationResult(*full_space_summary(result.losses, result.params,
                                                 params))


def _segmented_finetune_scores(apply_fn, params, data, target, masks, *,
                               finetune, batch_key, batch_orders, points,
                               chunk_size, mesh):
    """:func:`linearized_finetune_scores` re-linearized at ``points`` points of
    the full set's fine-tuning path (batch order ``r``: the batches of
    ``replicate_key(batch_key, r)``, shared by the path and every subset)."""
    spec = dataclasses.replace(finetune, apply_fn=apply_fn)
    every = -(-spec.num_steps // points)
    weights = mask_to_weights(masks, data.task_ids)
    data, target = sharding.replicate((data, target), mesh)
    losses, norms = [], None
    for r in range(batch_orders):
        run_key = jax.random.split(retraining.replicate_key(batch_key, r))[1]
        path = _full_set_path(params, run_key, data, spec=spec, every=every)
        order_losses, order_norms = map_padded_chunks(
            lambda chunk, run_key=run_key, path=path: _segmented_chunk(
                chunk, params, run_key, path, data, target, spec=spec,
                every=every), weights, chunk_size, mesh=mesh)
        losses.append(order_losses)
        norms = order_norms if r == 0 else norms
    return EstimationResult(jnp.mean(jnp.stack(losses), axis=0), norms)


@functools.partial(jax.jit, static_argnames=("spec", "every"))
def _full_set_path(params, run_key, data, *, spec, every):
    """The linearization points: the full set's fine-tuning parameters before
    steps ``0, every, 2 every, ...`` (leaves ``[S, ...]``)."""
    full = jnp.ones(data.num_examples, jnp.float32)
    return retraining.train_stepwise(
        params, full, run_key, data, spec=spec, record_every=every,
        apply_at_step=lambda p, step, inputs: spec.apply_fn(p, inputs))[1]


def _linearized_at(apply_fn, point, theta, inputs):
    """``f(point) + J(point) (theta − point)`` at ``inputs``."""
    outputs, change = jax.jvp(lambda q: apply_fn(q, inputs), (point,),
                              (otu.tree_sub(theta, point),))
    return outputs + change


@functools.partial(jax.jit, static_argnames=("spec", "every"))
def _segmented_chunk(weights, params, run_key, path, data, target, *, spec,
                     every):
    """``(losses [S, T], ||θ_s − θ*|| [S])`` of a chunk of subsets' weights."""
    last = jax.tree.map(lambda leaf: leaf[-1], path)

    def apply_at_step(theta, step, inputs):
        point = jax.tree.map(lambda leaf: leaf[step // every], path)
        return _linearized_at(spec.apply_fn, point, theta, inputs)

    def one(row):
        theta = retraining.train_stepwise(params, row, run_key, data, spec=spec,
                                          apply_at_step=apply_at_step)[0]
        outputs = _linearized_at(spec.apply_fn, last, theta, target.inputs)
        return (spec.loss_fn(outputs, target.labels),
                otu.tree_norm(otu.tree_sub(theta, params)))

    return jax.vmap(one)(weights)


def _dense_finetune_scores(apply_fn, params, data, target, *, finetune, key,
                           proj_dim, output_mode, projection_kind, preconditioner,
                           batch_size, run):
    """:func:`linearized_finetune_scores` under a dense projection: ``retrain``
    of ``w`` on the projected features (``run``: its other arguments)."""
    dense = projection_from_key(key, proj_dim, projection_kind, params)
    scale, optimizer = None, finetune.optimizer
    if preconditioner == "adam":
        second_moment = gradient_second_moment(
            apply_fn, params, data, loss_fn=finetune.loss_fn,
            batch_size=finetune.batch_size, chunk_size=batch_size)
        scale = jax.tree.map(lambda v: (jnp.sqrt(v) + optimizer.eps) ** -0.5,
                             second_moment)
        optimizer = optimizer.momentum()
    train, tgt = linearize_data(apply_fn, params, data, target, dense,
                                 output_mode, batch_size, scale)
    loss_fn = finetune.loss_fn if output_mode == "logits" else margin_cross_entropy
    spec = dataclasses.replace(finetune, apply_fn=linear_model, loss_fn=loss_fn,
                               optimizer=optimizer, accuracy_fn=None)
    lin_data = dataclasses.replace(data, inputs=_stacked_inputs(train))
    lin_target = dataclasses.replace(target, inputs=_stacked_inputs(tgt))
    w0 = jnp.zeros(dense.proj_dim, train.features.dtype)
    result = retraining.retrain(data=lin_data, target=lin_target, spec=spec,
                                init_params=w0, **run)
    return EstimationResult(*projected_summary(result.losses, result.params,
                                                dense, params, scale))


def _factored_finetune_scores(apply_fn, params, data, target, masks, *, finetune,
                              key, batch_key, proj_dim, output_mode,
                              projection_kind, batch_orders, batch_size, chunk_size,
                              mesh) -> EstimationResult:
    """:func:`linearized_finetune_scores` with ``projection="factored"``."""
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
    check_finite_features(train.features, "training")
    check_finite_features(tgt.features, "target")
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
    batch_key, batch_orders: int = 1, chunk_size: int = SHARED_CHUNK_SIZE,
    mesh=None, norm_fn: Callable | None = None,
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
      chunk_size: subsets per compiled call (:data:`SHARED_CHUNK_SIZE`: larger
        chunks run the steps' matrix products at a higher rate).
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


def _check_adam(optimizer) -> None:
    if not isinstance(optimizer, Adam):
        raise ValueError(
            "preconditioner='adam' reads Adam's hyperparameters from the "
            "fine-tuning optimizer (finetune.optimizer), which must be a "
            f"tasksurrogate_jax.estimate.finetune.Adam (ts.Adam); got "
            f"{type(optimizer).__name__}. Build it as "
            "Adam(learning_rate, b1=..., b2=..., eps=...), the same training as "
            "optax.adam.")
    if optimizer.weight_decay != 0:
        raise ValueError(
            "preconditioner='adam' models Adam without weight decay (the decay "
            "of θ* leaves the projected subspace); finetune.optimizer has "
            f"weight_decay={optimizer.weight_decay}.")
