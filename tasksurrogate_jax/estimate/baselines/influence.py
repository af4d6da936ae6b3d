"""Influence functions at ``θ*``: ``influence[i, t] = ∇ℓ_tᵀ (H + λI)^{-1} g_i``.

**Derivation.** With the objective ``L(θ; s)`` and the regulariser ``R`` of
:mod:`~tasksurrogate_jax.estimate.baselines`, ``θ*(s)`` solves
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

**Curvature and solver.** ``H`` is the Gauss-Newton matrix (default) or the
exact Hessian (:data:`HESSIANS`), applied by Hessian-vector products and
inverted by conjugate gradients (:func:`conjugate_gradients`), or built dense
(:data:`SOLVERS`). The damping ``"auto"`` is ``DAMPING_FRACTION`` × the
largest eigenvalue of ``H`` (:func:`influence_damping` computes it alone).
Conjugate gradients that stop above ``cg_max_residual`` raise.
``return_info=True`` returns what was used (:class:`InfluenceInfo`).

Memory: ``[K, p]`` task gradients and ``[T, p]`` target gradients (p
parameters), accumulated over chunks of ``batch_size`` training examples
(never ``[n, p]``). ``solver="dense"`` builds the ``[p, p]`` Hessian: small
models only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import TargetData, TaskData
from tasksurrogate_jax.estimate.baselines.common import (
    AUTO,
    DAMPING_FRACTION,
    check_common,
    check_damping,
    check_finite,
    is_auto,
    is_number,
    params_dtype,
    scan_sum,
    target_derivatives,
    target_gradients,
    task_gradient_sums,
    top_eigenvalue,
    training_chunks,
)
from tasksurrogate_jax.losses import softmax_cross_entropy

HESSIANS = ("exact", "gauss_newton")
SOLVERS = ("cg", "dense")
# The largest relative CG residual accepted by default; above it influence raises.
CG_MAX_RESIDUAL = 1e-2


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
    check_common(apply_fn, params, data, target, loss_fn, batch_size)
    auto = is_auto(damping, "damping")
    if not auto:
        damping = check_damping(damping)
    _check_hessian(hessian)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    cg_max_iter = check_positive_int(cg_max_iter, "cg_max_iter")
    if not is_number(cg_tol) or not (math.isfinite(cg_tol) and cg_tol > 0):
        raise ValueError(f"cg_tol must be a positive number, got {cg_tol!r}.")
    if not is_number(cg_max_residual) or not cg_max_residual > 0:
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
    scores = check_finite(scores, "influence scores",
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
    check_common(apply_fn, params, data, None, loss_fn, batch_size)
    _check_hessian(hessian)
    return DAMPING_FRACTION * _top_curvature(apply_fn, loss_fn, params, data,
                                             hessian, batch_size)


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


# ---------------------------------------------------------------------------
# Jitted cores.


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=(
    "hessian", "solver", "cg_max_iter", "batch_size"))
def _influence(apply_fn, loss_fn, params, data, target, damping, cg_tol, *,
               hessian, solver, cg_max_iter, batch_size):
    dtype = params_dtype(params)
    flat, unravel = ravel_pytree(params)
    chunks = training_chunks(data, dtype, batch_size)
    weights = (data.task_ids >= 0).astype(dtype)
    total = jnp.sum(weights)
    sizes = jax.ops.segment_sum(weights, data.task_ids, num_segments=data.num_tasks)

    task_sums = task_gradient_sums(apply_fn, loss_fn, params, data, chunks)
    mean_grad = jnp.sum(task_sums, axis=0) / total  # ∇L(θ*)
    task_grads = (task_sums - sizes[:, None] * mean_grad) / total  # g_i

    def mean_loss(theta):
        p = unravel(theta)
        return scan_sum(
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
        return (target_derivatives(apply_fn, loss_fn, params, target, solved),
                jnp.max(residuals))
    solved, residuals = solve(target_gradients(apply_fn, loss_fn, params, target,
                                                batch_size))
    return task_grads @ solved.T, jnp.max(residuals)


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

    return scan_sum(chunk_fn, chunks) / total


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

    return scan_sum(chunk_fn, chunks) / total


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
    dtype = params_dtype(params)
    flat, unravel = ravel_pytree(params)
    chunks = training_chunks(data, dtype, batch_size)
    total = jnp.sum((data.task_ids >= 0).astype(dtype))
    if hessian == "gauss_newton":
        def matvec(v):
            return _gauss_newton_vp(apply_fn, loss_fn, params, v, unravel, chunks,
                                    total)
    else:
        def mean_loss(theta):
            p = unravel(theta)
            return scan_sum(
                lambda x, y, ids, w: jnp.sum(w * loss_fn(apply_fn(p, x), y)), chunks
            ) / total

        def matvec(v):
            return jax.jvp(jax.grad(mean_loss), (flat,), (v,))[1]

    return top_eigenvalue(matvec, flat.size, dtype)


# ---------------------------------------------------------------------------
# Validation.


def _check_hessian(hessian):
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}.")
