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
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax import metrics
from tasksurrogate_jax._checks import (
    check_bool,
    check_finite_scalar,
    check_key,
    check_masks,
    check_positive_int,
    check_scores,
    is_concrete,
    num_duplicate_rows,
)
from tasksurrogate_jax.kernels import (
    check_degree,
    check_gamma,
    check_kernel_name,
    gram,
)

MIN_SUBSETS = 2
MAX_JITTER_TRIES = 8


def _pytree_dataclass(cls=None, *, meta=(), eq: bool = True):
    """Frozen dataclass registered as a pytree; ``meta`` fields are static;
    ``eq=False`` keeps identity comparison and hashing."""

    def wrap(c):
        c = dataclasses.dataclass(frozen=True, eq=eq)(c)
        fields = [f.name for f in dataclasses.fields(c)]
        return jax.tree_util.register_dataclass(
            c, data_fields=[f for f in fields if f not in meta], meta_fields=list(meta)
        )

    return wrap if cls is None else wrap(cls)


def _check_fit_inputs(masks, scores):
    masks = check_masks(masks)
    scores = check_scores(scores, num_rows=masks.shape[0])
    if masks.shape[0] < MIN_SUBSETS:
        raise ValueError(
            f"masks must have at least {MIN_SUBSETS} subsets (rows) to fit a "
            f"surrogate, got {masks.shape[0]}."
        )
    dtype = jnp.result_type(masks, scores)
    return masks.astype(dtype), scores.astype(dtype)


def _check_ridge(ridge, name="ridge", *, positive=False):
    if isinstance(ridge, (bool, str)) or ridge is None:
        raise TypeError(f"{name} must be a number, got {ridge!r}.")
    if is_concrete(ridge):
        values = np.asarray(ridge)
        if not np.issubdtype(values.dtype, np.number):
            raise TypeError(f"{name} must be a number, got {ridge!r}.")
        bad = ~np.isfinite(values) | ((values <= 0) if positive else (values < 0))
        if bad.any():
            expected = "positive" if positive else "non-negative"
            raise ValueError(f"{name} must be {expected} and finite, got {ridge!r}.")
    return ridge


# ----------------------------------------------------------------------------
# Linear surrogate
# ----------------------------------------------------------------------------


@_pytree_dataclass
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
        masks = check_masks(masks, num_tasks=self.num_tasks)
        return masks.astype(self.coef.dtype) @ self.coef + self.intercept


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
    masks, scores = _check_fit_inputs(masks, scores)
    ridge = _check_ridge(ridge)
    fit_intercept = check_bool(fit_intercept, "fit_intercept")
    if rcond is None:
        rcond = jnp.finfo(masks.dtype).eps * max(masks.shape)
    else:
        _check_ridge(rcond, "rcond")
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


