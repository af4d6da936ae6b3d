"""Surrogate models of subset scores: ``g(s) ≈ F(s)`` from ``(masks, scores)``.

- ``fit_linear_surrogate``: ``g(s) = b + s @ coef`` by ridge regression, or the
  minimum-norm least-squares solution when ``ridge=0`` (singular values below
  ``rcond * s_max`` are dropped, as ``numpy.linalg.lstsq`` does).
- ``fit_kernel_surrogate``: kernel ridge regression ``g(s) = k(s, S) @ alpha``,
  ``alpha = (K + (ridge + jitter) I)^{-1} Y``; one Cholesky factor serves all
  target columns. Beyond ``AUTO_EXACT_MAX_SUBSETS`` rows (or with
  ``solver="nystrom"``) the same model on Nyström centres, solved by
  preconditioned conjugate gradients (module ``nystrom``).
- ``select_kernel_hyperparameters``: cross-validation over a (gamma, ridge) grid,
  closed-form leave-one-out (one eigendecomposition per gamma serves every ridge)
  or k-fold.

Fitted surrogates are immutable pytrees: they pass through ``jax.jit`` and
``jax.vmap``, and ``surrogate.predict(masks)`` gives ``[n, num_targets]``.
Scores are ``[num_subsets, num_targets]``; a 1-D ``scores`` is one target.

``KernelSurrogate``, ``HyperparameterSearch``, ``DuplicateMasksWarning`` and
the default grids live in ``ridge``, the kernel ridge core this module shares
with ``nystrom``, and are re-exported here.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import (
    check_bool,
    check_finite_scalar,
    check_key,
    is_concrete,
)
from tasksurrogate_jax.core import nystrom
from tasksurrogate_jax.core.kernels import (
    check_degree,
    check_gamma,
    check_kernel_name,
    gram,
    kernel_diagonal,
)
from tasksurrogate_jax.core.ridge import (
    CRITERIA,
    DEFAULT_CRITERION,
    DuplicateMasksWarning,
    HyperparameterSearch,
    KernelSurrogate,
    PairSolve,
    check_fit_inputs,
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
    prediction_masks,
    pytree_dataclass,
    ridges_at_least,
    search_result,
    standardization,
    warn_if_duplicate_masks,
)

__all__ = [
    "AUTO_EXACT_MAX_SUBSETS",
    "CRITERIA",
    "DEFAULT_CRITERION",
    "NYSTROM_DEFAULT_SEED",
    "SOLVERS",
    "DuplicateMasksWarning",
    "HyperparameterSearch",
    "KernelSurrogate",
    "LinearSurrogate",
    "check_surrogate",
    "default_gamma_grid",
    "default_ridge_grid",
    "fit_kernel_surrogate",
    "fit_linear_surrogate",
    "kernel_loo_predictions",
    "predict",
    "select_kernel_hyperparameters",
    "surrogate_coefficients",
]


# ----------------------------------------------------------------------------
# Linear surrogate
# ----------------------------------------------------------------------------


@pytree_dataclass
class LinearSurrogate:
    """``g(s) = intercept + s @ coef``.

    Attributes:
      coef: ``[num_tasks, num_targets]``.
      intercept: ``[num_targets]`` (zeros without an intercept).
    """

    coef: jax.Array
    intercept: jax.Array

    @property
    def num_tasks(self) -> int:
        return self.coef.shape[0]

    def predict(self, masks) -> jax.Array:
        """Predicted scores ``[n, num_targets]`` for masks ``[n, num_tasks]``."""
        masks = prediction_masks(masks, self.num_tasks, self.coef.dtype)
        return masks @ self.coef + self.intercept


def fit_linear_surrogate(
    masks, scores, *, ridge=0.0, fit_intercept: bool = True, rcond=None
) -> LinearSurrogate:
    """Ridge regression of scores on masks, through one SVD.

    Args:
      masks: ``[num_subsets, num_tasks]`` of 0/1.
      scores: ``[num_subsets, num_targets]``.
      ridge: L2 penalty on ``coef`` (never on the intercept). ``0`` gives the
        minimum-norm least-squares solution.
      fit_intercept: centre masks and scores first and fit ``intercept``.
        ``False`` is the reference protocol's least squares.
      rcond: with ``ridge=0``, singular values below ``rcond * max(s)`` count as
        zero; ``None`` means ``eps * max(num_subsets, num_tasks)`` as in NumPy.

    Returns:
      ``LinearSurrogate``.
    """
    masks, scores = check_fit_inputs(masks, scores)
    ridge = check_ridge(ridge)
    fit_intercept = check_bool(fit_intercept, "fit_intercept")
    if rcond is None:
        rcond = jnp.finfo(masks.dtype).eps * max(masks.shape)
    else:
        check_ridge(rcond, "rcond")
    return _fit_linear(masks, scores, jnp.asarray(ridge, masks.dtype),
                       jnp.asarray(rcond, masks.dtype), fit_intercept)


@partial(jax.jit, static_argnums=4)
def _fit_linear(x, y, ridge, rcond, fit_intercept):
    if fit_intercept:
        x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
        x, y = x - x_mean, y - y_mean
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    kept = s > rcond * s[0]
    safe_s = jnp.where(kept, s, 1.0)
    inverse = jnp.where(
        ridge > 0, s / (s * s + jnp.where(ridge > 0, ridge, 1.0)),
        jnp.where(kept, 1.0 / safe_s, 0.0),
    )
    coef = vt.T @ (inverse[:, None] * (u.T @ y))
    if fit_intercept:
        intercept = y_mean - x_mean @ coef
    else:
        intercept = jnp.zeros(y.shape[1], y.dtype)
    return LinearSurrogate(coef=coef, intercept=intercept)


# ----------------------------------------------------------------------------
# Kernel surrogate
# ----------------------------------------------------------------------------


AUTO_EXACT_MAX_SUBSETS = 10_000
"""``solver="auto"`` fits exactly up to this many subsets (rows), with Nyström
beyond: at 10,000 rows the exact fit holds three ``m x m`` matrices (2.4 GB in
float64) and takes ``m^3 / 3 ≈ 3e11`` flops for the Cholesky factor."""

NYSTROM_DEFAULT_SEED = 0
"""Seed of the centres when ``fit_kernel_surrogate`` uses Nyström with
``key=None``: ``jax.random.key(0)``, so the fit is reproducible."""

SOLVERS = ("auto", "exact", "nystrom")


def _resolve_solver(solver, num_subsets, num_centers, key) -> str:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    if solver == "auto":
        return "exact" if num_subsets <= AUTO_EXACT_MAX_SUBSETS else "nystrom"
    if solver == "exact":
        for name, value in (("num_centers", num_centers), ("key", key)):
            if value is not None:
                raise ValueError(
                    f"{name} is used only by solver='nystrom' (or 'auto' above "
                    f"{AUTO_EXACT_MAX_SUBSETS} subsets); got {name} with "
                    "solver='exact'.")
    return solver


def fit_kernel_surrogate(
    masks, scores, *, kernel: str = "rbf", gamma=None, ridge=1e-2,
    degree: int = 3, coef0: float = 1.0, jitter: float = 1e-8,
    standardize: bool = True, solver: str = "auto", num_centers: int | None = None,
    key=None,
) -> KernelSurrogate:
    """Kernel ridge regression of scores on masks.

    ``solver="exact"`` factors the ``m x m`` kernel matrix (``O(m^2)`` memory,
    ``O(m^3)`` time). ``solver="nystrom"`` fits the same model restricted to
    ``num_centers`` centres drawn from the masks, by FALKON's preconditioned
    conjugate gradients (:func:`nystrom.fit_nystrom_surrogate`, whose
    diagnostics it drops and whose non-convergence warning it passes on).
    ``solver="auto"`` (the default) is exact for at most
    :data:`AUTO_EXACT_MAX_SUBSETS` (10,000) rows and Nyström beyond.

    Args:
      masks: ``[num_subsets, num_tasks]`` of 0/1.
      scores: ``[num_subsets, num_targets]``.
      kernel: ``"rbf"`` (default), ``"laplacian"``, ``"polynomial"``, ``"linear"``.
      gamma: kernel width, positive; ``None`` = ``1 / num_tasks`` (reference
        code). A ``[num_targets]`` array gives each target its own (concrete
        values only, e.g. from ``select_kernel_hyperparameters``).
      ridge: non-negative penalty; scalar or ``[num_targets]`` like ``gamma``.
      degree, coef0: polynomial kernel parameters.
      jitter: added to the diagonal with ``ridge``; if the Cholesky factor is
        not finite, the jitter grows tenfold up to 8 times before a
        ``ValueError``.
      standardize: centre and scale each target column before the fit (the
        prediction is mapped back), so the ridge shrinks towards each target's
        mean, not towards zero. On by default: without it (as in the paper's
        reference code) the shrinkage of scores whose level is large against
        the task effects can invert the sign of every LOO effect.
      solver: ``"auto"``, ``"exact"`` or ``"nystrom"`` (see above). Nyström
        needs a positive ``ridge``, concrete inputs (not under ``jit``), and
        ignores ``jitter`` (it uses its own on the centres' kernel matrix).
      num_centers: Nyström centres; ``None`` =
        :func:`nystrom.default_num_centers` (``min(m, max(2000, 10 sqrt(m)))``).
        Only with ``solver="nystrom"`` or ``"auto"``.
      key: PRNG key drawing the Nyström centres; ``None`` = ``jax.random.key(``
        :data:`NYSTROM_DEFAULT_SEED` ``)``. Only with ``"nystrom"`` or ``"auto"``.

    Returns:
      ``KernelSurrogate`` (for Nyström, ``train_masks`` are the centres).
    """
    masks, scores, kernel, degree, standardize = check_kernel_inputs(
        masks, scores, kernel=kernel, degree=degree, coef0=coef0,
        standardize=standardize)
    if _resolve_solver(solver, masks.shape[0], num_centers, key) == "nystrom":
        if key is None:
            key = jax.random.key(NYSTROM_DEFAULT_SEED)
        if not (is_concrete(masks) and is_concrete(scores)):
            raise TypeError(
                "solver='nystrom' needs concrete masks and scores (not traced inside "
                "jit); use solver='exact' under jit.")
        check_ridge(ridge, positive=True)
        return nystrom.fit_nystrom_surrogate(
            masks, scores, num_centers=num_centers, key=key, kernel=kernel,
            gamma=gamma, ridge=ridge, degree=degree, coef0=coef0,
            standardize=standardize).surrogate
    dtype = masks.dtype
    num_targets = scores.shape[1]
    gamma = check_per_target(check_gamma(gamma, masks.shape[1]), "gamma", num_targets,
                             dtype)
    ridge = check_per_target(check_ridge(ridge), "ridge", num_targets, dtype)
    jitter = jnp.asarray(check_ridge(jitter, "jitter"), dtype)
    coef0 = jnp.asarray(coef0, dtype)
    y_mean, y_scale = standardization(scores, standardize)
    y = (scores - y_mean) / y_scale

    def solve(g, r, columns):
        # Every column is solved (fixed shapes: one compilation for all pairs).
        alpha, used, ok = _fit_kernel_single(masks, y, g, r, coef0, jitter, kernel,
                                             degree)
        return PairSolve(alpha[:, columns], (), used, ok)

    return fit_per_pair(solve, train_masks=masks, gamma=gamma, ridge=ridge,
                        y_mean=y_mean, y_scale=y_scale, coef0=coef0, kernel=kernel,
                        degree=degree)[0]


@partial(jax.jit, static_argnums=(6, 7))
def _fit_kernel_single(masks, y, gamma, ridge, coef0, jitter, kernel, degree):
    """Solves ``(K + (ridge + jitter) I) alpha = y`` by Cholesky, growing jitter."""
    k = gram(masks, masks, kernel=kernel, gamma=gamma, degree=degree, coef0=coef0)
    chol, used_jitter, ok = cholesky_with_jitter(k, ridge, jitter)
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    return alpha, used_jitter, ok


def check_surrogate(surrogate, name: str = "surrogate") -> int:
    """Raises ``TypeError`` naming ``name`` unless ``surrogate`` is a fitted
    surrogate; returns its number of tasks."""
    if not isinstance(surrogate, (LinearSurrogate, KernelSurrogate)):
        raise TypeError(
            f"{name} must be a LinearSurrogate or KernelSurrogate, got "
            f"{type(surrogate).__name__}."
        )
    return surrogate.num_tasks


def surrogate_coefficients(surrogate) -> jax.Array:
    """``[*, num_targets]`` coefficients (``coef`` or ``alpha``): their dtype is
    the surrogate's and their last axis its targets."""
    return surrogate.coef if isinstance(surrogate, LinearSurrogate) else surrogate.alpha


def predict(surrogate, masks) -> jax.Array:
    """``surrogate.predict(masks)`` for any fitted surrogate: ``[n, num_targets]``."""
    check_surrogate(surrogate)
    return surrogate.predict(masks)


# ----------------------------------------------------------------------------
# Hyperparameter selection
# ----------------------------------------------------------------------------


def select_kernel_hyperparameters(
    masks, scores, *, kernel: str = "rbf", gammas=None, ridges=None,
    method: Literal["loo", "kfold"] = "loo", num_folds: int = 5, key=None,
    criterion: Literal["mse", "spearman"] = DEFAULT_CRITERION,
    per_target: bool = False, degree: int = 3, coef0: float = 1.0,
    standardize: bool = True,
) -> HyperparameterSearch:
    """Cross-validates kernel ridge regression over a (gamma, ridge) grid.

    ``method="loo"`` is exact leave-one-out in closed form: for each gamma,
    ``K = Q diag(l) Q^T`` once, then for every ridge ``A = (K + ridge I)^{-1}``
    gives the held-out residuals ``(A y)_i / A_ii`` without refitting.
    ``method="kfold"`` gives the exact held-out predictions of a refit on each
    training fold, but from the same per-gamma eigendecomposition of the full
    kernel matrix (block formula ``e_V = (A_VV)^{-1} (A y)_V``), and averages
    the per-fold criterion, as scikit-learn's ``GridSearchCV`` does. Folds are
    contiguous as in scikit-learn's ``KFold``; pass ``key`` to shuffle rows
    first.

    With ``standardize=True`` (the default, as in :func:`fit_kernel_surrogate`)
    targets are standardised; for ``"loo"`` with the statistics of all rows, for
    ``"kfold"`` with those of each training fold.

    The default criterion is ``"mse"`` (:data:`DEFAULT_CRITERION`), the
    pipeline's and the reference code's. A rank criterion cannot see how much
    a ridge shrinks the fit (a ranking survives shrinkage), so it drifts to
    large ridges that keep the first-order ranking and flatten the
    second-order terms. Measured with the pipeline (``tasksurrogate run
    digits --preset interactions --protocol pairs``, 96 Bernoulli(0.9)
    subsets, 4 replicates): the kernel's interactions correlate with the
    pair-removal truth at 0.940 when chosen by MSE and 0.181 by Spearman,
    while its LOO effects are the same on digits ``cpu`` (0.938 per target
    either way) and modular ``cpu`` (0.886). Under the earlier fixed-size
    design (each subset dropping 4 tasks) Spearman had won on LOO effects
    (0.87 against 0.72); pass ``criterion="spearman"`` for it.

    Duplicate masks (rows equal to an earlier one) give a
    :class:`DuplicateMasksWarning`: a held-out row's copies stay in the
    training rows, so the criterion rewards interpolation (the smallest
    ridges). Average the scores of each distinct mask first.

    Args:
      masks: ``[num_subsets, num_tasks]``.
      scores: ``[num_subsets, num_targets]``.
      kernel, degree, coef0: as in ``fit_kernel_surrogate``.
      gammas: grid of widths (default ``default_gamma_grid``).
      ridges: grid of positive penalties (default: ``default_ridge_grid(m,
        dtype)`` for the ``m`` rows and the computing dtype, without the
        values below the precision warning's threshold, so that the default
        never trips it).
      method: ``"loo"`` or ``"kfold"``.
      num_folds: folds for ``"kfold"``.
      key: optional PRNG key to shuffle rows before splitting into folds.
      criterion: ``"mse"`` (default: mean squared error of held-out
        predictions, averaged over targets; see above) or ``"spearman"``
        (Spearman between held-out predictions and truth, averaged over
        targets).
        A target whose criterion is NaN everywhere (constant scores under
        Spearman) gets the setting chosen for all targets.
      per_target: choose a setting per target instead of one for all.
      standardize: see above.

    Returns:
      ``HyperparameterSearch``; feed ``gamma`` and ``ridge`` to
      ``fit_kernel_surrogate``.
    """
    masks, scores, kernel, degree, standardize = check_kernel_inputs(
        masks, scores, kernel=kernel, degree=degree, coef0=coef0,
        standardize=standardize)
    criterion, per_target = check_search_options(method, ("loo", "kfold"), criterion,
                                                 scores, per_target)
    dtype = masks.dtype
    num_subsets = masks.shape[0]
    gammas = default_gamma_grid(masks.shape[1]) if gammas is None else gammas
    gammas = check_grid(jnp.atleast_1d(jnp.asarray(check_gamma(gammas, 1, "gammas"),
                                                   dtype)), "gammas")
    coef0 = jnp.asarray(coef0, dtype)
    resolution = _ridge_resolution(masks, gammas, coef0, kernel, degree)
    if ridges is None:
        ridges = default_ridge_grid(num_subsets, dtype)
        if resolution is not None:
            ridges = ridges_at_least(ridges, resolution, dtype)
    ridges = check_grid(jnp.atleast_1d(jnp.asarray(
        check_ridge(ridges, "ridges", positive=True), dtype)), "ridges")
    _warn_if_ridge_below_precision(ridges, resolution, dtype)
    warn_if_duplicate_masks(masks, f"method={method!r}")

    if method == "loo":
        if num_subsets < 3:
            raise ValueError(
                "masks must have at least 3 subsets for leave-one-out, got "
                f"{num_subsets}."
            )
        y_mean, y_scale = standardization(scores, standardize)
        table = _loo_table(masks, (scores - y_mean) / y_scale, gammas, ridges, coef0,
                           kernel, degree, criterion)
    else:
        num_folds = check_num_folds(num_folds, num_subsets)
        order = np.arange(num_subsets)
        if key is not None:
            order = np.asarray(jax.random.permutation(check_key(key), num_subsets))
        folds = [jnp.asarray(fold) for fold in np.array_split(order, num_folds)]
        table = _kfold_table(masks, scores, folds, gammas, ridges, coef0, kernel,
                             degree, criterion, standardize)

    return search_result(table, gammas, ridges, criterion=criterion, method=method,
                         per_target=per_target)


def _ridge_resolution(masks, gammas, coef0, kernel, degree):
    """``10 eps max_gamma trace(K)``: the rounding error of the kernel matrix's
    eigenvalues in the masks' dtype (``10 eps m`` for rbf and laplacian);
    ``None`` under ``jit`` (the values are not known at trace time)."""
    if not (is_concrete(masks) and is_concrete(gammas) and is_concrete(coef0)):
        return None
    eps = float(jnp.finfo(masks.dtype).eps)
    if kernel in ("rbf", "laplacian"):
        return 10 * eps * masks.shape[0]

    diagonals = jax.vmap(lambda g: kernel_diagonal(masks, kernel, g, degree, coef0))(
        gammas)
    return 10 * eps * float(jnp.max(jnp.sum(jnp.abs(diagonals), axis=1)))


def _warn_if_ridge_below_precision(ridges, resolution, dtype):
    """Warns when a grid ridge is below the eigendecomposition's rounding error.

    The closed forms divide by ``eigenvalue + ridge``; eigenvalues are only
    known to about ``eps * trace(K)``, so smaller ridges give unreliable
    criterion values (seen in float32: tens of percent off). Skipped under
    ``jit`` (``resolution`` is ``None``).
    """
    if resolution is None or not is_concrete(ridges):
        return
    if float(np.min(np.asarray(ridges))) < resolution:
        warnings.warn(
            f"ridges holds values below {resolution:.2g}, the rounding error of the "
            f"{dtype} eigenvalues of this kernel matrix: their criterion "
            "values are unreliable. Use float64 (jax_enable_x64) or larger ridges "
            "(ridges=None keeps only those above it).",
            RuntimeWarning, stacklevel=3)


def _spectrum(masks, gamma, coef0, kernel, degree):
    """Eigenvalues (clipped at 0) and eigenvectors of the kernel matrix."""
    k = gram(masks, masks, kernel=kernel, gamma=gamma, degree=degree, coef0=coef0)
    evals, evecs = jnp.linalg.eigh(k)
    return jnp.maximum(evals, 0.0), evecs


@partial(jax.jit, static_argnums=(5, 6, 7))
def _loo_table(masks, y, gammas, ridges, coef0, kernel, degree, criterion):
    """``[num_gammas, num_ridges, num_targets]`` closed-form LOO criterion."""

    def per_gamma(gamma):
        evals, evecs = _spectrum(masks, gamma, coef0, kernel, degree)
        projected = evecs.T @ y  # [m, T]
        sq_evecs = evecs * evecs

        def per_ridge(ridge):
            loo_prediction = _loo_from_spectrum(evals, evecs, sq_evecs, projected, y,
                                                ridge)
            return criterion_values(y, loo_prediction, criterion)

        return jax.lax.map(per_ridge, ridges)

    return jax.lax.map(per_gamma, gammas)


def _loo_from_spectrum(evals, evecs, sq_evecs, projected, y, ridge):
    """Held-out predictions ``y - (A y) / diag(A)``, ``A = (K + ridge I)^{-1}``."""
    inv = 1.0 / (evals + ridge)
    a_y = evecs @ (inv[:, None] * projected)
    a_diag = sq_evecs @ inv
    return y - a_y / a_diag[:, None]


def kernel_loo_predictions(
    masks, scores, *, gamma, ridge, kernel: str = "rbf", degree: int = 3,
    coef0: float = 1.0,
) -> jax.Array:
    """Exact leave-one-out predictions of kernel ridge regression, in closed form.

    Row ``i`` is the prediction at ``masks[i]`` of the kernel ridge model
    (no jitter, no standardisation) fitted on every other row: the quantity
    whose criterion :func:`select_kernel_hyperparameters` tabulates.

    Args:
      masks: ``[num_subsets, num_tasks]``.
      scores: ``[num_subsets, num_targets]``.
      gamma, ridge: scalar width and positive penalty.
      kernel, degree, coef0: as in :func:`fit_kernel_surrogate`.

    Returns:
      ``[num_subsets, num_targets]`` held-out predictions.
    """
    masks, scores = check_fit_inputs(masks, scores)
    kernel = check_kernel_name(kernel)
    degree = check_degree(degree)
    check_finite_scalar(coef0, "coef0")
    dtype = masks.dtype
    gamma = jnp.asarray(check_gamma(gamma, masks.shape[1]), dtype)
    ridge = jnp.asarray(check_ridge(ridge, "ridge", positive=True), dtype)
    for name, value in (("gamma", gamma), ("ridge", ridge)):
        if value.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got shape {value.shape}.")
    evals, evecs = _spectrum(masks, gamma, jnp.asarray(coef0, dtype), kernel, degree)
    return _loo_from_spectrum(evals, evecs, evecs * evecs, evecs.T @ scores, scores,
                              ridge)


@partial(jax.jit, static_argnums=(6, 7, 8, 9))
def _kfold_table(masks, y, folds, gammas, ridges, coef0, kernel, degree, criterion,
                 standardize):
    """``[num_gammas, num_ridges, num_targets]`` criterion averaged over folds.

    Exact refits without refitting: with ``A = (K + ridge I)^{-1}`` of the full
    kernel matrix, the residuals on fold V of the model fit on the other rows
    are ``e_V = (A_VV)^{-1} (A y)_V``. Standardising with the training rows'
    statistics is an affine change of ``y``: ``A`` applied to a column of ones
    gives the shift. One eigendecomposition per gamma serves every fold and
    ridge.
    """
    num_subsets = y.shape[0]
    stats = []
    for fold in folds:
        count = num_subsets - fold.shape[0]
        if standardize:
            mean = (y.sum(0) - y[fold].sum(0)) / count
            second = ((y * y).sum(0) - (y[fold] ** 2).sum(0)) / count
            scale = jnp.sqrt(jnp.maximum(second - mean * mean, 0.0))
            stats.append((mean, jnp.where(scale > 0, scale, 1.0)))
        else:
            stats.append(standardization(y, False))
    rhs = jnp.concatenate([y, jnp.ones((num_subsets, 1), y.dtype)], axis=1)

    def per_gamma(gamma):
        evals, evecs = _spectrum(masks, gamma, coef0, kernel, degree)
        projected = evecs.T @ rhs

        def per_ridge(ridge):
            inv = 1.0 / (evals + ridge)
            a_rhs = evecs @ (inv[:, None] * projected)
            a_y, a_one = a_rhs[:, :-1], a_rhs[:, -1]
            values = []
            for fold, (mean, scale) in zip(folds, stats, strict=True):
                rows = evecs[fold]
                a_vv = (rows * inv) @ rows.T
                shifted = (a_y[fold] - a_one[fold][:, None] * mean) / scale
                residual = jax.scipy.linalg.solve(a_vv, shifted, assume_a="pos")
                truth = (y[fold] - mean) / scale
                values.append(criterion_values(truth, truth - residual, criterion))
            return jnp.mean(jnp.stack(values), axis=0)

        return jax.lax.map(per_ridge, ridges)

    return jax.lax.map(per_gamma, gammas)
