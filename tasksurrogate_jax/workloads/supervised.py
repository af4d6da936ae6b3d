"""A supervised workload from any model: retraining, ``θ*``, estimation.

:class:`SupervisedWorkload` turns a model (``apply_fn``, ``init_fn``), multi-task
training data and target data into a subset-score oracle. It owns what every
supervised workload needs:

- ``θ*`` (:meth:`~SupervisedWorkload.base_params`): trained from scratch on all
  tasks, once per key;
- the ground truth in one of two **regimes** (:data:`REGIMES`):

  - ``"scratch"``: train from the initialisation on the tasks of the mask with
    the ``train`` settings (datamodels, TRAK's LDS);
  - ``"finetune"``: start from ``θ*`` and train with the ``finetune`` settings
    on the tasks of the mask. This is what the first-order estimator
    approximates.

  with ``R`` paired replicates in one compiled program
  (:meth:`~SupervisedWorkload.replicate_scores`, ``[R, m, T]``): within a
  replicate every mask shares the initialisation (or ``θ*``) and the batch
  order; replicates differ in those keys. The ground truth is their mean;
- first-order estimates around ``θ*`` (:meth:`~SupervisedWorkload.estimate`);
- the attribution baselines at ``θ*`` (:meth:`~SupervisedWorkload.
  baseline_scores`): influence functions, TracIn and TRAK.

Keys: every method takes ``key``; ``θ*`` of ``key`` is the scratch training on
all tasks with replicate 0's keys (``retraining.replicate_key(key, 0)``), so
the all-ones row of replicate 0 in the scratch regime is ``θ*``'s training.

Flax NNX models enter through :meth:`SupervisedWorkload.from_nnx` (or
:func:`nnx_model_functions`); any other model (Linen, Equinox, plain JAX)
through ``apply_fn(params, inputs)`` and ``init_fn(key)``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from tasksurrogate_jax._checks import as_typed_key, check_positive_int
from tasksurrogate_jax.data import TargetData, TaskData, check_target_matches
from tasksurrogate_jax.estimate import baselines as baseline_methods
from tasksurrogate_jax.estimate.convex import estimate_scores
from tasksurrogate_jax.estimate.estimation import (
    EstimationResult,
    EstimationSettings,
    difference_form,
)
from tasksurrogate_jax.estimate.finetune import linearized_finetune_scores
from tasksurrogate_jax.estimate.projection import num_parameters
from tasksurrogate_jax.losses import argmax_accuracy, softmax_cross_entropy
from tasksurrogate_jax.truth.fingerprint import array_digest
from tasksurrogate_jax.truth.retraining import (
    RetrainResult,
    TrainSpec,
    make_train_spec,
    replicate_key,
    retrain,
    train_program_digest,
)
from tasksurrogate_jax.workloads.base import REGIMES, LeaveOneOutWorkload

PRECISIONS = ("float32", "float64")
DEFAULT_ESTIMATION = EstimationSettings()


@jax.jit
def _projection_key(key):
    """``fold_in(key, 1)``, the projection's key, as one compiled program (an
    eager ``fold_in`` uploads its Python constant)."""
    return jax.random.fold_in(key, 1)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One training program's optimizer and length (the model comes apart).

    Attributes:
      optimizer: an ``optax.GradientTransformation``, or an
        :class:`~tasksurrogate_jax.estimate.finetune.Adam` (optax's Adam with readable
        hyperparameters: what fine-tuning needs for the estimator's
        ``preconditioner="adam"``).
      num_steps: optimizer steps (``0`` only for fine-tuning: no update).
      batch_size: mini-batch size, or ``None`` for full batch.
    """

    optimizer: optax.GradientTransformation
    num_steps: int
    batch_size: int | None = None