@_pytree_dataclass(meta=("kernel", "degree"))
class KernelSurrogate:
    """Kernel ridge regression over subset masks.

    Targets may carry their own hyperparameters: target ``t`` uses width
    ``gammas[gamma_index[t]]`` and penalty ``ridge[t]``.

    Attributes:
      train_masks: ``[num_subsets, num_tasks]`` masks the surrogate was fit on.
      alpha: ``[num_subsets, num_targets]`` dual coefficients.
      gammas: ``[num_gammas]`` distinct kernel widths.
      gamma_index: ``[num_targets]`` int index into ``gammas``.
      ridge: ``[num_targets]`` ridge penalty per target.
      jitter: ``[num_targets]`` diagonal jitter actually added.
      y_mean, y_scale: ``[num_targets]`` target standardisation (0 and 1 if off).
      coef0: polynomial offset.
      kernel: kernel name (static).
      degree: polynomial degree (static).
    """

    train_masks: jax.Array
    alpha: jax.Array
    gammas: jax.Array
    gamma_index: jax.Array
    ridge: jax.Array
    jitter: jax.Array
    y_mean: jax.Array
    y_scale: jax.Array
    coef0: jax.Array
    kernel: str = "rbf"
    degree: int = 3

    @property
    def num_tasks(self) -> int:
        return self.train_masks.shape[1]

    @property
    def gamma(self) -> jax.Array:
        """``[num_targets]`` kernel width of each target."""
        return self.gammas[self.gamma_index]

    def predict(self, masks, *, block_size: int | None = None) -> jax.Array:
        """Predicted scores ``[n, num_targets]`` for masks ``[n, num_tasks]``."""
        masks = check_masks(masks, num_tasks=self.num_tasks)
        masks = masks.astype(self.alpha.dtype)

        def one_gamma(g):
            k = gram(masks, self.train_masks, kernel=self.kernel, gamma=g,
                     degree=self.degree, coef0=self.coef0, block_size=block_size)
            return k @ self.alpha

        if self.gammas.shape[0] == 1:
            raw = one_gamma(self.gammas[0])
        else:
            per_gamma = jax.lax.map(one_gamma, self.gammas)  # [G, n, T]
            raw = jnp.take_along_axis(
                per_gamma, self.gamma_index[None, None, :], axis=0
            )[0]
        return raw * self.y_scale + self.y_mean


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
    masks, scores = _check_fit_inputs(masks, scores)
    standardize = check_bool(standardize, "standardize")
    check_kernel_name(kernel)
    degree = check_degree(degree)
    check_finite_scalar(coef0, "coef0")
    if _resolve_solver(solver, masks.shape[0], num_centers, key) == "nystrom":
        from tasksurrogate_jax import nystrom  # nystrom imports this module

        if key is None:
            key = jax.random.key(NYSTROM_DEFAULT_SEED)
        if not (is_concrete(masks) and is_concrete(scores)):
            raise TypeError(
                "solver='nystrom' needs concrete masks and scores (not traced inside "
                "jit); use solver='exact' under jit.")
        _check_ridge(ridge, positive=True)
        return nystrom.fit_nystrom_surrogate(
            masks, scores, num_centers=num_centers, key=key, kernel=kernel,
            gamma=gamma, ridge=ridge, degree=degree, coef0=coef0,
            standardize=standardize).surrogate
    kernel = check_kernel_name(kernel)
    gamma = check_gamma(gamma, masks.shape[1])
    ridge = _check_ridge(ridge)
    _check_ridge(jitter, "jitter")
    dtype = masks.dtype
    num_targets = scores.shape[1]
    y_mean, y_scale = _standardization(scores, standardize)
    y = (scores - y_mean) / y_scale
    gamma_arr, ridge_arr = jnp.asarray(gamma, dtype), jnp.asarray(ridge, dtype)
    for name, arr in (("gamma", gamma_arr), ("ridge", ridge_arr)):
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != num_targets):
            raise ValueError(
                f"{name} must be a scalar or have shape [num_targets]=({num_targets},)"
                f", got shape {arr.shape}."
            )
    coef0 = jnp.asarray(coef0, dtype)
    jitter = jnp.asarray(jitter, dtype)

    if gamma_arr.ndim == 0 and ridge_arr.ndim == 0:
        alpha, used_jitter, ok = _fit_kernel_single(
            masks, y, gamma_arr, ridge_arr, coef0, jitter, kernel, degree)
        _raise_if_not_factored(ok, ridge_arr, used_jitter)
        return KernelSurrogate(
            train_masks=masks, alpha=alpha, gammas=gamma_arr[None],
            gamma_index=jnp.zeros(num_targets, jnp.int32),
            ridge=jnp.full(num_targets, ridge_arr),
            jitter=jnp.full(num_targets, used_jitter),
            y_mean=y_mean, y_scale=y_scale, coef0=coef0, kernel=kernel, degree=degree)

    # Per-target hyperparameters: one factorisation per distinct (gamma, ridge),
    # each solved for every column (fixed shapes: one compilation), keeping the
    # columns of that group.
    if not (is_concrete(gamma_arr) and is_concrete(ridge_arr)):
        raise TypeError(
            "per-target gamma or ridge arrays must be concrete (not traced inside "
            "jit); pass scalars to fit under jit."
        )
    gamma_t = np.broadcast_to(np.asarray(gamma_arr), (num_targets,))
    ridge_t = np.broadcast_to(np.asarray(ridge_arr), (num_targets,))
    gammas, gamma_index = np.unique(gamma_t, return_inverse=True)
    alpha = jnp.zeros_like(y)
    jitter_t = jnp.zeros(num_targets, dtype)
    for g, r in sorted(set(zip(gamma_t.tolist(), ridge_t.tolist(), strict=True))):
        group = jnp.asarray((gamma_t == g) & (ridge_t == r))
        a, used, ok = _fit_kernel_single(
            masks, y, jnp.asarray(g, dtype), jnp.asarray(r, dtype), coef0, jitter,
            kernel, degree)
        _raise_if_not_factored(ok, r, used)
        alpha = jnp.where(group[None, :], a, alpha)
        jitter_t = jnp.where(group, used, jitter_t)
    return KernelSurrogate(
        train_masks=masks, alpha=alpha, gammas=jnp.asarray(gammas, dtype),
        gamma_index=jnp.asarray(gamma_index.reshape(-1), jnp.int32),
        ridge=jnp.asarray(ridge_t, dtype), jitter=jitter_t, y_mean=y_mean,
        y_scale=y_scale, coef0=coef0, kernel=kernel, degree=degree)


