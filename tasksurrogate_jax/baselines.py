"""Gradient-based task attribution baselines at ``θ*``: influence, TracIn, TRAK.

**Convention (all three).** Each function returns ``scores`` ``[num_tasks,
num_targets]``; ``scores[i, t]`` predicts, to first order, the leave-one-out
effect ``F(1 − e_i)_t − F(1)_t`` of task i on target t's loss. Positive = removing
the task raises the target loss = the task *helps* the target. These are the
sign and units of the surrogate read-out ``ĝ(s* − e_i) − ĝ(s*)``, so they can be
correlated with true LOO effects directly (``metrics.loo_correlation``).

**The objective they linearize** is the training loss of ``retraining.py``. With
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

Memory: ``[K, p]`` task gradients and ``[T, p]`` target gradients (p parameters)
for influence and TracIn, accumulated over chunks of ``batch_size`` training
examples (never ``[n, p]``); ``[n, C_h, d]`` features for TRAK. ``solver="dense"``
builds the ``[p, p]`` Hessian: small models only. The public functions check
their (concrete) arguments, then run one jitted program (one per checkpoint for
TracIn); call them outside ``jit``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.chunking import chunked_vmap
from tasksurrogate_jax.data import TargetData, TaskData, check_target_matches
from tasksurrogate_jax.linearize import (
    per_example_grads,
    per_task_sums,
    projected_jacobians,
)
from tasksurrogate_jax.losses import margin, softmax_cross_entropy
from tasksurrogate_jax.projection import make_projection, num_parameters, ravel_rows

HESSIANS = ("exact", "gauss_newton")
SOLVERS = ("cg", "dense")
CG_WARN_RESIDUAL = 1e-2
TRAK_FEATURES = ("margin", "outputs", "loss")


# ---------------------------------------------------------------------------
# Public functions.


def influence_scores(
    apply_fn: Callable, params, data: TaskData, target: TargetData, *,
    loss_fn: Callable = softmax_cross_entropy, damping: float = 1e-3,
    hessian: str = "exact", solver: str = "cg", cg_max_iter: int = 100,
    cg_tol: float = 1e-6, batch_size: int | None = None,
) -> jax.Array:
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
      damping: λ ≥ 0 added to the Hessian.
      hessian: ``"exact"`` (``∇²L``; may be indefinite for non-convex models: use
        enough damping) or ``"gauss_newton"`` (``Σ ω_n J_nᵀ ∇²_f ℓ_n J_n / W``,
        positive semi-definite for convex losses).
      solver: ``"cg"`` (Hessian-vector products, conjugate gradients vmapped over
        right-hand sides; needs ``H + λI`` positive definite) or ``"dense"``
        (builds the ``[p, p]`` matrix and solves exactly; small models).
      cg_max_iter: CG iteration cap.
      cg_tol: CG relative residual tolerance (``||r|| <= cg_tol ||b||``). CG
        returns its best iterate (see :func:`conjugate_gradients`) and a
        ``RuntimeWarning`` says when that is above ``CG_WARN_RESIDUAL``.
      batch_size: training / target examples per chunk.

    Returns:
      ``[num_tasks, num_targets]`` first-order LOO effects (positive = helps).
    """
    _check_common(apply_fn, params, data, target, loss_fn, batch_size)
    damping = _check_damping(damping)
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}.")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    cg_max_iter = check_positive_int(cg_max_iter, "cg_max_iter")
    if (isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float, np.number))
            or not (math.isfinite(cg_tol) and cg_tol > 0)):
        raise ValueError(f"cg_tol must be a positive number, got {cg_tol!r}.")
    scores, residual = _influence(apply_fn, loss_fn, params, data, target, damping,
                                  float(cg_tol), hessian=hessian, solver=solver,
                                  cg_max_iter=cg_max_iter, batch_size=batch_size)
    if float(residual) > CG_WARN_RESIDUAL:
        warnings.warn(
            f"conjugate gradients stopped at a relative residual of "
            f"{float(residual):.2g} (> {CG_WARN_RESIDUAL}); the influence scores are "
            "approximate: increase damping or cg_max_iter, or use float64 "
            "(jax_enable_x64).", RuntimeWarning, stacklevel=2)
    return _check_finite(scores, "influence scores",
                         "increase damping, or use hessian='gauss_newton'")


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
    proj_dim: int | None = 512, damping: float = 1e-3, features: str = "margin",
    projection_kind: str = "rademacher",
    loss_fn: Callable = softmax_cross_entropy, batch_size: int | None = None,
) -> jax.Array:
    """TRAK at task level (module doc), per-example scores summed over tasks.

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs``; ``[b, C]``
        (logits for ``features="margin"``) unless ``features="loss"``.
      params: ``θ*``.
      data: the training data (padding rows are ignored).
      target: the target examples.
      key: PRNG key of the projection (required unless ``proj_dim=None``).
      proj_dim: d; ``None`` uses the raveled gradients (no projection).
      damping: λ ≥ 0 added to ``ΦᵀΦ``.
      features: the output ``h`` whose projected gradients form the kernel:
        ``"margin"`` (correct-class margin; softmax cross-entropy with integer
        labels), ``"outputs"`` (all model outputs) or ``"loss"`` (see the
        module doc).
      projection_kind: ``"rademacher"`` or ``"gaussian"``.
      loss_fn: per-example loss; must be ``softmax_cross_entropy`` with
        ``features="margin"``.
      batch_size: examples per chunk.

    Returns:
      ``[num_tasks, num_targets]`` (positive = helps).
    """
    _check_common(apply_fn, params, data, target, loss_fn, batch_size)
    damping = _check_damping(damping)
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
        out = jax.eval_shape(apply_fn, params, data.inputs[:1])
        if len(out.shape) != 2:
            raise ValueError(
                f"features={features!r} needs apply_fn to return [batch, outputs], "
                f"got output shape {out.shape}; use features='loss'."
            )
    projection = None
    if proj_dim is not None:
        if key is None:
            raise ValueError(
                "key is required for the projection (or set proj_dim=None).")
        projection = make_projection(key, proj_dim, kind=projection_kind,
                                     num_params=num_parameters(params))
    scores = _trak(apply_fn, loss_fn, params, data, target, projection, damping,
                   features=features, batch_size=batch_size)
    return _check_finite(scores, "TRAK scores", "increase damping")


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


