"""Gradient-based task attribution baselines at ``θ*``: influence, TracIn, TRAK.

One module each, on a shared one (every public name is also importable from
here):

- :mod:`~tasksurrogate_jax.estimate.baselines.influence`: influence functions
  (:func:`influence_scores`, :func:`influence_damping`; Hessian- or
  Gauss-Newton-vector products, :func:`conjugate_gradients`, or a dense
  solve).
- :mod:`~tasksurrogate_jax.estimate.baselines.tracin`: TracIn
  (:func:`tracin_scores`).
- :mod:`~tasksurrogate_jax.estimate.baselines.trak`: TRAK
  (:func:`trak_scores`, :func:`trak_proj_dim`).
- :mod:`~tasksurrogate_jax.estimate.baselines.common`: what they share: the
  input checks, the power iteration of the ``"auto"`` damping
  (:func:`top_eigenvalue`), task gradient sums and target gradients over
  chunks of training examples.

This module combines them (:func:`compute_baselines`, its
:class:`BaselineSettings`).

**Convention (all three).** Each function returns ``scores`` ``[num_tasks,
num_targets]``; ``scores[i, t]`` predicts, to first order, the leave-one-out
effect ``F(1 − e_i)_t − F(1)_t`` of task i on target t's loss. Positive = removing
the task raises the target loss = the task *helps* the target. These are the
sign and units of the surrogate read-out ``ĝ(s* − e_i) − ĝ(s*)``, so they can be
correlated with true LOO effects directly (``metrics.loo_correlation``).

**The objective they linearize** is the training loss of ``truth/retraining.py``. With
task weights ``s ∈ R^K`` (a mask), example weights ``ω_n = s_{task(n)}`` (0 for
padding), task sums ``G_k(θ) = Σ_{n ∈ task k} ℓ_n(θ)`` and task sizes ``N_k``:

    L(θ; s) = Σ_n ω_n ℓ_n(θ) / W(s) = Σ_k s_k G_k(θ) / W(s),  W(s) = Σ_k s_k N_k,

plus a regulariser ``R(θ)`` that does not depend on ``s`` (none, or an L2 penalty),
whose Hessian the damping ``λ`` stands for. Influence differentiates ``θ*(s)``
in ``s_i`` (its module derives the formula); TracIn takes task i's share of a
gradient step; TRAK replaces the Hessian by a kernel of projected features.

**Defaults** (``benchmarks/bench_defaults.py`` measures them against
leave-one-out fine-tuning; none of them looks at a ground truth): the damping
of both influence and TRAK is ``"auto"``, ``DAMPING_FRACTION`` (0.05) × the
largest eigenvalue of the matrix it damps (the Gauss-Newton matrix, the
default curvature of influence, or ``ΦᵀΦ``), found by power iteration; TRAK's
projection dimension is ``"auto"``, ``min(p, 8 · n·C_h, 8192)`` (no
projection when that is p). Conjugate gradients that stop above
``cg_max_residual`` raise. ``return_info=True`` returns what was used
(:class:`InfluenceInfo`, :class:`TrakInfo`), so a report can show it;
:func:`influence_damping` and :func:`trak_proj_dim` compute the rules alone.

The public functions check their (concrete) arguments, then run one jitted
program (one per checkpoint for TracIn); call them outside ``jit``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import TargetData, TaskData
from tasksurrogate_jax.estimate.baselines.common import (
    AUTO,
    DAMPING_FRACTION,
    EIGEN_SEED,
    POWER_MAX_ITER,
    POWER_TOL,
    is_number,
    top_eigenvalue,
)
from tasksurrogate_jax.estimate.baselines.influence import (
    CG_MAX_RESIDUAL,
    HESSIANS,
    SOLVERS,
    InfluenceInfo,
    conjugate_gradients,
    influence_damping,
    influence_scores,
)
from tasksurrogate_jax.estimate.baselines.tracin import tracin_scores
from tasksurrogate_jax.estimate.baselines.trak import (
    PROJ_DIM_MAX,
    PROJ_DIM_PER_FEATURE,
    TRAK_FEATURES,
    TrakInfo,
    trak_proj_dim,
    trak_scores,
)
from tasksurrogate_jax.losses import softmax_cross_entropy

BASELINES = ("influence", "tracin", "trak")


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
    """The settings of :func:`compute_baselines` (validated when built).

    Attributes:
      influence_damping: λ of influence, a number >= 0 or ``"auto"``
        (:func:`influence_damping`).
      influence_hessian: one of :data:`HESSIANS`.
      trak_proj_dim: d of TRAK's features: an int, ``"full"`` (no projection)
        or ``"auto"`` (:func:`trak_proj_dim`).
    """

    influence_damping: float | str = AUTO
    influence_hessian: str = "gauss_newton"
    trak_proj_dim: int | str = AUTO

    def __post_init__(self):
        damping = self.influence_damping
        if damping != AUTO and not (is_number(damping) and math.isfinite(damping)
                                    and damping >= 0):
            raise ValueError("influence_damping must be 'auto' or a finite number "
                             f">= 0, got {damping!r}.")
        if self.influence_hessian not in HESSIANS:
            raise ValueError(f"influence_hessian must be one of {HESSIANS}, got "
                             f"{self.influence_hessian!r}.")
        if self.trak_proj_dim not in (AUTO, "full"):
            if isinstance(self.trak_proj_dim, str):
                raise ValueError("trak_proj_dim must be a positive int, 'auto' or "
                                 f"'full', got {self.trak_proj_dim!r}.")
            check_positive_int(self.trak_proj_dim, "trak_proj_dim")


def compute_baselines(
    apply_fn: Callable, params, data: TaskData, target: TargetData, *,
    names: Sequence[str], key, settings: BaselineSettings,
    loss_fn: Callable = softmax_cross_entropy,
) -> tuple[dict, dict]:
    """The baselines in ``names`` (among :data:`BASELINES`) at ``θ*``.

    Args:
      apply_fn, params, data, target, loss_fn: as for :func:`influence_scores`.
      names: which baselines.
      key: TRAK's projection.
      settings: :class:`BaselineSettings`.

    Returns:
      ``({name: [K, T] scores}, {name: JSON of the settings used})``
      (influence's :class:`InfluenceInfo` and TRAK's :class:`TrakInfo`).
    """
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"names must be among {BASELINES}, got {unknown}.")
    if not isinstance(settings, BaselineSettings):
        raise TypeError("settings must be a BaselineSettings, got "
                        f"{type(settings).__name__}.")
    scores, used = {}, {}
    if "influence" in names:
        scores["influence"], info = influence_scores(
            apply_fn, params, data, target, loss_fn=loss_fn,
            damping=settings.influence_damping, hessian=settings.influence_hessian,
            return_info=True)
        used["influence"] = info._asdict()
    if "tracin" in names:
        scores["tracin"] = tracin_scores(apply_fn, [params], data, target,
                                         loss_fn=loss_fn)
    if "trak" in names:
        proj_dim = None if settings.trak_proj_dim == "full" else settings.trak_proj_dim
        scores["trak"], info = trak_scores(
            apply_fn, params, data, target, key=key, proj_dim=proj_dim,
            loss_fn=loss_fn, return_info=True)
        used["trak"] = info._asdict()
    return scores, used


__all__ = [
    "AUTO",
    "BASELINES",
    "CG_MAX_RESIDUAL",
    "DAMPING_FRACTION",
    "EIGEN_SEED",
    "HESSIANS",
    "POWER_MAX_ITER",
    "POWER_TOL",
    "PROJ_DIM_MAX",
    "PROJ_DIM_PER_FEATURE",
    "SOLVERS",
    "TRAK_FEATURES",
    "BaselineSettings",
    "InfluenceInfo",
    "TrakInfo",
    "compute_baselines",
    "conjugate_gradients",
    "influence_damping",
    "influence_scores",
    "top_eigenvalue",
    "tracin_scores",
    "trak_proj_dim",
    "trak_scores",
]