def _standardization(scores, standardize):
    num_targets = scores.shape[1]
    if not standardize:
        return jnp.zeros(num_targets, scores.dtype), jnp.ones(num_targets, scores.dtype)
    scale = scores.std(axis=0)
    return scores.mean(axis=0), jnp.where(scale > 0, scale, 1.0)


@partial(jax.jit, static_argnums=(6, 7))
def _fit_kernel_single(masks, y, gamma, ridge, coef0, jitter, kernel, degree):
    """Solves ``(K + (ridge + jitter) I) alpha = y`` by Cholesky, growing jitter."""
    k = gram(masks, masks, kernel=kernel, gamma=gamma, degree=degree, coef0=coef0)
    chol, used_jitter, ok = _cholesky_with_jitter(k, ridge, jitter)
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    return alpha, used_jitter, ok


def _cholesky_with_jitter(k, shift, jitter):
    """Cholesky of ``k + (shift + jitter) I``; jitter x10 while not finite."""
    eye = jnp.eye(k.shape[0], dtype=k.dtype)
    floor = jnp.finfo(k.dtype).eps * jnp.maximum(jnp.trace(k) / k.shape[0], 1.0)

    def factor(j):
        return jnp.linalg.cholesky(k + (shift + j) * eye)

    def failed(chol):
        return ~jnp.all(jnp.isfinite(chol))

    def body(state):
        _, j, tries = state
        j = jnp.maximum(10.0 * j, floor)
        return factor(j), j, tries + 1

    state = (factor(jitter), jitter, 0)
    chol, used, _ = jax.lax.while_loop(
        lambda s: failed(s[0]) & (s[2] < MAX_JITTER_TRIES), body, state)
    return chol, used, ~failed(chol)


def _factor_error(ridge, jitter) -> ValueError:
    return ValueError(
        "the kernel matrix could not be factored: K + (ridge + jitter) I is not "
        f"positive definite even with jitter grown to {float(jitter):.3g} "
        f"(ridge={float(ridge):.3g}). Use a positive-definite kernel (rbf, "
        "laplacian) or a larger ridge."
    )


def _raise_if_not_factored(ok, ridge, jitter):
    if is_concrete(ok):
        if not bool(ok):
            raise _factor_error(ridge, jitter)
        return

    def check(ok_value, ridge_value, jitter_value):
        # Host copies first: calling jax ops inside a callback can deadlock.
        if not np.asarray(ok_value).all():
            raise _factor_error(np.asarray(ridge_value).max(),
                                np.asarray(jitter_value).max())

    jax.debug.callback(check, ok, ridge, jitter)


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