def _gradients(apply_fn, loss_fn, params, data, target, chunks, batch_size):
    """Task gradient sums ``∇G_k`` ``[K, p]`` and target gradients ``[T, p]``."""
    example_loss = _example_loss(apply_fn, loss_fn)

    def chunk_task_sums(x, y, ids, w):
        grads = ravel_rows(per_example_grads(example_loss, params, x, y))
        return jax.ops.segment_sum(grads, ids, num_segments=data.num_tasks)

    task = _scan_sum(chunk_task_sums, chunks)
    tgt = ravel_rows(per_example_grads(example_loss, params, target.inputs,
                                        target.labels, batch_size=batch_size))
    return task, tgt


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

    task_sums, target_grads = _gradients(apply_fn, loss_fn, params, data, target,
                                         chunks, batch_size)
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

    if data.num_tasks <= target_grads.shape[0]:
        solved, residuals = solve(task_grads)
        return solved @ target_grads.T, jnp.max(residuals)
    solved, residuals = solve(target_grads)
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


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("batch_size",))
def _tracin_one(apply_fn, loss_fn, params, data, target, *, batch_size):
    dtype = _dtype(params)
    chunks = _training_chunks(data, dtype, batch_size)
    total = jnp.sum((data.task_ids >= 0).astype(dtype))
    task_sums, target_grads = _gradients(apply_fn, loss_fn, params, data, target,
                                         chunks, batch_size)
    return task_sums @ target_grads.T / total


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("features", "batch_size"))
def _trak(apply_fn, loss_fn, params, data, target, projection, damping, *,
          features, batch_size):
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
    kernel = kernel + damping * jnp.eye(kernel.shape[0], dtype=dtype)
    task = per_task_sums(psi, data.task_ids, data.num_tasks)  # [K, d]
    return task @ jnp.linalg.solve(kernel, psi_t.T)


# ---------------------------------------------------------------------------
# Validation.


def _check_common(apply_fn, params, data, target, loss_fn, batch_size):
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a TaskData, got {type(data).__name__}.")
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


def _check_damping(damping) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float, np.number)):
        raise TypeError(f"damping must be a number, got {type(damping).__name__}.")
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
