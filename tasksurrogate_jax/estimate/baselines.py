"""Gradient-based task attribution baselines at ``θ*``: influence, TracIn, TRAK.

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
whose Hessian the damping ``λ`` stands for. ``θ*(s)`` solves
``∇L(θ; s) + ∇R(θ) = 0``; differentiating in ``s_i`` at ``s = 1`` (the 1/W(s)
normalisation contributes the centring term):

    ∂/∂s_i ∇L = g_i := (∇G_i(θ*) − N_i ∇L(θ*)) / W,   W = W(1),
    dθ*/ds_i = −(H + λI)^{-1} g_i,                    H = ∇²L(θ*; 1),

so removing task i (``s_i``: 1 → 0) moves ``θ*`` by ``(H + λI)^{-1} g_i`` and

    influence[i, t] = −dF_t/ds_i = ∇ℓ_t(θ*)ᵀ (H + λI)^{-1} g_i.

This is ``−I_i`` of the influence formula (docs/method.md, baselines) with
``∇L_task_i = g_i``: task i's share of the training-loss gradient (its
gradient *sum* over ``W``, not its mean). The centring ``N_i ∇L(θ*)``
vanishes at a stationary point of ``L`` (``R = 0``, λ only numerical damping)
and is exact when ``θ*`` minimises ``L + λ/2 ||θ||²``.
The true LOO effect differs by the second-order term of
``F(1 − ε e_i) − F(1) = −ε dF/ds_i + ½ ε² d²F/ds_i² + O(ε³)`` at ``ε = 1``; it is
large when task i is a large share of the data or interacts with other tasks.

**TracIn** (the classic, uncentred form): ``Σ_c η_c ∇ℓ_t(θ_c)ᵀ ∇G_i(θ_c) / W``,
task i's first-order share of a full-batch gradient step ``−η_c ∇L`` at each
checkpoint ``θ_c``.

**TRAK** replaces ``H`` by a kernel of projected Jacobians ``Φ_n = J_h(x_n) P``
(``[C_h, d]``) of a per-example output ``h`` (no Hessian), with loss gradients on
both sides, ``ψ_n = Φ_nᵀ ∂ℓ_n/∂h_n = Pᵀ∇ℓ_n`` (chain rule):

    trak[i, t] = ψ_tᵀ (Σ_n ω_n Φ_nᵀ Φ_n + λI)^{-1} Σ_{n ∈ task i} ψ_n,

the influence formula with ``H ≈ Σ ω_n Φ_nᵀΦ_n / W`` (so this λ is ``W`` times an
influence damping; the gradients are not centred). ``features`` picks ``h``:

- ``"margin"`` (TRAK's choice; softmax cross-entropy, integer labels): the
  correct-class margin ``m = z_y − logsumexp(z_{-y})``; ``ℓ = softplus(−m)``, so
  ``ψ_n = −q_n φ_n`` with TRAK's ``q_n = σ(−m_n) = 1 − p_n``.
- ``"outputs"``: the model outputs ``[C]`` (any ``loss_fn``); the kernel is the
  Gauss-Newton matrix with ``∇²_f ℓ`` replaced by ``I`` (the Gauss-Newton matrix
  itself for squared error: then, unprojected, TRAK is influence up to centring).
- ``"loss"``: ``h = ℓ``, ``ψ = φ`` (the projected empirical Fisher; any loss).

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

Memory: ``[K, p]`` task gradients and ``[T, p]`` target gradients (p parameters)
for influence and TracIn, accumulated over chunks of ``batch_size`` training
examples (never ``[n, p]``); ``[n, C_h, d]`` features for TRAK. ``solver="dense"``
builds the ``[p, p]`` Hessian: small models only. The public functions check
their (concrete) arguments, then run one jitted program (one per checkpoint for
TracIn); call them outside ``jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import (
    TargetData,
    TaskData,
    check_target_matches,
    leading_rows_spec,
)
from tasksurrogate_jax.estimate.linearize import (
    per_example_grads,
    per_task_sums,
    projected_jacobians,
)
from tasksurrogate_jax.estimate.projection import KINDS as PROJECTION_KINDS
from tasksurrogate_jax.estimate.projection import (
    make_projection,
    num_parameters,
    ravel_rows,
)
from tasksurrogate_jax.losses import margin, softmax_cross_entropy
from tasksurrogate_jax.truth.chunking import chunked_vmap

BASELINES = ("influence", "tracin", "trak")
HESSIANS = ("exact", "gauss_newton")
SOLVERS = ("cg", "dense")
TRAK_FEATURES = ("margin", "outputs", "loss")
AUTO = "auto"
# damping="auto" (influence and TRAK): λ = DAMPING_FRACTION × the largest
# eigenvalue of the matrix damped (see influence_scores for why).
DAMPING_FRACTION = 0.05
# The largest relative CG residual accepted by default; above it influence raises.
CG_MAX_RESIDUAL = 1e-2
# Power iteration for the largest eigenvalue: fixed start, at most
# POWER_MAX_ITER matrix-vector products, stopping once the Rayleigh quotient
# changes by less than POWER_TOL (relative).
EIGEN_SEED = 0
POWER_MAX_ITER = 100
POWER_TOL = 1e-4
# proj_dim="auto" (TRAK): d = min(p, PROJ_DIM_PER_FEATURE × n·C_h, PROJ_DIM_MAX).
PROJ_DIM_PER_FEATURE = 8
PROJ_DIM_MAX = 8192


class InfluenceInfo(NamedTuple):
    """What :func:`influence_scores` used (``return_info=True``), for a report.

    Attributes:
      damping: the λ added to the curvature.
      damping_rule: ``"auto"`` (``DAMPING_FRACTION × top_eigenvalue``) or
        ``"given"`` (a number was passed).
      top_eigenvalue: the largest eigenvalue (in magnitude) of the curvature
        used, by power iteration (``None`` when the damping was given).
      hessian: ``"gauss_newton"`` or ``"exact"``.
      cg_residual: the largest relative residual ``||r|| / ||b||`` of the
        solves (0 for ``solver="dense"``).
    """

    damping: float
    damping_rule: str
    top_eigenvalue: float | None
    hessian: str
    cg_residual: float


class TrakInfo(NamedTuple):
    """What :func:`trak_scores` used (``return_info=True``), for a report.

    Attributes:
      proj_dim: d, or ``None`` (no projection: d is the number of parameters).
      proj_dim_rule: ``"auto"`` (:func:`trak_proj_dim`) or ``"given"``.
      damping: the λ added to ``ΦᵀΦ``.
      damping_rule: ``"auto"`` (``DAMPING_FRACTION × top_eigenvalue``) or
        ``"given"``.
      top_eigenvalue: the largest eigenvalue of ``ΦᵀΦ`` (power iteration;
        always computed, it costs ``POWER_MAX_ITER`` products with a
        ``[d, d]`` matrix at most).
      num_features: ``n · C_h``, training examples times the outputs h of each
        (the rank bound of ``ΦᵀΦ``).
    """

    proj_dim: int | None
    proj_dim_rule: str
    damping: float
    damping_rule: str
    top_eigenvalue: float
    num_features: int


# ---------------------------------------------------------------------------
# Public functions.


def influence_scores(
    apply_fn: Callable, params, data: TaskData, target: TargetData, *,
    loss_fn: Callable = softmax_cross_entropy, damping: float | str = AUTO,
    hessian: str = "gauss_newton", solver: str = "cg", cg_max_iter: int = 100,
    cg_tol: float = 1e-6, cg_max_residual: float = CG_MAX_RESIDUAL,
    batch_size: int | None = None, return_info: bool = False,
):
    """Task-level influence functions ``∇ℓ_tᵀ (H + λI)^{-1} g_i`` (module doc).

    One linear solve per task or per target, whichever are fewer (the
    right-hand sides of the smaller side, solved together).

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs[b, ...]``.
      params: ``θ*``, trained on all tasks.
      data: the training data (padding rows are ignored).
      target: the target examples (one score column each).
      loss_fn: per-example loss ``(outputs, labels) -> [b]``: the training loss
        and the target score.
      damping: λ ≥ 0 added to the curvature, or ``"auto"`` (default): λ =
        ``DAMPING_FRACTION`` (0.05) × the largest eigenvalue of H
        (:func:`influence_damping`), from θ* and the training data only.
        Why the *largest* eigenvalue: λ must be on the scale of H's spectrum,
        and then ``H + λI`` has a condition number of at most ``1 + 1/0.05 =
        21``, so CG converges in tens of iterations (float32 included); the
        directions whose curvature is above λ are inverted nearly exactly and
        the flat ones, where the quadratic model of the loss is least
        reliable and a finite fine-tuning barely moves, are damped. Measured
        against leave-one-out fine-tuning (``benchmarks/bench_defaults.py``):
        within 0.05 of the best λ of a grid on digits and breast cancer. A
        fraction (0.1, kronfluence's heuristic) of the *mean* eigenvalue
        ``trace(H)/p`` was 0.4-0.5 below the best there: the mean falls as
        1/p with parameters that carry little curvature (a 4× wider MLP moved
        it 10× while the best λ stayed put). Neither knows the question,
        though: the best λ for a fine-tuning ground truth is about ``1/(η·T)``
        for T steps of SGD at rate η (the directions that fine-tuning
        resolves), and this rule assumes ``η·T·λ_max ≈ 20``; where the fit is
        confident and ``λ_max`` small it damps too little (0.2 below the best
        with 359 digits, where ``1/(η·T)`` was 0.01 below). Pass a number
        when you know the fine-tuning.
      hessian: ``"gauss_newton"`` (default; ``Σ ω_n J_nᵀ ∇²_f ℓ_n J_n / W``,
        positive semi-definite for convex losses, so ``H + λI`` is positive
        definite for any λ > 0 and CG is safe; what the pipeline uses) or
        ``"exact"`` (``∇²L``; may be indefinite for non-convex models: use
        enough damping).
      solver: ``"cg"`` (Hessian-vector products, conjugate gradients vmapped over
        right-hand sides; needs ``H + λI`` positive definite) or ``"dense"``
        (builds the ``[p, p]`` matrix and solves exactly; small models).
      cg_max_iter: CG iteration cap.
      cg_tol: CG relative residual tolerance (``||r|| <= cg_tol ||b||``); CG
        returns its best iterate (see :func:`conjugate_gradients`).
      cg_max_residual: the largest relative residual accepted (default
        ``CG_MAX_RESIDUAL`` = 1e-2): CG stopping above it (iteration cap,
        float32 breakdown, an indefinite matrix) is an error, since the
        scores would not solve the system. ``math.inf`` accepts any residual
        (read it off ``return_info=True``).
      batch_size: training / target examples per chunk.
      return_info: also return an :class:`InfluenceInfo` (λ, its rule, the
        largest eigenvalue, the CG residual).

    Returns:
      ``[num_tasks, num_targets]`` first-order LOO effects (positive = helps);
      with ``return_info``, ``(scores, InfluenceInfo)``.

    Raises:
      RuntimeError: CG stopped above ``cg_max_residual``.
    """
    _check_common(apply_fn, params, data, target, loss_fn, batch_size)
    auto = _is_auto(damping, "damping")
    if not auto:
        damping = _check_damping(damping)
    _check_hessian(hessian)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    cg_max_iter = check_positive_int(cg_max_iter, "cg_max_iter")
    if not _is_number(cg_tol) or not (math.isfinite(cg_tol) and cg_tol > 0):
        raise ValueError(f"cg_tol must be a positive number, got {cg_tol!r}.")
    if not _is_number(cg_max_residual) or not cg_max_residual > 0:
        raise ValueError(
            f"cg_max_residual must be a positive number, got {cg_max_residual!r}.")
    top = None
    if auto:
        top = _top_curvature(apply_fn, loss_fn, params, data, hessian, batch_size)
        damping = DAMPING_FRACTION * top
    scores, residual = _influence(apply_fn, loss_fn, params, data, target, damping,
                                  float(cg_tol), hessian=hessian, solver=solver,
                                  cg_max_iter=cg_max_iter, batch_size=batch_size)
    residual = float(residual)
    if not residual <= cg_max_residual:
        raise RuntimeError(
            f"conjugate gradients stopped at a relative residual of {residual:.3g} "
            f"(> cg_max_residual={cg_max_residual:g}) within cg_max_iter="
            f"{cg_max_iter}, with hessian={hessian!r} and damping={damping:.3g}: "
            "the influence scores would not solve (H + λI) x = g. Increase the "
            f"damping (damping='auto' is {DAMPING_FRACTION} × the largest "
            "eigenvalue of H), use hessian='gauss_newton' (positive "
            "semi-definite), raise cg_max_iter, use solver='dense' on a small "
            "model or float64 (jax_enable_x64); cg_max_residual=math.inf accepts "
            "approximate scores (return_info=True reports the residual).")
    scores = _check_finite(scores, "influence scores",
                           "increase damping, or use hessian='gauss_newton'")
    if not return_info:
        return scores
    return scores, InfluenceInfo(
        damping=float(damping), damping_rule="auto" if auto else "given",
        top_eigenvalue=top, hessian=hessian, cg_residual=residual)


def influence_damping(
    apply_fn: Callable, params, data: TaskData, *,
    loss_fn: Callable = softmax_cross_entropy, hessian: str = "gauss_newton",
    batch_size: int | None = None,
) -> float:
    """The λ of ``influence_scores(..., damping="auto")``: ``DAMPING_FRACTION``
    × the largest eigenvalue of H (see :func:`influence_scores` for why).

    The eigenvalue is the Rayleigh quotient of power iteration
    (:func:`top_eigenvalue`: fixed start, at most ``POWER_MAX_ITER`` = 100
    Hessian- or Gauss-Newton-vector products, fewer once it settles to
    ``POWER_TOL``), so the same θ* and data give the same λ. For the exact
    Hessian it is the eigenvalue largest in magnitude (its absolute value).

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs[b, ...]``.
      params: ``θ*``.
      data: the training data (padding rows are ignored).
      loss_fn: per-example loss ``(outputs, labels) -> [b]``.
      hessian: ``"gauss_newton"`` or ``"exact"``, as in :func:`influence_scores`.
      batch_size: training examples per chunk.

    Returns:
      λ > 0.
    """
    _check_common(apply_fn, params, data, None, loss_fn, batch_size)
    _check_hessian(hessian)
    return DAMPING_FRACTION * _top_curvature(apply_fn, loss_fn, params, data,
                                             hessian, batch_size)


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
    _check_common(apply_fn, checkpoints[0], data, target, loss_fn, batch_size)
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
    return _check_finite(scores, "TracIn scores", "check the checkpoints")


def trak_scores(
    apply_fn: Callable, params, data: TaskData, target: TargetData, *, key=None,
    proj_dim: int | str | None = AUTO, damping: float | str = AUTO,
    features: str = "margin", projection_kind: str = "rademacher",
    loss_fn: Callable = softmax_cross_entropy, batch_size: int | None = None,
    return_info: bool = False,
):
    """TRAK at task level (module doc), per-example scores summed over tasks.

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs``; ``[b, C]``
        (logits for ``features="margin"``) unless ``features="loss"``.
      params: ``θ*``.
      data: the training data (padding rows are ignored).
      target: the target examples.
      key: PRNG key of the projection (required unless d resolves to
        ``None``).
      proj_dim: d; ``"auto"`` (default): :func:`trak_proj_dim`, ``min(p, 8 ·
        n·C_h, 8192)`` and no projection when that is p; ``None``: no
        projection (the raveled gradients, d = p).
      damping: λ ≥ 0 added to ``ΦᵀΦ``, or ``"auto"`` (default): λ =
        ``DAMPING_FRACTION`` (0.05) × the largest eigenvalue of ``ΦᵀΦ``, the
        rule of the influence damping (see :func:`influence_scores`). A fixed
        λ (the former 1e-3) is on no scale: the kernel is a sum over n
        examples, and once d nears or passes n·C_h its small eigenvalues are
        zero or projection noise that an undamped solve amplifies: that, not
        d itself, made d = 512 score near 0 and d = 64 better. With this λ a
        larger d only did better, and the default was within 0.01 of its
        grid's best on digits and breast cancer (``bench_defaults.py``); like
        the influence rule it knows nothing of the fine-tuning's length.
      features: the output ``h`` whose projected gradients form the kernel:
        ``"margin"`` (correct-class margin; softmax cross-entropy with integer
        labels), ``"outputs"`` (all model outputs) or ``"loss"`` (see the
        module doc).
      projection_kind: ``"rademacher"`` or ``"gaussian"``.
      loss_fn: per-example loss; must be ``softmax_cross_entropy`` with
        ``features="margin"``.
      batch_size: examples per chunk.
      return_info: also return a :class:`TrakInfo` (d, λ, their rules, the
        kernel's largest eigenvalue).

    Returns:
      ``[num_tasks, num_targets]`` (positive = helps); with ``return_info``,
      ``(scores, TrakInfo)``.
    """
    _check_common(apply_fn, params, data, target, loss_fn, batch_size)
    auto_damping = _is_auto(damping, "damping")
    if not auto_damping:
        damping = _check_damping(damping)
    _check_trak_features(apply_fn, params, data, loss_fn, features)
    if projection_kind not in PROJECTION_KINDS:
        raise ValueError(f"projection_kind must be one of {PROJECTION_KINDS}, got "
                         f"{projection_kind!r}.")
    auto_dim = _is_auto(proj_dim, "proj_dim", "a positive int, None")
    if auto_dim:
        proj_dim = trak_proj_dim(apply_fn, params, data, features=features)
    projection = None
    if proj_dim is not None:
        if key is None:
            raise ValueError(
                f"key is required for the projection to d={proj_dim} (or set "
                "proj_dim=None).")
        projection = make_projection(key, proj_dim, kind=projection_kind,
                                     num_params=num_parameters(params))
    scores, lam, top = _trak(
        apply_fn, loss_fn, params, data, target, projection,
        DAMPING_FRACTION if auto_damping else damping, features=features,
        relative=auto_damping, batch_size=batch_size)
    scores = _check_finite(scores, "TRAK scores", "increase damping")
    if not return_info:
        return scores
    return scores, TrakInfo(
        proj_dim=proj_dim, proj_dim_rule="auto" if auto_dim else "given",
        damping=float(lam), damping_rule="auto" if auto_damping else "given",
        top_eigenvalue=float(top),
        num_features=_num_features(apply_fn, params, data, features))


def trak_proj_dim(apply_fn: Callable, params, data: TaskData, *,
                  features: str = "margin") -> int | None:
    """The d of ``trak_scores(..., proj_dim="auto")``: ``min(p,
    PROJ_DIM_PER_FEATURE · n·C_h, PROJ_DIM_MAX)`` = ``min(p, 8 n C_h, 8192)``,
    and ``None`` (no projection) when that is p.

    Why: with the damping on the kernel's scale (``damping="auto"``), a
    larger d only did better (the projection adds noise to an exact
    computation, and ``d = p`` is exact), so the rule takes the largest d
    that still pays: ``ΦᵀΦ`` has rank at most ``n·C_h`` (n training examples,
    C_h outputs h each), and past about 8× that the projection preserves
    the span of the features well (measured on digits with n = 359, p =
    4810, 3 projection keys: LOO Spearman 0.03 below no projection at d =
    8 n, 0.04 at 4 n, 0.13 at n). The cap of 8192 bounds the ``[d, d]``
    kernel (256 MiB in float32) and its solve. ``d = p`` needs no
    projection at all (and no key).

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs``.
      params: ``θ*`` (its number of parameters p).
      data: the training data (its number of examples n, padding excluded).
      features: ``"margin"`` or ``"loss"`` (C_h = 1) or ``"outputs"`` (C_h = C).

    Returns:
      d, or ``None`` (no projection).
    """
    if features not in TRAK_FEATURES:
        raise ValueError(f"features must be one of {TRAK_FEATURES}, got {features!r}.")
    p = num_parameters(params)
    d = min(p, PROJ_DIM_PER_FEATURE * _num_features(apply_fn, params, data, features),
            PROJ_DIM_MAX)
    return None if d >= p else d


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
        if damping != AUTO and not (_is_number(damping) and math.isfinite(damping)
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


def _num_features(apply_fn, params, data, features) -> int:
    """``n · C_h``: training examples times the outputs h of each."""
    n = int(np.sum(np.asarray(data.task_ids) >= 0))
    if features != "outputs":
        return n
    out = jax.eval_shape(apply_fn, params, leading_rows_spec(data.inputs))
    return n * math.prod(out.shape[1:])


# ---------------------------------------------------------------------------
# Jitted cores.


def _example_loss(apply_fn, loss_fn):
    """``(params, x, y) -> scalar`` loss of one example."""
    return lambda p, x, y: loss_fn(apply_fn(p, x[None]), y[None])[0]


def _chunk(x, batch_size, fill=None):
    """``[n, ...]`` -> ``[num_chunks, batch_size, ...]``, padding the last chunk
    with copies of row 0 (or ``fill``)."""
    n = x.shape[0]
    size = n if batch_size is None else min(batch_size, n)
    num = -(-n // size)
    extra = num * size - n
    if extra:
        pad = (jnp.repeat(x[:1], extra, axis=0) if fill is None
               else jnp.full((extra,) + x.shape[1:], fill, x.dtype))
        x = jnp.concatenate([x, pad])
    return x.reshape((num, size) + x.shape[1:])


def _training_chunks(data: TaskData, dtype, batch_size):
    """``(inputs, labels, task_ids, weights)`` chunked; padding rows have id
    ``-1`` and weight 0."""
    weights = (data.task_ids >= 0).astype(dtype)
    return (_chunk(data.inputs, batch_size), _chunk(data.labels, batch_size),
            _chunk(data.task_ids, batch_size, -1), _chunk(weights, batch_size, 0))


def _scan_sum(fn, chunks):
    """``Σ_c fn(*chunk_c)`` over the leading axis of ``chunks`` (one ``lax.scan``)."""
    first = jax.tree_util.tree_map(lambda a: a[0], chunks)
    if jax.tree_util.tree_leaves(chunks)[0].shape[0] == 1:
        return fn(*first)
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  jax.eval_shape(fn, *first))

    def step(acc, chunk):
        return jax.tree_util.tree_map(jnp.add, acc, fn(*chunk)), None

    return jax.lax.scan(step, init, chunks)[0]


def _task_gradient_sums(apply_fn, loss_fn, params, data, chunks):
    """Task gradient sums ``∇G_k`` ``[K, p]``.

    A task's sum is the gradient of its summed loss: ``K`` backward passes per
    chunk (vmapped), never the ``[chunk, p]`` per-example gradients, whose
    memory grows with the chunk times ``p`` (6 GB for 1,437 digits and a
    1.1M-parameter MLP in one chunk).
    """

    def chunk_task_sums(x, y, ids, w):
        del w  # padding rows have id -1: a zero row of the one-hot
        members = jax.nn.one_hot(ids, data.num_tasks, dtype=_dtype(params)).T

        def task_sum(member):  # [b] -> [p]
            grad = jax.grad(lambda p: jnp.sum(member * loss_fn(apply_fn(p, x), y)))
            return ravel_pytree(grad(params))[0]

        return jax.vmap(task_sum)(members)

    return _scan_sum(chunk_task_sums, chunks)


def _target_gradients(apply_fn, loss_fn, params, target, batch_size):
    """Per-target gradients ``∇ℓ_t`` ``[T, p]`` (only where ``T`` is small)."""
    return ravel_rows(per_example_grads(_example_loss(apply_fn, loss_fn), params,
                                        target.inputs, target.labels,
                                        batch_size=batch_size))


def _target_derivatives(apply_fn, loss_fn, params, target, directions):
    """``[r, T]`` directional derivatives ``∇ℓ_tᵀ v_j`` of the target losses
    along ``directions`` ``[r, p]``: one forward-mode pass per direction, never
    the ``[T, p]`` target gradients."""
    _, unravel = ravel_pytree(params)

    def along(v):
        return jax.jvp(lambda p: loss_fn(apply_fn(p, target.inputs), target.labels),
                       (params,), (unravel(v),))[1]

    return jax.vmap(along)(directions)


def _dtype(params):
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=(
    "hessian", "solver", "cg_max_iter", "batch_size"))
def _influence(apply_fn, loss_fn, params, data, target, damping, cg_tol, *,
               hessian, solver, cg_max_iter, batch_size):
    dtype = _dtype(params)
    flat, unravel = ravel_pytree(params)
    chunks = _training_chunks(data, dtype, batch_size)
    weights = (data.task_ids >= 0).astype(dtype)
    total = jnp.sum(weights)
    sizes = jax.ops.segment_sum(weights, data.task_ids, num_segments=data.num_tasks)

    task_sums = _task_gradient_sums(apply_fn, loss_fn, params, data, chunks)
    mean_grad = jnp.sum(task_sums, axis=0) / total  # ∇L(θ*)
    task_grads = (task_sums - sizes[:, None] * mean_grad) / total  # g_i

    def mean_loss(theta):
        p = unravel(theta)
        return _scan_sum(
            lambda x, y, ids, w: jnp.sum(w * loss_fn(apply_fn(p, x), y)), chunks
        ) / total

    if solver == "dense":
        if hessian == "exact":
            matrix = jax.hessian(mean_loss)(flat)
        else:
            matrix = _dense_gauss_newton(apply_fn, loss_fn, flat, unravel, chunks,
                                         total)
        matrix = matrix + damping * jnp.eye(flat.size, dtype=dtype)

        def solve(rhs):  # [r, p] -> ([r, p], [r] residuals)
            return jnp.linalg.solve(matrix, rhs.T).T, jnp.zeros(rhs.shape[0], dtype)
    else:
        if hessian == "exact":
            def hvp(v):
                return jax.jvp(jax.grad(mean_loss), (flat,), (v,))[1]
        else:
            def hvp(v):
                return _gauss_newton_vp(apply_fn, loss_fn, params, v, unravel,
                                        chunks, total)

        def one(b):
            return conjugate_gradients(lambda v: hvp(v) + damping * v, b,
                                       tol=cg_tol, max_iter=cg_max_iter)

        solve = jax.vmap(one)

    if data.num_tasks <= target.num_targets:
        solved, residuals = solve(task_grads)
        return (_target_derivatives(apply_fn, loss_fn, params, target, solved),
                jnp.max(residuals))
    solved, residuals = solve(_target_gradients(apply_fn, loss_fn, params, target,
                                                batch_size))
    return task_grads @ solved.T, jnp.max(residuals)


def conjugate_gradients(matvec: Callable, b, *, tol, max_iter: int):
    """Solves ``A x = b`` (A symmetric positive definite) by conjugate gradients,
    robust to float32 breakdown.

    Stops when the residual is below ``tol * ||b||``, after ``max_iter`` steps,
    or on breakdown (``pᵀAp ≤ 0`` or a non-finite value, which rounding produces
    on ill-conditioned systems once the iterates stop improving), and returns the
    iterate with the smallest residual seen, never a diverged one.

    Returns:
      ``(x, relative_residual)``: ``[p]`` and the scalar ``||r|| / ||b||`` of
      the returned iterate (from the CG recurrence).
    """
    b_norm2 = jnp.vdot(b, b)
    stop2 = (tol ** 2) * b_norm2

    def cond(state):
        k, _, _, _, rs, _, _, broken = state
        return (k < max_iter) & ~broken & (rs > stop2)

    def body(state):
        k, x, r, p, rs, best_x, best_rs, _ = state
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        ok = jnp.isfinite(pap) & (pap > 0)
        alpha = rs / jnp.where(ok, pap, 1.0)
        x_new = x + alpha * p
        r_new = r - alpha * ap
        rs_new = jnp.vdot(r_new, r_new)
        ok = ok & jnp.isfinite(rs_new)
        better = ok & (rs_new < best_rs)
        best_x = jnp.where(better, x_new, best_x)
        best_rs = jnp.where(better, rs_new, best_rs)
        p_new = r_new + (rs_new / jnp.where(ok, rs, 1.0)) * p
        return (k + 1, x_new, r_new, p_new, rs_new, best_x, best_rs, ~ok)

    zeros = jnp.zeros_like(b)
    state = (0, zeros, b, b, b_norm2, zeros, b_norm2, jnp.asarray(False))
    state = jax.lax.while_loop(cond, body, state)
    best_x, best_rs = state[5], state[6]
    return best_x, jnp.sqrt(best_rs / jnp.where(b_norm2 > 0, b_norm2, 1.0))


def top_eigenvalue(matvec: Callable, dim: int, dtype, *,
                   max_iter: int = POWER_MAX_ITER, tol: float = POWER_TOL):
    """The eigenvalue largest in magnitude of a symmetric ``[dim, dim]``
    operator, by power iteration from a fixed start (``EIGEN_SEED``).

    Returns the Rayleigh quotient ``vᵀ A v`` of the last unit iterate, after
    ``max_iter`` products or once it changes by less than ``tol`` (relative).
    It approaches the eigenvalue from below in magnitude, at the rate
    ``(λ_2 / λ_1)²`` per step. Jittable (``max_iter`` static).
    """
    # Drawn in float32 whatever dtype: the same start with 64-bit JAX on or off.
    v = jax.random.normal(jax.random.key(EIGEN_SEED), (dim,), jnp.float32).astype(
        dtype)
    v = v / jnp.linalg.norm(v)

    def cond(state):
        k, _, value, previous = state
        return (k < max_iter) & ((k < 2) | (jnp.abs(value - previous)
                                            > tol * jnp.abs(value)))

    def body(state):
        k, v, value, _ = state
        w = matvec(v)
        norm = jnp.linalg.norm(w)
        new_v = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v)
        return k + 1, new_v, jnp.vdot(v, w), value

    zero = jnp.zeros((), dtype)
    return jax.lax.while_loop(cond, body, (0, v, zero, zero))[2]


def _gauss_newton_vp(apply_fn, loss_fn, params, v, unravel, chunks, total):
    """``G v`` with ``G = Σ_n ω_n J_nᵀ ∇²_f ℓ_n J_n / W`` (jvp, output HVP, vjp)."""
    tangent = unravel(v)

    def chunk_fn(x, y, ids, w):
        def model(p):
            return apply_fn(p, x)

        outputs, jv = jax.jvp(model, (params,), (tangent,))

        def out_loss(o):
            return jnp.sum(w * loss_fn(o, y))

        hjv = jax.jvp(jax.grad(out_loss), (outputs,), (jv,))[1]
        _, vjp = jax.vjp(model, params)
        return ravel_pytree(vjp(hjv)[0])[0]

    return _scan_sum(chunk_fn, chunks) / total


def _dense_gauss_newton(apply_fn, loss_fn, flat, unravel, chunks, total):
    """``[p, p]`` Gauss-Newton matrix from explicit Jacobians and output Hessians."""

    def chunk_fn(x, y, ids, w):
        out_shape = jax.eval_shape(apply_fn, unravel(flat), x).shape[1:]

        def model(theta):
            return apply_fn(unravel(theta), x).reshape(x.shape[0], -1)

        outputs = model(flat)
        jac = jax.jacfwd(model)(flat)  # [b, C, p]

        def example_loss(o, label):
            return loss_fn(o.reshape((1,) + out_shape), label[None])[0]

        out_hess = jax.vmap(jax.hessian(example_loss))(outputs, y)  # [b, C, C]
        hj = jnp.einsum("bcd,bdp->bcp", out_hess, jac)
        return jnp.einsum("b,bcp,bcq->pq", w, jac, hj)

    return _scan_sum(chunk_fn, chunks) / total


def _top_curvature(apply_fn, loss_fn, params, data, hessian, batch_size) -> float:
    """The largest eigenvalue (absolute) of the curvature ``hessian``; raises
    if it is not positive and finite."""
    top = abs(float(_curvature_top(apply_fn, loss_fn, params, data,
                                   hessian=hessian, batch_size=batch_size)))
    if not (math.isfinite(top) and top > 0):
        raise ValueError(
            f"the largest eigenvalue of the {hessian} curvature at θ* is {top:.3g}, "
            "so damping='auto' has no scale: pass a numeric damping, or check "
            "that θ* and the data are finite (a loss flat in every parameter has "
            "no influence to measure).")
    return top


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("hessian", "batch_size"))
def _curvature_top(apply_fn, loss_fn, params, data, *, hessian, batch_size):
    dtype = _dtype(params)
    flat, unravel = ravel_pytree(params)
    chunks = _training_chunks(data, dtype, batch_size)
    total = jnp.sum((data.task_ids >= 0).astype(dtype))
    if hessian == "gauss_newton":
        def matvec(v):
            return _gauss_newton_vp(apply_fn, loss_fn, params, v, unravel, chunks,
                                    total)
    else:
        def mean_loss(theta):
            p = unravel(theta)
            return _scan_sum(
                lambda x, y, ids, w: jnp.sum(w * loss_fn(apply_fn(p, x), y)), chunks
            ) / total

        def matvec(v):
            return jax.jvp(jax.grad(mean_loss), (flat,), (v,))[1]

    return top_eigenvalue(matvec, flat.size, dtype)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("batch_size",))
def _tracin_one(apply_fn, loss_fn, params, data, target, *, batch_size):
    dtype = _dtype(params)
    chunks = _training_chunks(data, dtype, batch_size)
    total = jnp.sum((data.task_ids >= 0).astype(dtype))
    task_sums = _task_gradient_sums(apply_fn, loss_fn, params, data, chunks)
    return _target_derivatives(apply_fn, loss_fn, params, target, task_sums) / total


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("features", "relative", "batch_size"))
def _trak(apply_fn, loss_fn, params, data, target, projection, damping, *,
          features, relative, batch_size):
    """``(scores [K, T], λ, largest eigenvalue of ΦᵀΦ)``; with ``relative``,
    ``damping`` is the fraction of that eigenvalue λ is."""
    dtype = _dtype(params)
    if features == "margin":
        def output(p, x, y):  # h: [1]
            return margin(apply_fn(p, x[None])[0], y)[None]

        def dloss(h, y):  # ∂ℓ/∂h for ℓ = softplus(-m)
            return -jax.nn.sigmoid(-h)
    elif features == "outputs":
        def output(p, x, y):  # h: [C]
            return apply_fn(p, x[None])[0]

        def dloss(h, y):
            return jax.grad(lambda o: loss_fn(o[None], y[None])[0])(h)
    else:
        def output(p, x, y):  # h: [1]
            return loss_fn(apply_fn(p, x[None]), y[None])

        def dloss(h, y):
            return jnp.ones_like(h)

    def features_of(inputs, labels):  # Φ [n, C_h, d], ψ [n, d]
        h = chunked_vmap(lambda xy: output(params, *xy), (inputs, labels), batch_size)
        if features != "outputs":
            grads = per_example_grads(lambda p, x, y: output(p, x, y)[0], params,
                                      inputs, labels, projection=projection,
                                      batch_size=batch_size)
            phi = (grads if projection is not None else ravel_rows(grads))[:, None]
        elif projection is not None:
            phi = projected_jacobians(apply_fn, params, inputs,
                                      projection=projection, batch_size=batch_size)
        else:
            phi = chunked_vmap(lambda x: ravel_rows(jax.jacrev(
                lambda p: apply_fn(p, x[None])[0])(params)), inputs, batch_size)
        return phi, jnp.einsum("nc,ncd->nd", jax.vmap(dloss)(h, labels), phi)

    # Training and target examples in one pass (one compiled body), then split.
    n = data.inputs.shape[0]
    phi, psi = features_of(
        jnp.concatenate([data.inputs, target.inputs.astype(data.inputs.dtype)]),
        jnp.concatenate([data.labels, target.labels.astype(data.labels.dtype)]))
    phi, psi, psi_t = phi[:n], psi[:n], psi[n:]  # [n, C_h, d], [n, d], [T, d]
    weights = (data.task_ids >= 0).astype(dtype)
    kernel = jnp.einsum("n,ncd,nce->de", weights, phi, phi)
    top = top_eigenvalue(lambda v: kernel @ v, kernel.shape[0], dtype)
    lam = damping * top if relative else jnp.asarray(damping, dtype)
    kernel = kernel + lam * jnp.eye(kernel.shape[0], dtype=dtype)
    task = per_task_sums(psi, data.task_ids, data.num_tasks)  # [K, d]
    return task @ jnp.linalg.solve(kernel, psi_t.T), lam, top


# ---------------------------------------------------------------------------
# Validation.


def _check_common(apply_fn, params, data, target, loss_fn, batch_size):
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a TaskData, got {type(data).__name__}.")
    if target is not None:
        check_target_matches(data, target)
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if not int(np.sum(np.asarray(data.task_ids) >= 0)):
        raise ValueError("data has no training examples (every row is padding).")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
                             for leaf in leaves):
        raise TypeError("params must be a non-empty pytree of floating arrays.")
    try:
        losses = jax.eval_shape(
            lambda p, x, y: loss_fn(apply_fn(p, x), y), params, data.inputs[:2],
            data.labels[:2])
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            "params do not match the model or the loss: "
            f"loss_fn(apply_fn(params, inputs), labels) failed with "
            f"{type(err).__name__}: {err}"
        ) from err
    if losses.shape != (min(2, data.num_examples),):
        raise ValueError(
            "loss_fn must return per-example losses [batch], got shape "
            f"{losses.shape} for a batch of {min(2, data.num_examples)}."
        )


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number))


def _is_auto(value, name, what="a number") -> bool:
    """``value == "auto"``; any other string is an error."""
    if isinstance(value, str):
        if value != AUTO:
            raise ValueError(f"{name} must be {what} or 'auto', got {value!r}.")
        return True
    return False


def _check_hessian(hessian):
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}.")


def _check_trak_features(apply_fn, params, data, loss_fn, features):
    if features not in TRAK_FEATURES:
        raise ValueError(f"features must be one of {TRAK_FEATURES}, got {features!r}.")
    if features == "margin":
        if loss_fn is not softmax_cross_entropy:
            raise ValueError(
                "features='margin' assumes loss_fn=softmax_cross_entropy (the loss "
                "is softplus(-margin)); use features='outputs' or 'loss' for other "
                "losses."
            )
        if data.labels.ndim != 1 or not jnp.issubdtype(data.labels.dtype,
                                                       jnp.integer):
            raise ValueError(
                "features='margin' needs integer class labels [num_examples], got "
                f"labels of shape {data.labels.shape} and dtype {data.labels.dtype}."
            )
    if features != "loss":
        out = jax.eval_shape(apply_fn, params, leading_rows_spec(data.inputs))
        if len(out.shape) != 2:
            raise ValueError(
                f"features={features!r} needs apply_fn to return [batch, outputs], "
                f"got output shape {out.shape}; use features='loss'."
            )


def _check_damping(damping) -> float:
    if not _is_number(damping):
        raise TypeError(
            f"damping must be a number or 'auto', got {type(damping).__name__}.")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be finite and >= 0, got {damping}.")
    return float(damping)


def _check_finite(scores, what, fix):
    bad = ~np.isfinite(np.asarray(scores))
    if bad.any():
        raise ValueError(
            f"{what} are not finite ({int(bad.sum())} entries): {fix}, and check "
            "that θ* and the data are finite."
        )
    return scores