@_pytree_dataclass(meta=("criterion", "method"))
class HyperparameterSearch:
    """Result of ``select_kernel_hyperparameters`` (and of
    ``nystrom.select_nystrom_hyperparameters``).

    Attributes:
      gamma: chosen width: a scalar, or ``[num_targets]`` with ``per_target``.
      ridge: chosen penalty, shaped like ``gamma``.
      gammas: ``[num_gammas]`` grid.
      ridges: ``[num_ridges]`` grid.
      table: ``[num_gammas, num_ridges, num_targets]`` criterion per target.
      mean_table: ``[num_gammas, num_ridges]`` criterion averaged over targets.
      criterion: ``"spearman"`` (higher is better; the default of both
        searches) or ``"mse"`` (lower is better).
      method: ``"loo"`` or ``"kfold"`` (``"holdout"`` or ``"kfold"`` for
        the Nyström search).
    """

    gamma: jax.Array
    ridge: jax.Array
    gammas: jax.Array
    ridges: jax.Array
    table: jax.Array
    mean_table: jax.Array
    criterion: str
    method: str


CRITERIA = ("spearman", "mse")

DEFAULT_CRITERION = "spearman"
"""The criterion of every hyperparameter search by default (as in the pipeline);
see :func:`select_kernel_hyperparameters`."""


def default_gamma_grid(num_tasks: int) -> np.ndarray:
    """Six widths around the reference ``1 / num_tasks``: ``2^{-2..3} / num_tasks``."""
    return 2.0 ** np.arange(-2, 4) / num_tasks


def default_ridge_grid(num_subsets: int | None = None, dtype=None) -> np.ndarray:
    """Six penalties ``10^{-4..1}``; given ``num_subsets`` and a float ``dtype``,
    only those above the rounding error of an RBF kernel matrix's eigenvalues
    (``10 eps m``, the threshold of the precision warning), in the dtype the
    fit computes in (float64 is float32 without ``jax_enable_x64``). When no
    grid value is that large (float32 beyond about 8 million subsets), the
    smallest power of ten above the threshold.

    This is the grid :func:`select_kernel_hyperparameters` and
    :func:`nystrom.select_nystrom_hyperparameters` search when ``ridges=None``
    (the former also drops what the precision warning of a non-RBF kernel,
    whose diagonal is not 1, would flag): a default never trips the warning.
    """
    grid = 10.0 ** np.arange(-4, 2)
    if num_subsets is None or dtype is None:
        return grid
    eps = np.finfo(jax.dtypes.canonicalize_dtype(dtype)).eps
    return _ridges_at_least(grid, 10 * float(eps) * num_subsets, dtype)