def check_regime(regime: str) -> str:
    """``regime`` if it is one of :data:`REGIMES`, else a ``ValueError``."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}.")
    return regime


def nnx_model_functions(module_factory: Callable) -> tuple[Callable, Callable]:
    """``(apply_fn, init_fn)`` of a Flax NNX model built by ``module_factory``.

    Args:
      module_factory: ``module_factory(rngs: nnx.Rngs) -> nnx.Module`` whose only
        state is ``nnx.Param`` (no batch statistics, dropout or RNG state).

    Returns:
      ``apply_fn(params, inputs) -> outputs`` and ``init_fn(key) -> params``,
      where ``params`` is the model's ``nnx.State`` of parameters.
    """
    from flax import nnx

    if not callable(module_factory):
        raise TypeError(
            f"module_factory must be callable, got {type(module_factory).__name__}.")
    abstract = nnx.eval_shape(lambda: module_factory(nnx.Rngs(0)))
    if not isinstance(abstract, nnx.Module):
        raise TypeError(
            "module_factory(rngs) must return an nnx.Module, got "
            f"{type(abstract).__name__}.")
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            "the model holds state other than nnx.Param (batch statistics, dropout "
            "or RNG state); pass apply_fn and init_fn that handle it instead.")

    def apply_fn(params, inputs):
        return nnx.merge(graphdef, params, rest)(inputs)

    def init_fn(key):
        return nnx.split(module_factory(nnx.Rngs(params=key)), nnx.Param, ...)[1]

    return apply_fn, init_fn


class SupervisedWorkload(LeaveOneOutWorkload):
    """Subset scores of a supervised model (see the module docstring).

    Args:
      apply_fn: ``apply_fn(params, inputs[batch, ...]) -> outputs[batch, ...]``.
      init_fn: ``init_fn(key) -> params``, a pytree of arrays.
      data: the training :class:`~tasksurrogate_jax.data.TaskData`.
      target: the target :class:`~tasksurrogate_jax.data.TargetData`.
      train: :class:`TrainSettings` of training from scratch (``θ*`` and the
        ``"scratch"`` regime).
      finetune: :class:`TrainSettings` of the ``"finetune"`` regime, or ``None``
        (that regime then raises).
      loss_fn: per-example loss ``(outputs, labels) -> [batch]``, trained on and
        reported as the target score.
      accuracy_fn: per-example correctness, or ``None``.
      description: JSON-able description of the model and data for result
        stores (a folder is never reused for another description).
      name: the workload's name.
      precision: ``"float32"``, or ``"float64"`` (CPU; needs 64-bit JAX,
        ``JAX_ENABLE_X64=1``): floating inputs and parameters are cast, and
        results no longer depend on the chunk size through rounding.
      estimation: the :class:`~tasksurrogate_jax.estimate.estimation.
        EstimationSettings` of :meth:`estimated_scores`.
    """

    name: ClassVar[str] = "supervised"
    baselines: ClassVar[tuple[str, ...]] = baseline_methods.BASELINES
    estimation: EstimationSettings = DEFAULT_ESTIMATION

    def __init__(
        self, *, apply_fn: Callable, init_fn: Callable, data: TaskData,
        target: TargetData, train: TrainSettings, finetune: TrainSettings | None,
        loss_fn: Callable = softmax_cross_entropy,
        accuracy_fn: Callable | None = argmax_accuracy,
        description: Mapping[str, Any] | None = None, name: str | None = None,
        precision: str = "float32",
        estimation: EstimationSettings = DEFAULT_ESTIMATION,
    ):
        for arg, value in (("apply_fn", apply_fn), ("init_fn", init_fn)):
            if not callable(value):
                raise TypeError(f"{arg} must be callable, got {type(value).__name__}.")
        if not isinstance(data, TaskData):
            raise TypeError(f"data must be a TaskData, got {type(data).__name__}.")
        check_target_matches(data, target)
        empty = np.flatnonzero(data.task_sizes() == 0)
        if empty.size:
            names = [data.task_names[i] for i in empty]
            raise ValueError(f"data has tasks without examples: {names}; every task "
                             "needs at least one training example.")
        try:
            json.dumps(dict(description or {}), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"description must be a JSON-serialisable mapping (it "
                            f"is recorded with stored results): {err}") from err
        if not isinstance(estimation, EstimationSettings):
            raise TypeError("estimation must be an EstimationSettings, got "
                            f"{type(estimation).__name__}.")
        data, target, init_fn = _cast(data, target, init_fn, precision)
        self.estimation = estimation
        self.apply_fn, self.init_fn = apply_fn, init_fn
        self.data, self.target = data, target
        self.loss_fn = loss_fn
        self.description = {**(description or {}), "precision": precision}
        if name is not None:
            self.name = name
        self.train_spec = self._spec(train, "train", loss_fn, accuracy_fn)
        self.finetune_spec = (None if finetune is None else
                              self._spec(finetune, "finetune", loss_fn, accuracy_fn))
        _check_model(apply_fn, init_fn, data)
        self._base_params: dict[bytes, Any] = {}

    @classmethod
    def from_nnx(cls, module_factory: Callable, *, data: TaskData,
                 target: TargetData, train: TrainSettings,
                 finetune: TrainSettings | None,
                 loss_fn: Callable = softmax_cross_entropy,
                 accuracy_fn: Callable | None = argmax_accuracy,
                 description: Mapping[str, Any] | None = None,
                 name: str | None = None, precision: str = "float32",
                 estimation: EstimationSettings = DEFAULT_ESTIMATION,
                 ) -> SupervisedWorkload:
        """The workload of a Flax NNX model (see :func:`nnx_model_functions`)."""
        apply_fn, init_fn = nnx_model_functions(module_factory)
        return cls(apply_fn=apply_fn, init_fn=init_fn, data=data, target=target,
                   train=train, finetune=finetune, loss_fn=loss_fn,
                   accuracy_fn=accuracy_fn, description=description, name=name,
                   precision=precision, estimation=estimation)

    def _spec(self, settings, which, loss_fn, accuracy_fn) -> TrainSpec:
        if not isinstance(settings, TrainSettings):
            raise TypeError(
                f"{which} must be a TrainSettings, got {type(settings).__name__}.")
        steps = check_positive_int(settings.num_steps, f"{which}.num_steps",
                                   minimum=0 if which == "finetune" else 1)
        # make_train_spec wants >= 1 step; fine-tuning for 0 steps (θ* itself)
        # is a valid program, set after the other fields are validated.
        spec = make_train_spec(apply_fn=self.apply_fn, optimizer=settings.optimizer,
                               num_steps=max(steps, 1),
                               batch_size=settings.batch_size, loss_fn=loss_fn,
                               accuracy_fn=accuracy_fn)
        return dataclasses.replace(spec, num_steps=steps)

    def _require_finetune(self, what: str) -> TrainSpec:
        if self.finetune_spec is None:
            raise ValueError(f"{what} needs fine-tuning settings: build the "
                             "workload with finetune=TrainSettings(...).")
        return self.finetune_spec

    # -- the interface ------------------------------------------------------

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.data.task_names

    @property
    def num_targets(self) -> int:
        return self.target.num_targets

    @property
    def target_description(self) -> str:
        return self.target.description

    def fingerprint(self) -> dict:
        """Digests of everything that determines this workload's scores (JSON).

        ``{"workload", "description", "task_names", "target_description",
        "data", "target", "train", "init", "finetune"}``: the training and
        target arrays (bytes and dtype), the programs of training from scratch
        and of fine-tuning (model, loss, accuracy, optimizer with its
        hyperparameters and schedule, steps, batch size: their jaxprs at the
        data's shapes, :func:`~tasksurrogate_jax.truth.retraining.
        train_program_digest`) and of ``init_fn``. Two workloads with equal
        fingerprints compute the same numbers from the same keys; the
        pipeline refuses a run folder whose fingerprint differs.
        """
        params = jax.eval_shape(self.init_fn, jax.random.key(0))
        programs = train_program_digest(self.train_spec, params, self.data,
                                        self.target, init_fn=self.init_fn)
        finetune = (None if self.finetune_spec is None else train_program_digest(
            self.finetune_spec, params, self.data, self.target)["train"])
        return {"workload": self.name, "description": self.description,
                "task_names": list(self.task_names),
                "target_description": self.target_description,
                "data": array_digest(self.data.inputs, self.data.labels,
                                     self.data.task_ids),
                "target": array_digest(self.target.inputs, self.target.labels),
                "train": programs["train"], "init": programs["init"],
                "finetune": finetune}

    def store_config(self, regime: str) -> dict:
        """JSON description of the workload and regime, recorded in a results
        store beside its key (the key, :func:`~tasksurrogate_jax.truth.retraining.
        retrain`'s, holds the digests of the data and the program)."""
        check_regime(regime)
        return {"workload": self.name, "regime": regime, **self.description}

    def base_params(self, *, key):
        """``θ*``: trained from scratch on all tasks (cached per key).

        The scratch program with replicate 0's keys of ``key``: the same run as
        the all-ones row of replicate 0 in ``replicate_scores(..., regime=
        "scratch")``.
        """
        key = as_typed_key(key)
        cache_key = np.asarray(jax.random.key_data(key)).tobytes()
        if cache_key not in self._base_params:
            full = np.ones((1, self.num_tasks), np.float32)
            result = retrain(full, data=self.data, target=self.target,
                             spec=self.train_spec, key=replicate_key(key, 0),
                             init_fn=self.init_fn, return_params=True,
                             progress=False)
            self._base_params[cache_key] = jax.tree.map(lambda leaf: leaf[0],
                                                        result.params)
        return self._base_params[cache_key]

    def retrain(self, masks, *, key, regime: str, replicates: int = 1,
                base_params=None, chunk_size: int | None = None, store_dir=None,
                return_params: bool = False, progress: bool = True,
                mesh=None) -> RetrainResult:
        """Trains every (replicate, mask) pair in ``regime``: a
        :class:`~tasksurrogate_jax.truth.retraining.RetrainResult` with ``losses``
        ``[replicates, num_subsets, num_targets]``.

        Args:
          masks: ``[num_subsets, num_tasks]`` 0/1.
          key: PRNG key; replicate ``r`` uses ``replicate_key(key, r)`` (its
            initialisation in ``"scratch"``, its batch order in both regimes);
            ``"finetune"`` starts from :meth:`base_params` of ``key``.
          regime: ``"scratch"`` or ``"finetune"``.
          replicates: ``R >= 1`` paired replicates.
          base_params: ``θ*`` to fine-tune from, if already at hand (e.g. read
            back from a store); ``None``: :meth:`base_params` of ``key``.
          chunk_size: rows per compiled call (``None``: by memory).
          store_dir: folder to store finished chunks in and resume from.
          return_params: also return the trained parameters.
          progress: a progress bar over chunks.
          mesh: a ``jax.sharding.Mesh`` with a ``"subsets"`` axis to split
            the chunks over (``None``: every device; see
            :func:`tasksurrogate_jax.truth.sharding.subset_mesh`).
        """
        masks = self.check_masks(masks)
        check_regime(regime)
        replicates = check_positive_int(replicates, "replicates")
        if regime == "scratch":
            spec, init = self.train_spec, {"init_fn": self.init_fn}
        else:
            spec = self._require_finetune("regime='finetune'")
            theta = self.base_params(key=key) if base_params is None else base_params
            init = {"init_params": theta}
        store = {} if store_dir is None else {
            "store_dir": store_dir, "store_config": self.store_config(regime)}
        return retrain(masks, data=self.data, target=self.target, spec=spec, key=key,
                       replicates=replicates, chunk_size=chunk_size,
                       return_params=return_params, progress=progress, mesh=mesh,
                       **init, **store)

    def replicate_scores(self, masks, *, key, regime: str, replicates: int = 1,
                         base_params=None, chunk_size: int | None = None,
                         store_dir=None, progress: bool = True) -> jax.Array:
        """Per-replicate target losses ``[replicates, num_subsets, num_targets]``
        (see :meth:`retrain`)."""
        return self.retrain(masks, key=key, regime=regime, replicates=replicates,
                            base_params=base_params, chunk_size=chunk_size,
                            store_dir=store_dir, progress=progress).losses

    def exact_scores(self, masks, *, key, regime: str, replicates: int = 1,
                     base_params=None, chunk_size: int | None = None,
                     store_dir=None, progress: bool = True) -> jax.Array:
        """The ground truth ``F(s)``: the mean over replicates of
        :meth:`replicate_scores`, ``[num_subsets, num_targets]``."""
        return self.replicate_scores(
            masks, key=key, regime=regime, replicates=replicates,
            base_params=base_params, chunk_size=chunk_size, store_dir=store_dir,
            progress=progress).mean(0)

    def estimate(self, masks, *, key, settings: EstimationSettings | None = None,
                 base_params=None, chunk_size: int | None = None,
                 mesh=None, store_dir=None) -> EstimationResult:
        """First-order estimates around ``θ*`` with diagnostics.

        Args:
          masks: ``[num_subsets, num_tasks]``.
          key: ``θ*`` is :meth:`base_params` of ``key`` unless ``base_params`` is
            given; the projection uses ``fold_in(key, 1)``; linearized
            fine-tuning draws the batches of replicate 0 of
            ``retrain(..., key=key, regime="finetune")``, and so does the one
            real fine-tuning on all tasks that ``settings`` may need.
          settings: :class:`~tasksurrogate_jax.estimate.estimation.EstimationSettings`
            (default: the workload's :attr:`estimation`);
            ``preconditioner="adam"`` needs the ``finetune`` optimizer given as
            an :class:`~tasksurrogate_jax.estimate.finetune.Adam`.
          base_params: ``θ*`` to linearize around.
          chunk_size: subsets per compiled call (``None``: the estimator's
            default, ``finetune.SHARED_CHUNK_SIZE`` for the factored
            projection's shared program).
          mesh: a ``jax.sharding.Mesh`` with a ``"subsets"`` axis to split
            the chunks over (``None``: every device).
          store_dir: folder to save each finished chunk of the linearized
            fine-tuning to and resume from (``method="finetune"`` only).

        Returns:
          :class:`~tasksurrogate_jax.estimate.estimation.EstimationResult`.
        """
        masks = self.check_masks(masks)
        key = as_typed_key(key)
        settings = self.estimation if settings is None else settings
        if not isinstance(settings, EstimationSettings):
            raise TypeError("settings must be an EstimationSettings, got "
                            f"{type(settings).__name__}.")
        spec = self._require_finetune("estimation")
        if store_dir is not None and settings.method != "finetune":
            raise ValueError("store_dir needs settings.method='finetune' (the convex "
                             f"solve keeps no store), got {settings.method!r}.")
        params = self.base_params(key=key) if base_params is None else base_params
        reference = None
        if settings.needs_reference_run:
            reference = self.retrain(np.ones((1, self.num_tasks), np.float32),
                                     key=key, regime="finetune", base_params=params,
                                     return_params=True, progress=False, mesh=mesh)
        rows = masks if not settings.difference else jnp.concatenate(
            [masks, jnp.ones((1, self.num_tasks), masks.dtype)])
        projection, output_mode, proj_dim = self._resolved_space(settings, params)
        common = {"key": _projection_key(key), "proj_dim": proj_dim,
                  "output_mode": output_mode, "mesh": mesh}
        if chunk_size is not None:
            common["chunk_size"] = chunk_size
        if settings.method == "finetune":
            result = linearized_finetune_scores(
                self.apply_fn, params, self.data, self.target, rows, finetune=spec,
                batch_key=key, preconditioner=settings.preconditioner,
                projection=projection, batch_orders=settings.batch_orders,
                linearization_points=settings.linearization_points,
                store_dir=store_dir,
                store_config=None if store_dir is None else {
                    **self.store_config("finetune"),
                    "batch_orders": settings.batch_orders},
                **common)
        else:
            norm = None
            if settings.ridge == "auto":
                tuned = jax.tree.map(lambda leaf: leaf[0, 0], reference.params)
                norm = float(otu.tree_norm(otu.tree_sub(tuned, params)))
            result = estimate_scores(self.apply_fn, params, self.data, self.target,
                                     rows, ridge=settings.ridge,
                                     reference_update_norm=norm, **common)
        if not settings.difference:
            return result
        m = masks.shape[0]
        scores = difference_form(result.scores[:m], result.scores[m],
                                 reference.losses[0, 0])
        return result._replace(
            scores=scores, delta_norm=result.delta_norm[:m],
            grad_norm=None if result.grad_norm is None else result.grad_norm[:m],
            iterations=None if result.iterations is None else result.iterations[:m])

    def estimated_scores(self, masks, *, key,
                         settings: EstimationSettings | None = None,
                         base_params=None) -> jax.Array:
        """Estimated target losses ``[num_subsets, num_targets]`` (see
        :meth:`estimate`)."""
        return self.estimate(masks, key=key, settings=settings,
                             base_params=base_params).scores

    def estimation_record(self, base_params) -> dict:
        """The :attr:`estimation` settings (JSON), ``projection`` and
        ``proj_dim`` resolved for ``base_params`` (``proj_dim``: an int, or
        ``"full"``)."""
        projection, output_mode, proj_dim = self._resolved_space(self.estimation,
                                                                 base_params)
        return {**dataclasses.asdict(self.estimation), "projection": projection,
                "output_mode": output_mode,
                "proj_dim": "full" if proj_dim is None else proj_dim}

    def _resolved_space(self, settings: EstimationSettings, params):
        """``(projection, output_mode, proj_dim)`` of ``settings`` for this
        model at ``params``: ``"dense"`` or ``"factored"`` (Kronecker-factored
        per dense layer, :mod:`tasksurrogate_jax.estimate.factored`),
        ``"logits"`` or ``"margin"`` (margins only for the softmax
        cross-entropy), and d or ``None`` (full)."""
        projection = (settings.resolved_projection(self.apply_fn, params,
                                                   self.data.inputs)
                      if settings.method == "finetune" else "dense")
        output_mode = settings.resolved_output_mode(
            projection, classification=self.loss_fn is softmax_cross_entropy)
        return projection, output_mode, settings.resolved_proj_dim(
            num_parameters(params), projection, output_mode=output_mode)

    def baseline_scores(self, base_params, *, names: tuple[str, ...], key,
                        settings: baseline_methods.BaselineSettings,
                        ) -> tuple[dict, dict]:
        """Influence functions, TracIn and TRAK at ``θ*`` (those in ``names``):
        ``({name: [num_tasks, num_targets]}, {name: settings used})`` (see
        :meth:`~tasksurrogate_jax.workloads.base.LeaveOneOutWorkload.
        baseline_scores` and :mod:`tasksurrogate_jax.estimate.baselines`)."""
        return baseline_methods.compute_baselines(
            self.apply_fn, base_params, self.data, self.target, names=names,
            key=key, settings=settings, loss_fn=self.loss_fn)

    def accuracy(self, params) -> jax.Array:
        """Mean target accuracy of one set of parameters (integer labels)."""
        outputs = self.apply_fn(params, self.target.inputs)
        return argmax_accuracy(outputs, self.target.labels).mean()


def _cast(data: TaskData, target: TargetData, init_fn: Callable, precision: str):
    """Data, target and ``init_fn`` with floating arrays in ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "precision='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or call "
            "jax.config.update('jax_enable_x64', True)) before building the "
            "workload.")
    dtype = jnp.dtype(precision)

    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def cast_init(key):
        return jax.tree.map(cast, init_fn(key))

    data = dataclasses.replace(data, inputs=cast(data.inputs), labels=cast(data.labels))
    target = dataclasses.replace(target, inputs=cast(target.inputs),
                                 labels=cast(target.labels))
    return data, target, cast_init


def _check_model(apply_fn, init_fn, data: TaskData) -> None:
    """Parameters must be a pytree of arrays, and outputs match the labels."""
    try:
        params = jax.eval_shape(init_fn, jax.random.key(0))
    except Exception as err:  # noqa: BLE001 - report what the user's code raised
        raise TypeError(f"init_fn(key) failed: {err}") from err
    leaves = jax.tree.leaves(params)
    if not leaves or not all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        kinds = sorted({type(x).__name__ for x in leaves}) or ["no leaves"]
        raise TypeError(
            "init_fn(key) must return a pytree of arrays (the parameters), got "
            f"leaves of type {kinds}.")
    try:
        outputs = jax.eval_shape(apply_fn, params, data.inputs[:2])
    except Exception as err:  # noqa: BLE001
        raise TypeError(
            f"apply_fn(params, inputs[:2]) failed on the data's inputs of shape "
            f"{tuple(data.inputs.shape[1:])} per example: {err}") from err
    if data.num_classes is not None:
        expected = (2, data.num_classes)
        what = f"[batch, num_classes={data.num_classes}] logits"
    else:
        expected = (2, *data.labels.shape[1:])
        what = f"outputs shaped like the labels, {expected}"
    if tuple(outputs.shape) != expected:
        raise ValueError(
            f"apply_fn returns outputs of shape {tuple(outputs.shape)} for 2 "
            f"examples; the labels need {what}.")


__all__ = ["PRECISIONS", "REGIMES", "SupervisedWorkload", "TrainSettings",
           "check_regime", "nnx_model_functions"]
