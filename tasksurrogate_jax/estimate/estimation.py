"""Subset scores without retraining: first-order estimates ``F̂(s)`` around
``θ*``, and the settings that choose how.

The estimate runs on the linearized model at ``θ*``
(:mod:`~tasksurrogate_jax.estimate.features`), by one of two estimators, all
subsets vmapped:

- **linearized fine-tuning** (:mod:`~tasksurrogate_jax.estimate.finetune`,
  the default of the workloads): the fine-tuning program itself on the
  linearized model;
- **the convex solve** (:mod:`~tasksurrogate_jax.estimate.convex`, the
  paper's estimator): each subset's loss on the linearized model, with a ridge,
  minimised to convergence.

:class:`EstimationSettings` picks the estimator, the projection (dense or
Kronecker-factored, :mod:`~tasksurrogate_jax.estimate.factored`) and its
dimension, the output mode and the batch orders, when a workload is built;
both estimators return an :class:`EstimationResult`.

``F̂(s)`` = per-target loss of the linearized model at ``ŵ_s``. The *difference
form* (:func:`difference_form`) adds the measured ``F(s*)`` of one real
fine-tuning on all tasks to ``F̂(s) − F̂(s*)``, so an error shared by every
subset cancels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import leading_rows_spec
from tasksurrogate_jax.estimate import factored
from tasksurrogate_jax.estimate.features import check_output_mode
from tasksurrogate_jax.estimate.projection import num_parameters

METHODS = ("finetune", "solve")
PROJ_DIM_CHOICES = ("auto", "full")
PROJECTIONS = ("auto", "dense", "factored")
PRECONDITIONERS = ("none", "adam")

# ``proj_dim="auto"``: the full parameter space up to this many parameters,
# else a projection to DEFAULT_PROJ_DIM (dense) or DEFAULT_FACTORED_PROJ_DIM
# of the output mode (factored: about the same cost per subset, C d; see
# EstimationSettings).
AUTO_FULL_SPACE_MAX_PARAMS = 100_000
DEFAULT_PROJ_DIM = 512
DEFAULT_FACTORED_PROJ_DIM = MappingProxyType({"logits": 4096, "margin": 32768})


def full_space_finetune(method: str, proj_dim, projection: str = "auto") -> bool:
    """Whether these settings can run linearized fine-tuning in the full
    space, where ``linearization_points`` apply (``proj_dim`` ``"full"``,
    ``None`` or ``"auto"``; not ``"factored"``)."""
    return (method == "finetune" and not isinstance(proj_dim, int)
            and projection != "factored")


@dataclasses.dataclass(frozen=True)
class EstimationSettings:
    """How a workload estimates subset scores (its ``estimate`` method).

    Attributes:
      method: ``"finetune"`` (linearized fine-tuning,
        :func:`~tasksurrogate_jax.estimate.finetune.linearized_finetune_scores`,
        mirroring the workload's fine-tuning program) or ``"solve"`` (the
        convex solve, :func:`~tasksurrogate_jax.estimate.convex.estimate_scores`).
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
        0.942 on exact scores, 30 times cheaper per subset than fine-tuning
        on a 2-core CPU (three runs: 30.4x, 29.8x, 31.0x; at d = 16,384:
        0.889); logits at
        d = 4,096 0.858.
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
      linearization_points: points of the full set's fine-tuning path the
        ``"finetune"`` method linearizes at, in the full space
        (:func:`~tasksurrogate_jax.estimate.finetune.linearized_finetune_scores`;
        ``1``: ``θ*`` only). More than one costs one real fine-tuning on all
        tasks per batch order, and pays where fine-tuning moves far from
        ``θ*`` (modular ``cpu``, ``tasksurrogate run modular --preset cpu``:
        5 points cut the median relative error from 52.7% to 8.3% and raised
        the Spearman across subsets of the mean target from 0.690 to 0.894;
        the ``modular`` workload's default in the full space).
      preconditioner: ``"none"`` (the fine-tuning optimizer runs on ``w``) or
        ``"adam"`` (Adam with its second moment fixed at ``θ*``, moved into the
        features; needs ``method="finetune"``, a ``proj_dim`` and an
        :class:`~tasksurrogate_jax.estimate.finetune.Adam` fine-tuning optimizer: see
        :func:`~tasksurrogate_jax.estimate.finetune.linearized_finetune_scores`).
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
    linearization_points: int = 1

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
            check_output_mode(self.output_mode)
        if full and self.output_mode == "margin":
            raise ValueError(f"output_mode={self.output_mode!r} needs a projection: "
                             "set proj_dim to an int or 'auto'.")
        check_preconditioner(self.preconditioner, None if full else self.proj_dim)
        if self.preconditioner != "none" and self.method != "finetune":
            raise ValueError(
                f"preconditioner={self.preconditioner!r} needs method='finetune' "
                f"(it preconditions the fine-tuning program), got {self.method!r}.")
        # Checked whatever the method: a bad value is never silently kept.
        check_ridge(self.ridge, 1.0,
                     None if full and self.method == "solve" else 1)
        if not isinstance(self.difference, bool):
            raise TypeError(f"difference must be a bool, got {self.difference!r}.")
        check_positive_int(self.batch_orders, "batch_orders")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got "
                             f"{self.projection!r}.")
        if self.projection == "factored":
            check_factored(self.method, full, self.preconditioner)
        check_positive_int(self.linearization_points, "linearization_points")
        if self.linearization_points > 1 and not full_space_finetune(
                self.method, self.proj_dim, self.projection):
            raise ValueError(
                f"linearization_points={self.linearization_points} needs "
                "method='finetune' in the full space (proj_dim 'full' or "
                f"'auto'), got method={self.method!r}, proj_dim={self.proj_dim!r}, "
                f"projection={self.projection!r}.")

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
        try:
            structure = factored.find_dense_layers(apply_fn, params, inputs)
        except ValueError:  # a parameter outside a dense layer
            return "dense"
        return "factored" if structure.num_params == num_params else "dense"

    @property
    def needs_reference_run(self) -> bool:
        """Whether one real fine-tuning on all tasks is needed."""
        return self.difference or (self.method == "solve" and self.ridge == "auto")


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


def check_preconditioner(preconditioner, proj_dim):
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got "
                         f"{preconditioner!r}.")
    if preconditioner != "none" and proj_dim is None:
        raise ValueError(
            f"preconditioner={preconditioner!r} needs a projection (proj_dim): "
            "with proj_dim=None the fine-tuning optimizer runs on θ itself.")


def check_factored(method, full, preconditioner):
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


def check_ridge(ridge, reference_update_norm, proj_dim) -> bool:
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


def check_params_structure(apply_fn, params, data):
    try:
        jax.eval_shape(apply_fn, params, leading_rows_spec(data.inputs))
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            "params do not match the model: apply_fn(params, inputs) failed with "
            f"{type(err).__name__}: {err}"
        ) from err