def _ridges_at_least(grid, threshold, dtype) -> np.ndarray:
    """The values of ``grid`` that, rounded to ``dtype``, are at least
    ``threshold``; else the smallest such power of ten."""
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    kept = grid[np.asarray(grid, dtype) >= threshold]
    if kept.size:
        return kept
    value = 10.0 ** np.ceil(np.log10(threshold))
    while np.asarray(value, dtype) < threshold:
        value *= 10.0
    return np.array([value])


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

    The default criterion is ``"spearman"`` (:data:`DEFAULT_CRITERION`), the
    pipeline's: what the surrogate is used for (LOO effects, subset selection)
    depends on how it ranks subsets, not on its squared error, and MSE favours
    the smooth fits that get the overall level right while flattening the
    ranking. Measured (issue 23): the kernel chosen by MSE reached a
    leave-one-out per-target Spearman of 0.72, the one chosen by Spearman
    0.87. Pass ``criterion="mse"`` for the squared-error choice (the
    reference code's).

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
      criterion: ``"spearman"`` (default: Spearman between held-out
        predictions and truth, averaged over targets; see above) or ``"mse"``
        (mean squared error of held-out predictions, averaged over targets).
        A target whose criterion is NaN everywhere (constant scores under
        Spearman) gets the setting chosen for all targets.
      per_target: choose a setting per target instead of one for all.
      standardize: see above.

    Returns:
      ``HyperparameterSearch``; feed ``gamma`` and ``ridge`` to
      ``fit_kernel_surrogate``.
    """
    masks, scores = _check_fit_inputs(masks, scores)
    kernel = check_kernel_name(kernel)
    if not isinstance(method, str) or method not in ("loo", "kfold"):
        raise ValueError(f"method must be 'loo' or 'kfold', got {method!r}.")
    criterion = _check_criterion(criterion, scores)
    per_target = check_bool(per_target, "per_target")
    standardize = check_bool(standardize, "standardize")
    degree = check_degree(degree)
    check_finite_scalar(coef0, "coef0")
    dtype = masks.dtype
    num_subsets = masks.shape[0]
    gammas = default_gamma_grid(masks.shape[1]) if gammas is None else gammas
    gammas = jnp.atleast_1d(jnp.asarray(check_gamma(gammas, 1, "gammas"), dtype))
    if gammas.ndim != 1:
        raise ValueError(f"gammas must be a 1-D grid, got shape {gammas.shape}.")
    coef0 = jnp.asarray(coef0, dtype)
    resolution = _ridge_resolution(masks, gammas, coef0, kernel, degree)
    if ridges is None:
        ridges = default_ridge_grid(num_subsets, dtype)
        if resolution is not None:
            ridges = _ridges_at_least(ridges, resolution, dtype)
    ridges = jnp.atleast_1d(jnp.asarray(_check_ridge(ridges, "ridges", positive=True),
                                        dtype))
    if ridges.ndim != 1:
        raise ValueError(f"ridges must be a 1-D grid, got shape {ridges.shape}.")
    _warn_if_ridge_below_precision(ridges, resolution, dtype)
    _warn_if_duplicate_masks(masks, f"method={method!r}")

    if method == "loo":
        if num_subsets < 3:
            raise ValueError(
                "masks must have at least 3 subsets for leave-one-out, got "
                f"{num_subsets}."
            )
        y_mean, y_scale = _standardization(scores, standardize)
        table = _loo_table(masks, (scores - y_mean) / y_scale, gammas, ridges, coef0,
                           kernel, degree, criterion)
    else:
        num_folds = check_positive_int(num_folds, "num_folds", minimum=2)
        if num_folds > num_subsets // 2:
            raise ValueError(
                f"num_folds={num_folds} needs at least {2 * num_folds} subsets (two "
                f"per fold), got {num_subsets}."
            )
        order = np.arange(num_subsets)
        if key is not None:
            order = np.asarray(jax.random.permutation(check_key(key), num_subsets))
        folds = [jnp.asarray(fold) for fold in np.array_split(order, num_folds)]
        table = _kfold_table(masks, scores, folds, gammas, ridges, coef0, kernel,
                             degree, criterion, standardize)

    gamma, ridge, mean_table = _choose_hyperparameters(table, gammas, ridges,
                                                       criterion, per_target)
    return HyperparameterSearch(gamma=gamma, ridge=ridge, gammas=gammas, ridges=ridges,
                                table=table, mean_table=mean_table,
                                criterion=criterion, method=method)


def _check_criterion(criterion, scores) -> str:
    """``criterion`` if valid; Spearman also needs scores that vary."""
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"criterion must be 'mse' or 'spearman', got {criterion!r}.")
    if criterion == "spearman" and is_concrete(scores):
        values = np.asarray(scores)
        if (values == values[:1]).all():
            raise ValueError(
                "scores are constant in every target column: criterion='spearman' "
                "ranks held-out predictions against them and is undefined; use "
                "criterion='mse' or scores that vary.")
    return criterion


def _choose_hyperparameters(table, gammas, ridges, criterion, per_target):
    """``(gamma, ridge, mean_table)`` best by ``criterion`` in ``table``
    ``[num_gammas, num_ridges, num_targets]``; NaN cells are ignored, and a
    target whose cells are all NaN gets the setting best for the mean."""
    better = jnp.nanargmin if criterion == "mse" else jnp.nanargmax
    mean_table = jnp.nanmean(table, axis=-1)
    if is_concrete(mean_table) and np.isnan(np.asarray(mean_table)).all():
        raise ValueError(
            f"the {criterion} criterion is NaN at every (gamma, ridge) of the grid "
            "(e.g. Spearman of held-out predictions that are constant): no setting "
            "can be chosen. Check the scores, or use criterion='mse'.")
    num_ridges = ridges.shape[0]
    best = better(mean_table.reshape(-1))
    if per_target:
        flat = table.reshape(-1, table.shape[-1])
        best = jnp.where(jnp.all(jnp.isnan(flat), axis=0), best,
                         better(flat, axis=0))
    return gammas[best // num_ridges], ridges[best % num_ridges], mean_table


def _ridge_resolution(masks, gammas, coef0, kernel, degree):
    """``10 eps max_gamma trace(K)``: the rounding error of the kernel matrix's
    eigenvalues in the masks' dtype (``10 eps m`` for rbf and laplacian);
    ``None`` under ``jit`` (the values are not known at trace time)."""
    if not (is_concrete(masks) and is_concrete(gammas) and is_concrete(coef0)):
        return None
    eps = float(jnp.finfo(masks.dtype).eps)
    if kernel in ("rbf", "laplacian"):
        return 10 * eps * masks.shape[0]

    def trace(gamma):
        diag = jax.vmap(lambda x: gram(x[None], x[None], kernel=kernel, gamma=gamma,
                                       degree=degree, coef0=coef0)[0, 0])(masks)
        return jnp.sum(jnp.abs(diag))

    return 10 * eps * max(float(trace(g)) for g in gammas)


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


class DuplicateMasksWarning(UserWarning):
    """Masks given to a held-out criterion repeat rows: a held-out mask's copies
    stay in the training rows, so the criterion leaks (filter it with
    ``warnings.filterwarnings("ignore", category=DuplicateMasksWarning)`` when
    the repetition is intended)."""


def _warn_if_duplicate_masks(
        masks, what: str,
        consequence: str = "the criterion rewards interpolation (the smallest "
                           "ridges)"):
    """Warns when concrete ``masks`` repeat rows, which held-out criteria leak."""
    count = num_duplicate_rows(masks)
    if count:
        warnings.warn(
            f"masks holds {count} duplicate rows (equal to an earlier row): with "
            f"{what} a held-out mask's copies stay in the training rows, so "
            f"{consequence}. Average the scores of each distinct mask first "
            "(subsets.unique_masks).",
            DuplicateMasksWarning, stacklevel=3)


def _criterion_values(truth, predicted, criterion):
    """``[num_targets]`` held-out criterion."""
    if criterion == "mse":
        return jnp.mean((predicted - truth) ** 2, axis=0)
    return metrics.spearman(truth, predicted)


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
            return _criterion_values(y, loo_prediction, criterion)

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
    masks, scores = _check_fit_inputs(masks, scores)
    kernel = check_kernel_name(kernel)
    degree = check_degree(degree)
    check_finite_scalar(coef0, "coef0")
    dtype = masks.dtype
    gamma = jnp.asarray(check_gamma(gamma, masks.shape[1]), dtype)
    ridge = jnp.asarray(_check_ridge(ridge, "ridge", positive=True), dtype)
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
            stats.append(_standardization(y, False))
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
                values.append(_criterion_values(truth, truth - residual, criterion))
            return jnp.mean(jnp.stack(values), axis=0)

        return jax.lax.map(per_ridge, ridges)

    return jax.lax.map(per_gamma, gammas)
