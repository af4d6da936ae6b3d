"""Kernel ridge surrogates for many subsets: Nyström centres solved by FALKON.

The exact solver (:func:`surrogates.fit_kernel_surrogate` with
``solver="exact"``) factors the ``m x m`` kernel matrix: ``O(m^2)`` memory and
``O(m^3)`` time. Here the predictor is restricted to ``M`` centres
``C ⊂ masks``, ``g(s) = k(s, C) @ beta``: exactly a :class:`KernelSurrogate`
with ``train_masks=C`` and ``alpha=beta``, so prediction, attribution and
selection use it unchanged.

The ridge convention is the exact solver's. ``beta`` minimises
``||K_nM beta - y||^2 + ridge * beta^T K_MM beta``, i.e. solves

    (K_nM^T K_nM + ridge K_MM) beta = K_nM^T y,

which, with every distinct mask a centre and ``K`` invertible, is the exact
``beta = (K + ridge I)^{-1} y`` (``y`` standardised as in the exact fit).

Solver: FALKON's preconditioned conjugate gradients (Rudi, Carratino and
Rosasco 2017; Meanti et al. 2020), derived for this ridge convention. With
the ``M`` centres drawn uniformly from the ``D`` distinct masks, centre ``j``
occurring ``c_j`` times among the ``n`` rows, ``K_nM^T K_nM = sum_rows k k^T``
is estimated without bias by ``K_MM W K_MM``, ``W = (D / M) diag(c)`` (``(n / M)
I`` without duplicates: FALKON's ``(n / M) K_MM^2``), so the preconditioner is
``P = K_MM W K_MM + ridge K_MM``. With ``K_MM + jitter I = L L^T`` and
``L^T W L + ridge I = R R^T`` (both lower Cholesky factors),
``P = L R R^T L^T`` and ``B = L^{-T} R^{-T}`` gives ``B^T P B = I``. CG runs on

    B^T H B u = B^T K_nM^T y,    H = K_nM^T K_nM + ridge L L^T,   beta = B u,

whose operator is ``R^{-1} L^{-1} K_nM^T K_nM L^{-T} R^{-T} + ridge R^{-1} R^{-T}``
(FALKON's algorithm with its ``lambda n`` replaced by our ``ridge``; the
regulariser uses the jittered ``K_MM``, as FALKON does), applied through the
dense inverses ``L^{-1}`` and ``R^{-1}`` (matrix products rather than
triangular solves in the loop: twice as fast on CPU at 100,000 rows).
When the centres are all the distinct masks, ``H = P`` and CG stops after one
iteration (up to rounding).

All target columns run in one CG loop with per-column step sizes; a column
stops when its relative residual ``||r|| / ||b||`` falls below ``tolerance``,
the loop when every column has stopped or after ``max_iterations``.

Memory. Never an ``n x n`` matrix: the ``n x M`` matrix ``K_nM`` is cached
when its ``n * M * itemsize`` bytes fit in ``memory_budget`` (default
:data:`DEFAULT_MEMORY_BUDGET`, 2 GiB); otherwise every CG iteration recomputes
it in row blocks (``jax.lax.scan``). Rows are processed in blocks of at most
``memory_budget / (4 * M * itemsize)`` rows, so a block and the temporaries
of its kernel evaluation take about half the budget: peak memory is about
``1.5 * memory_budget`` (cached) or ``0.5 * memory_budget`` (recomputed), plus
four ``M x M`` matrices (``L``, ``R`` and their inverses) and the
``[M, num_targets]`` CG vectors.

Public API: :func:`fit_nystrom_surrogate` (returns :class:`NystromFit`, the
``KernelSurrogate`` with CG diagnostics), :func:`select_nystrom_hyperparameters`
(held-out or k-fold grid search), :func:`nystrom_centers`,
:func:`default_num_centers`, :func:`default_tolerance`.
:func:`surrogates.fit_kernel_surrogate` calls the fit for ``solver="nystrom"``
and, by default, above ``surrogates.AUTO_EXACT_MAX_SUBSETS`` rows.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import check_key, check_positive_int, is_concrete
from tasksurrogate_jax.core.kernels import check_gamma, gram
from tasksurrogate_jax.core.ridge import (
    DEFAULT_CRITERION,
    HyperparameterSearch,
    KernelSurrogate,
    PairSolve,
    check_grid,
    check_kernel_inputs,
    check_num_folds,
    check_per_target,
    check_ridge,
    check_search_options,
    cholesky_with_jitter,
    criterion_values,
    default_gamma_grid,
    default_ridge_grid,
    fit_per_pair,
    search_result,
    standardization,
    warn_if_duplicate_masks,
)

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
"""Bytes of kernel values (``K_nM`` cache or blocks) allowed by default: 2 GiB."""

DEFAULT_MAX_ITERATIONS = 50
"""CG iterations allowed by default (11 to 20 were needed in the measurements
of :func:`default_num_centers`)."""

MIN_DEFAULT_CENTERS = 2000
"""Fewest centres of :func:`default_num_centers` (when there are that many rows)."""


class NystromFit(NamedTuple):
    """Result of :func:`fit_nystrom_surrogate`.

    Attributes:
      surrogate: the fitted ``KernelSurrogate``; its ``train_masks`` are the
        centres and ``jitter`` the jitter added to ``K_MM``.
      iterations: ``[num_targets]`` int, CG iterations each target column ran.
      residual: ``[num_targets]`` final relative residual
        ``||b - B^T H B u|| / ||b||`` of the preconditioned system, recomputed
        from the solution (not CG's recursive estimate); 0 for a zero ``b``.
      converged: ``[num_targets]`` bool, CG's (recursive) residual of the
        column reached ``tolerance`` within ``max_iterations``. In float32
        the recomputed ``residual`` may stay a little above it.
      centers: ``[num_centers]`` sorted indices of the centre rows in ``masks``.
    """

    surrogate: KernelSurrogate
    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array
    centers: np.ndarray


def default_num_centers(num_subsets: int) -> int:
    """``min(num_subsets, max(2000, ceil(10 * sqrt(num_subsets))))`` centres.

    FALKON's statistical rate needs ``M ~ sqrt(n) log n`` centres, and ``M``
    must exceed the number of kernel eigendirections the ridge leaves
    unshrunk. For the RBF kernel at its default width on ``K`` tasks, ridge
    1e-2 and thousands of subsets these are the Walsh functions of degree
    <= 2, ``1 + K + K (K - 1) / 2`` of them (1,276 for 50 tasks), hence the
    floor of 2,000; more tasks may need more (pass ``num_centers``).
    Measured (float32, 50 tasks, 100 targets, 1,000 held-out masks): with
    8,000 subsets, 2,000 centres match the exact solver's held-out Spearman
    (0.975 vs 0.972; 1,000 centres gave 0.920); 100,000 subsets and 3,163
    centres fit and predict in about 21 s on 2 shared CPU cores, 20 CG
    iterations, 2.9 GiB peak (6,325 centres: 49 s, no better Spearman).
    """
    num_subsets = check_positive_int(num_subsets, "num_subsets")
    return int(min(num_subsets,
                   max(MIN_DEFAULT_CENTERS, math.ceil(10 * math.sqrt(num_subsets)))))


def default_tolerance(dtype) -> float:
    """``sqrt(eps)`` of ``dtype``: about 1.5e-8 (float64) and 3.5e-4 (float32)."""
    return float(np.sqrt(np.finfo(dtype).eps))


def nystrom_centers(masks, num_centers: int, key) -> np.ndarray:
    """Sorted row indices of ``num_centers`` distinct masks, drawn uniformly.

    Duplicate masks would make ``K_MM`` singular, so rows are first reduced to
    the first occurrence of each distinct mask; ``num_centers`` of those are
    drawn without replacement with ``key`` (all of them when there are at most
    ``num_centers``). The same key and masks give the same centres. Not
    jittable (the number of distinct masks depends on the values).
    """
    return _centers_and_weights(masks, num_centers, key)[0]


def _centers_and_weights(masks, num_centers, key):
    """Centre row indices and the preconditioner weights ``(D / M) c_j``."""
    num_centers = check_positive_int(num_centers, "num_centers")
    key = check_key(key)
    if not is_concrete(masks):
        raise TypeError("masks must be concrete (not traced inside jit) to draw "
                        "Nyström centres.")
    _, first, counts = np.unique(np.asarray(masks), axis=0, return_index=True,
                                 return_counts=True)
    order = np.argsort(first)
    first, counts = first[order], counts[order]
    num_distinct = first.size
    if num_centers < num_distinct:
        pick = np.sort(np.asarray(jax.random.choice(
            key, num_distinct, (num_centers,), replace=False)))
        first, counts = first[pick], counts[pick]
    return first, counts * (num_distinct / first.size)


def _check_memory_budget(memory_budget) -> int:
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(memory_budget, bool) or not isinstance(
            memory_budget, (int, np.integer)):
        raise TypeError(f"memory_budget must be an int number of bytes or None, got "
                        f"{type(memory_budget).__name__}.")
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be >= 1 byte, got {memory_budget}.")
    return int(memory_budget)


def _check_tolerance(tolerance, dtype) -> float:
    if tolerance is None:
        return default_tolerance(dtype)
    value = _scalar(tolerance, "tolerance")
    if not (np.isfinite(value) and 0 < value < 1):
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}.")
    return value


def _scalar(value, name) -> float:
    if (isinstance(value, (bool, str)) or value is None or np.ndim(value) != 0
            or not is_concrete(value)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}.") from None


class _Layout(NamedTuple):
    """Rows padded into ``num_blocks`` blocks of ``block_rows``."""

    block_rows: int
    num_blocks: int
    cached: bool


def _layout(num_rows: int, num_centers: int, itemsize: int, budget: int) -> _Layout:
    row_bytes = num_centers * itemsize
    most = max(1, min(num_rows, budget // (4 * row_bytes)))
    num_blocks = -(-num_rows // most)
    block_rows = -(-num_rows // num_blocks)  # even blocks: padding < num_blocks
    cached = num_blocks * block_rows * row_bytes <= budget
    return _Layout(block_rows, num_blocks, cached)


def _blocks(x, layout: _Layout):
    """``[num_blocks, block_rows, *]`` zero-padded copy of ``x`` and validity."""
    padded = layout.num_blocks * layout.block_rows
    extra = padded - x.shape[0]
    valid = jnp.arange(padded) < x.shape[0]
    x = jnp.concatenate([x, jnp.zeros((extra, *x.shape[1:]), x.dtype)])
    shape = (layout.num_blocks, layout.block_rows)
    return x.reshape(*shape, *x.shape[1:]), valid.reshape(shape).astype(x.dtype)


def _design(blocks, valid, kernel_rows, num_centers, cached):
    """``(normal, adjoint)``: ``v -> K_nM^T K_nM v`` and ``y -> K_nM^T y``.

    ``y`` comes in blocks like the masks. Padding rows are zeroed.
    """
    if cached:
        knm = jax.lax.map(lambda xs: kernel_rows(xs[0]) * xs[1][:, None],
                          (blocks, valid))
        knm = knm.reshape(-1, knm.shape[-1])

        def normal(v):
            return knm.T @ (knm @ v)

        def adjoint(y_blocks):
            return knm.T @ y_blocks.reshape(-1, y_blocks.shape[-1])

        return normal, adjoint

    def scan(step, init, xs):
        return jax.lax.scan(lambda acc, x: (acc + step(*x), None), init, xs)[0]

    def normal(v):
        def step(x, w):
            k = kernel_rows(x) * w[:, None]
            return k.T @ (k @ v)

        return scan(step, jnp.zeros_like(v), (blocks, valid))

    def adjoint(y_blocks):
        def step(x, w, y):
            return (kernel_rows(x) * w[:, None]).T @ y

        init = jnp.zeros((num_centers, y_blocks.shape[-1]), y_blocks.dtype)
        return scan(step, init, (blocks, valid, y_blocks))

    return normal, adjoint


def _inverse_factor(chol):
    """``chol^{-1}`` of a lower Cholesky factor, as a dense (lower) matrix.

    CG then applies ``B`` and ``B^T`` by matrix products: on CPU, XLA's
    triangular solves with few right-hand sides run at a small fraction of
    the speed of products of the same size.
    """
    eye = jnp.eye(chol.shape[0], dtype=chol.dtype)
    return jax.scipy.linalg.solve_triangular(chol, eye, lower=True)


def _preconditioned_cg(normal, rhs, chol_mm, inv_mm, weights, ridge, tolerance,
                       max_iterations, true_residual):
    """FALKON's CG for ``(K_nM^T K_nM + ridge K_MM) beta = rhs``.

    ``chol_mm`` is ``L`` and ``inv_mm`` its inverse. Returns ``beta``; per
    column the iterations, the relative residual (recomputed from the solution
    with ``true_residual``, else CG's recursive one) and whether CG's residual
    reached ``tolerance``; and whether ``R`` could be factored.
    """
    chol_r, _, ok = cholesky_with_jitter((chol_mm.T * weights) @ chol_mm, ridge,
                                          jnp.zeros((), rhs.dtype))
    inv_r = _inverse_factor(chol_r)

    def precondition(u):  # B u = L^{-T} R^{-T} u
        return inv_mm.T @ (inv_r.T @ u)

    def operator(u):  # B^T H B u
        inner = inv_r.T @ u
        data = inv_mm @ normal(inv_mm.T @ inner)
        return inv_r @ (data + ridge * inner)

    b = inv_r @ (inv_mm @ rhs)
    b_norm2 = jnp.sum(b * b, axis=0)
    target = tolerance**2 * b_norm2
    zeros_int = jnp.zeros(b.shape[1], jnp.int32)

    def cond(state):
        step, _, _, _, rr, _, stalled = state
        return (step < max_iterations) & jnp.any((rr > target) & ~stalled)

    def body(state):
        step, x, r, p, rr, iterations, stalled = state
        active = (rr > target) & ~stalled
        ap = operator(p)
        pap = jnp.sum(p * ap, axis=0)
        stalled = stalled | (active & ~(pap > 0))
        active = active & (pap > 0)
        alpha = jnp.where(active, rr / jnp.where(active, pap, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = jnp.sum(r * r, axis=0)
        beta = jnp.where(active, rr_new / jnp.where(active, rr, 1.0), 0.0)
        p = jnp.where(active, r + beta * p, p)
        rr = jnp.where(active, rr_new, rr)
        return step + 1, x, r, p, rr, iterations + active, stalled

    state = (jnp.zeros((), jnp.int32), jnp.zeros_like(b), b, b, b_norm2, zeros_int,
             jnp.zeros(b.shape[1], bool))
    _, x, _, _, rr, iterations, _ = jax.lax.while_loop(cond, body, state)
    converged = rr <= target
    if true_residual:
        rr = jnp.sum((b - operator(x)) ** 2, axis=0)
    nonzero = b_norm2 > 0
    residual = jnp.where(nonzero, jnp.sqrt(rr / jnp.where(nonzero, b_norm2, 1.0)),
                         0.0)
    return precondition(x), iterations, residual, converged, ok


def _kernel_rows_fn(centers, gamma, coef0, kernel, degree):
    def kernel_rows(x):
        return gram(x, centers, kernel=kernel, gamma=gamma, degree=degree,
                    coef0=coef0)

    return kernel_rows


@partial(jax.jit, static_argnames=("kernel", "degree", "cached"))
def _fit_core(blocks, valid, y_blocks, centers, gamma, ridge, coef0, jitter,
              tolerance, max_iterations, weights, *, kernel, degree, cached):
    kernel_rows = _kernel_rows_fn(centers, gamma, coef0, kernel, degree)
    normal, adjoint = _design(blocks, valid, kernel_rows, centers.shape[0], cached)
    chol_mm, used_jitter, ok_mm = cholesky_with_jitter(kernel_rows(centers),
                                                        jnp.zeros_like(jitter), jitter)
    beta, iterations, residual, converged, ok_r = _preconditioned_cg(
        normal, adjoint(y_blocks), chol_mm, _inverse_factor(chol_mm), weights,
        ridge, tolerance,
        max_iterations, True)
    return beta, iterations, residual, converged, used_jitter, ok_mm & ok_r


def fit_nystrom_surrogate(
    masks, scores, *, num_centers: int | None = None, key, kernel: str = "rbf",
    gamma=None, ridge=1e-2, degree: int = 3, coef0: float = 1.0,
    standardize: bool = True, max_iterations: int = DEFAULT_MAX_ITERATIONS,
    tolerance: float | None = None, memory_budget: int | None = None,
    jitter: float | None = None,
) -> NystromFit:
    """Nyström kernel ridge regression solved by FALKON's preconditioned CG.

    Same model and ridge convention as :func:`surrogates.fit_kernel_surrogate`
    restricted to ``M`` centres (see the module docstring for the equations,
    the preconditioner and the memory rule).

    Args:
      masks: ``[num_subsets, num_tasks]`` of 0/1.
      scores: ``[num_subsets, num_targets]`` (1-D = one target).
      num_centers: ``M``, at least 1; ``None`` = :func:`default_num_centers`.
        At least the number of distinct masks means every distinct mask.
      key: PRNG key drawing the centres (:func:`nystrom_centers`).
      kernel, gamma, degree, coef0, standardize: as in ``fit_kernel_surrogate``;
        ``gamma`` and ``ridge`` may be ``[num_targets]`` arrays (one CG per
        distinct pair, on its columns; the centres are shared).
      ridge: positive penalty (CG needs ``ridge > 0``).
      max_iterations: most CG iterations, at least 1.
      tolerance: relative residual in ``(0, 1)`` at which a column stops;
        ``None`` = :func:`default_tolerance` (``sqrt(eps)`` of the dtype).
      memory_budget: bytes of kernel values, ``None`` = 2 GiB; decides between
        caching ``K_nM`` and recomputing it in blocks (module docstring).
      jitter: initial jitter added to ``K_MM`` before its Cholesky factor;
        ``None`` = ``M * eps`` (FALKON's choice). It grows tenfold (up to 8
        times) while the factor is not finite.

    Returns:
      ``NystromFit(surrogate, iterations, residual, converged, centers)``. A
      ``RuntimeWarning`` reports columns that did not reach ``tolerance``.

    Not jittable as a whole (drawing distinct centres inspects the masks); the
    solve itself is one jitted program per shape.
    """
    masks, scores, kernel, degree, standardize = check_kernel_inputs(
        masks, scores, kernel=kernel, degree=degree, coef0=coef0,
        standardize=standardize)
    if not (is_concrete(masks) and is_concrete(scores)):
        raise TypeError("masks and scores must be concrete (not traced inside jit) "
                        "for the Nyström solver.")
    num_subsets, num_tasks = masks.shape
    num_targets = scores.shape[1]
    dtype = masks.dtype
    if num_centers is None:
        num_centers = default_num_centers(num_subsets)
    num_centers = check_positive_int(num_centers, "num_centers")
    max_iterations = check_positive_int(max_iterations, "max_iterations")
    tolerance = _check_tolerance(tolerance, dtype)
    budget = _check_memory_budget(memory_budget)
    gamma = check_per_target(check_gamma(gamma, num_tasks), "gamma", num_targets,
                             dtype)
    ridge = check_per_target(check_ridge(ridge, positive=True), "ridge",
                             num_targets, dtype)
    if jitter is not None:
        check_ridge(jitter, "jitter")

    centers, weights = _centers_and_weights(masks, num_centers, key)
    center_masks = masks[jnp.asarray(centers)]
    num_used = centers.size
    jitter = num_used * np.finfo(dtype).eps if jitter is None else jitter
    y_mean, y_scale = standardization(scores, standardize)
    y = (scores - y_mean) / y_scale
    layout = _layout(num_subsets, num_used, dtype.itemsize, budget)
    blocks, valid = _blocks(masks, layout)
    coef0 = jnp.asarray(coef0, dtype)
    fixed = (jnp.asarray(jitter, dtype), jnp.asarray(tolerance, dtype),
             jnp.asarray(max_iterations, jnp.int32), jnp.asarray(weights, dtype))

    def solve(g, r, columns):
        y_blocks, _ = _blocks(y[:, columns], layout)
        beta, its, res, conv, used, ok = _fit_core(
            blocks, valid, y_blocks, center_masks, g, r, coef0, *fixed,
            kernel=kernel, degree=degree, cached=layout.cached)
        return PairSolve(beta, (its, res, conv), used, ok)

    surrogate, (iterations, residual, converged) = fit_per_pair(
        solve, train_masks=center_masks, gamma=gamma, ridge=ridge, y_mean=y_mean,
        y_scale=y_scale, coef0=coef0, kernel=kernel, degree=degree)
    converged_host, residual_host = jax.device_get((converged, residual))
    if not converged_host.all():
        warnings.warn(
            f"Nyström CG did not reach tolerance={tolerance:.3g} for "
            f"{int((~converged_host).sum())} of {num_targets} targets within "
            f"max_iterations={max_iterations} (largest relative residual "
            f"{float(residual_host.max()):.3g}). Raise max_iterations or "
            "num_centers, or use a larger ridge.",
            RuntimeWarning, stacklevel=2)
    return NystromFit(surrogate=surrogate, iterations=iterations, residual=residual,
                      converged=converged, centers=centers)


# ----------------------------------------------------------------------------
# Hyperparameter selection
# ----------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("kernel", "degree", "cached", "criterion"))
def _validation_table(blocks, valid, y_blocks, centers, val_blocks, val_truth,
                      gamma, ridges, coef0, jitter, tolerance, max_iterations,
                      weights, *, kernel, degree, cached, criterion):
    """``[num_ridges, num_targets]`` held-out criterion for one gamma.

    ``K_nM`` (when cached), ``K_MM`` and its factor are computed once and
    serve every ridge; only the second factor ``R`` changes with the ridge.
    """
    kernel_rows = _kernel_rows_fn(centers, gamma, coef0, kernel, degree)
    normal, adjoint = _design(blocks, valid, kernel_rows, centers.shape[0], cached)
    chol_mm, _, ok_mm = cholesky_with_jitter(kernel_rows(centers),
                                              jnp.zeros_like(jitter), jitter)
    inv_mm = _inverse_factor(chol_mm)
    rhs = adjoint(y_blocks)

    def per_ridge(ridge):
        beta, _, _, _, ok = _preconditioned_cg(normal, rhs, chol_mm, inv_mm, weights,
                                               ridge, tolerance, max_iterations,
                                               False)
        return beta, ok

    betas, ok = jax.lax.map(per_ridge, ridges)  # [R, M, T]
    predicted = jax.lax.map(
        lambda xs: jnp.einsum("vm,rmt->rvt", kernel_rows(xs[0]), betas), (val_blocks,))
    predicted = jnp.moveaxis(predicted, 0, 1).reshape(
        betas.shape[0], -1, betas.shape[-1])[:, : val_truth.shape[0]]
    table = jax.vmap(lambda p: criterion_values(val_truth, p, criterion))(predicted)
    return table, ok_mm & jnp.all(ok)


def select_nystrom_hyperparameters(
    masks, scores, *, key, num_centers: int | None = None, kernel: str = "rbf",
    gammas=None, ridges=None, method: Literal["holdout", "kfold"] = "holdout",
    holdout_fraction: float = 0.2, num_folds: int = 5,
    criterion: Literal["mse", "spearman"] = DEFAULT_CRITERION,
    per_target: bool = False,
    degree: int = 3, coef0: float = 1.0, standardize: bool = True,
    max_iterations: int = DEFAULT_MAX_ITERATIONS, tolerance: float | None = None,
    memory_budget: int | None = None,
) -> HyperparameterSearch:
    """Held-out (gamma, ridge) selection for :func:`fit_nystrom_surrogate`.

    Rows are shuffled with ``key``. ``method="holdout"`` fits on the first
    ``1 - holdout_fraction`` of them and scores the rest; ``method="kfold"``
    averages the criterion over ``num_folds`` contiguous folds of the shuffled
    rows. Each split draws its centres from its training rows (with a key
    derived from ``key``) and standardises with its training rows' statistics
    (``standardize=True``); the criterion is computed in those standardised
    units. For each gamma, ``K_nM`` (when it fits the memory budget), ``K_MM``
    and its Cholesky factor are computed once and serve every ridge. Fits
    that stop at ``max_iterations`` short of ``tolerance`` are scored as they
    are, without a warning. Duplicate masks give a
    ``surrogates.DuplicateMasksWarning``, as in
    :func:`surrogates.select_kernel_hyperparameters` (a held-out mask's copies
    may be training rows).

    Args:
      masks, scores: as in :func:`fit_nystrom_surrogate`.
      key: PRNG key for the split and the centres.
      num_centers: centres per fit; ``None`` = :func:`default_num_centers` of
        the training rows.
      kernel, degree, coef0, standardize, max_iterations, tolerance,
        memory_budget: as in :func:`fit_nystrom_surrogate`.
      gammas: grid of widths (default ``surrogates.default_gamma_grid``).
      ridges: grid of positive penalties (default
        ``surrogates.default_ridge_grid(m, dtype)`` for the ``m`` rows and the
        computing dtype: the ridges above the rounding error ``10 eps m``).
      method: ``"holdout"`` or ``"kfold"``.
      holdout_fraction: share of rows held out, in (0, 1) (``"holdout"``).
      num_folds: folds, at least 2 (``"kfold"``).
      criterion: ``"mse"`` (the default, lower is better; chosen for the
        reason given in :func:`surrogates.select_kernel_hyperparameters`) or
        ``"spearman"`` (higher is better).
      per_target: choose a setting per target instead of one for all.

    Returns:
      ``surrogates.HyperparameterSearch`` with ``method`` ``"holdout"`` or
      ``"kfold"``; pass its ``gamma`` and ``ridge`` to the fit.
    """
    masks, scores, kernel, degree, standardize = check_kernel_inputs(
        masks, scores, kernel=kernel, degree=degree, coef0=coef0,
        standardize=standardize)
    criterion, per_target = check_search_options(method, ("holdout", "kfold"),
                                                 criterion, scores, per_target)
    key = check_key(key)
    if not (is_concrete(masks) and is_concrete(scores)):
        raise TypeError("masks and scores must be concrete (not traced inside jit).")
    num_subsets, num_tasks = masks.shape
    dtype = masks.dtype
    if num_centers is not None:
        num_centers = check_positive_int(num_centers, "num_centers")
    max_iterations = check_positive_int(max_iterations, "max_iterations")
    tolerance = _check_tolerance(tolerance, dtype)
    budget = _check_memory_budget(memory_budget)
    gammas = default_gamma_grid(num_tasks) if gammas is None else gammas
    if ridges is None:
        ridges = default_ridge_grid(num_subsets, dtype)
    gammas = check_grid(np.atleast_1d(np.asarray(check_gamma(gammas, 1, "gammas"),
                                                 float)), "gammas")
    ridges = check_grid(np.atleast_1d(np.asarray(
        check_ridge(ridges, "ridges", positive=True), float)), "ridges")
    warn_if_duplicate_masks(masks, f"method={method!r}")

    split_key, center_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(split_key, num_subsets))
    if method == "holdout":
        if not 0 < _scalar(holdout_fraction, "holdout_fraction") < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got "
                             f"{holdout_fraction!r}.")
        num_held = int(round(holdout_fraction * num_subsets))
        if num_held < 2 or num_subsets - num_held < 2:
            raise ValueError(
                f"holdout_fraction={holdout_fraction} of {num_subsets} subsets leaves "
                f"{num_held} held-out and {num_subsets - num_held} training rows; "
                "both need at least 2.")
        held_out = [order[num_subsets - num_held:]]
    else:
        held_out = np.array_split(order, check_num_folds(num_folds, num_subsets))

    tables, oks = [], []
    for index, val_rows in enumerate(held_out):
        train_rows = np.setdiff1d(order, val_rows)
        split_table, split_ok = _split_table(
            masks, scores, np.sort(train_rows), np.sort(val_rows),
            jax.random.fold_in(center_key, index), num_centers, gammas, ridges,
            kernel, degree, coef0, standardize, max_iterations, tolerance, budget,
            criterion)
        tables.append(split_table)
        oks.append(split_ok)
    factored = np.asarray(jnp.stack(oks)).all(axis=0)  # one check for all fits
    if not factored.all():
        raise ValueError(
            "the Nyström factors could not be computed for "
            f"gamma={gammas[np.argmin(factored)]:.3g}: K_MM is not positive definite "
            "even with grown jitter. Use a positive-definite kernel (rbf, "
            "laplacian) or larger ridges.")
    table = jnp.mean(jnp.stack(tables), axis=0)

    gammas_arr, ridges_arr = jnp.asarray(gammas, dtype), jnp.asarray(ridges, dtype)
    return search_result(table, gammas_arr, ridges_arr, criterion=criterion,
                         method=method, per_target=per_target)


def _split_table(masks, scores, train_rows, val_rows, key, num_centers, gammas,
                 ridges, kernel, degree, coef0, standardize, max_iterations,
                 tolerance, budget, criterion):
    """``[num_gammas, num_ridges, num_targets]`` criterion of one split and
    ``[num_gammas]`` whether its factors are finite."""
    dtype = masks.dtype
    train, val = masks[jnp.asarray(train_rows)], masks[jnp.asarray(val_rows)]
    y_train, y_val = scores[jnp.asarray(train_rows)], scores[jnp.asarray(val_rows)]
    num_train = train.shape[0]
    count = default_num_centers(num_train) if num_centers is None else num_centers
    center_rows, weights = _centers_and_weights(train, count, key)
    centers = train[jnp.asarray(center_rows)]
    num_used = centers.shape[0]
    y_mean, y_scale = standardization(y_train, standardize)
    layout = _layout(num_train, num_used, dtype.itemsize, budget)
    blocks, valid = _blocks(train, layout)
    y_blocks, _ = _blocks((y_train - y_mean) / y_scale, layout)
    val_layout = _layout(val.shape[0], num_used * len(ridges), dtype.itemsize, budget)
    val_blocks, _ = _blocks(val, val_layout)
    val_truth = (y_val - y_mean) / y_scale
    fixed = (jnp.asarray(ridges, dtype), jnp.asarray(coef0, dtype),
             jnp.asarray(num_used * np.finfo(dtype).eps, dtype),
             jnp.asarray(tolerance, dtype), jnp.asarray(max_iterations, jnp.int32),
             jnp.asarray(weights, dtype))
    rows, oks = [], []
    for g in gammas:
        table, ok = _validation_table(
            blocks, valid, y_blocks, centers, val_blocks, val_truth,
            jnp.asarray(g, dtype), *fixed, kernel=kernel, degree=degree,
            cached=layout.cached, criterion=criterion)
        rows.append(table)
        oks.append(ok)
    return jnp.stack(rows), jnp.stack(oks)
