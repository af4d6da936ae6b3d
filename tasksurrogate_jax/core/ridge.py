"""The kernel ridge core shared by the exact solver (``surrogates``) and the
Nyström solver (``nystrom``).

- :class:`KernelSurrogate`, the fitted model both return, and its prediction.
- Fit inputs: masks and scores, ridges, per-target hyperparameters, target
  standardisation.
- :func:`cholesky_with_jitter` and the factorisation error, raised once per
  fit (:func:`raise_if_not_factored`).
- :func:`fit_per_pair`: the one loop over the distinct (gamma, ridge) pairs
  of per-target hyperparameters, each solved by the caller's solver.
- The pieces of both hyperparameter searches: :class:`HyperparameterSearch`,
  criteria, default grids, the choice from a criterion table, the warning
  about duplicate masks.

Imports ``_checks``, ``kernels`` and ``metrics`` only; ``nystrom`` imports
this module, ``surrogates`` this module and ``nystrom`` (no cycle).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import (
    check_bool,
    check_finite_scalar,
    check_masks,
    check_positive_int,
    check_scores,
    is_concrete,
    num_duplicate_rows,
)
from tasksurrogate_jax.core import metrics
from tasksurrogate_jax.core.kernels import (
    check_degree,
    check_kernel_name,
    kernel_from_terms,
    pairwise_terms,
)

MIN_SUBSETS = 2
MAX_JITTER_TRIES = 8
# The largest jitter, relative to the kernel's mean diagonal (at least 1), that
# is still rounding repair: beyond it the matrix is indefinite, not singular,
# and the fit would carry a ridge nobody asked for. The same bound in float32
# and float64 (float32 reaches it within the tries, float64 stops below it).
MAX_RELATIVE_JITTER = 1e-3


def pytree_dataclass(cls=None, *, meta=(), eq: bool = True):
    """Frozen dataclass registered as a pytree; ``meta`` fields are static;
    ``eq=False`` keeps identity comparison and hashing."""

    def wrap(c):
        c = dataclasses.dataclass(frozen=True, eq=eq)(c)
        fields = [f.name for f in dataclasses.fields(c)]
        return jax.tree_util.register_dataclass(
            c, data_fields=[f for f in fields if f not in meta], meta_fields=list(meta)
        )

    return wrap if cls is None else wrap(cls)


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


def check_fit_inputs(masks, scores):
    """``(masks [m, K], scores [m, T])`` checked, in their common float dtype."""
    masks = check_masks(masks)
    scores = check_scores(scores, num_rows=masks.shape[0])
    if masks.shape[0] < MIN_SUBSETS:
        raise ValueError(
            f"masks must have at least {MIN_SUBSETS} subsets (rows) to fit a "
            f"surrogate, got {masks.shape[0]}."
        )
    dtype = jnp.result_type(masks, scores)
    return masks.astype(dtype), scores.astype(dtype)


def check_kernel_inputs(masks, scores, *, kernel, degree, coef0, standardize):
    """``(masks, scores, kernel, degree, standardize)`` checked for a kernel
    fit or search; ``coef0`` must be a finite number."""
    masks, scores = check_fit_inputs(masks, scores)
    check_finite_scalar(coef0, "coef0")
    return (masks, scores, check_kernel_name(kernel), check_degree(degree),
            check_bool(standardize, "standardize"))


def check_ridge(ridge, name="ridge", *, positive=False):
    """Returns ``ridge`` (any shape) if it is a non-negative (or positive)
    finite number; traced values are only checked for their type."""
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


def check_per_target(value, name: str, num_targets: int, dtype) -> jax.Array:
    """``value`` as a scalar or ``[num_targets]`` array of ``dtype``."""
    arr = jnp.asarray(value, dtype)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != num_targets):
        raise ValueError(
            f"{name} must be a scalar or have shape [num_targets]=({num_targets},), "
            f"got shape {arr.shape}."
        )
    return arr


def standardization(scores, standardize: bool):
    """``(mean, scale)``, each ``[num_targets]``, of ``scores`` ``[m, T]``
    (a zero scale is 1); zeros and ones without ``standardize``."""
    num_targets = scores.shape[1]
    if not standardize:
        return jnp.zeros(num_targets, scores.dtype), jnp.ones(num_targets, scores.dtype)
    scale = scores.std(axis=0)
    return scores.mean(axis=0), jnp.where(scale > 0, scale, 1.0)


# ----------------------------------------------------------------------------
# The fitted model
# ----------------------------------------------------------------------------


def prediction_masks(masks, num_tasks: int, dtype) -> jax.Array:
    """``masks`` ``[n, num_tasks]`` in ``dtype`` for a prediction.

    A JAX array already of that dtype and shape is used as it is: its 0/1
    values are not checked (as under ``jit``), because the check copies the
    array to the host on every call. Anything else is checked.
    """
    if (isinstance(masks, jax.Array) and masks.dtype == dtype and masks.ndim == 2
            and masks.shape[0] > 0 and masks.shape[1] == num_tasks):
        return masks
    return check_masks(masks, num_tasks=num_tasks).astype(dtype)


@pytree_dataclass(meta=("kernel", "degree"))
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
        """Predicted scores ``[n, num_targets]`` for masks ``[n, num_tasks]``.

        One compiled program per shape. A JAX array of the surrogate's dtype is
        used as it is, without the host copy of the 0/1 check (see
        :func:`prediction_masks`): with device-resident masks the prediction
        makes no host transfer. ``block_size``: rows per block of the kernel
        matrix (``None``: as :func:`kernels.gram`).
        """
        masks = prediction_masks(masks, self.num_tasks, self.alpha.dtype)
        if block_size is not None:
            block_size = check_positive_int(block_size, "block_size")
        return _predict(self, masks, block_size)


@partial(jax.jit, static_argnums=2)
def _predict(surrogate, masks, block_size):
    """``[n, T]``: the gamma-free kernel terms once, the kernel at each of
    ``gammas`` from them, each target's columns from its own width."""
    s = surrogate
    terms = pairwise_terms(masks, s.train_masks, s.kernel, block_size)

    def product(gamma):
        return kernel_from_terms(terms, s.kernel, gamma, s.degree, s.coef0) @ s.alpha

    if s.gammas.shape[0] == 1:
        raw = product(s.gammas[0])
    else:
        def step(raw, index):
            chosen = s.gamma_index == index
            return jnp.where(chosen, product(s.gammas[index]), raw), None

        raw = jax.lax.scan(step, jnp.zeros((masks.shape[0], s.alpha.shape[1]),
                                           s.alpha.dtype),
                           jnp.arange(s.gammas.shape[0]))[0]
    return raw * s.y_scale + s.y_mean


# ----------------------------------------------------------------------------
# Factors and the loop over (gamma, ridge) pairs
# ----------------------------------------------------------------------------


def cholesky_with_jitter(k, shift, jitter):
    """Lower Cholesky factor of ``k + (shift + jitter) I`` ``[m, m]``; the
    jitter grows tenfold (up to ``MAX_JITTER_TRIES`` times, and at most to
    ``MAX_RELATIVE_JITTER`` times the mean diagonal, at least 1) while the
    factor is not finite. Returns ``(chol, used jitter, whether it is
    finite)``."""
    eye = jnp.eye(k.shape[0], dtype=k.dtype)
    scale = jnp.maximum(jnp.trace(k) / k.shape[0], 1.0)
    floor = jnp.finfo(k.dtype).eps * scale
    cap = MAX_RELATIVE_JITTER * scale

    def factor(j):
        return jnp.linalg.cholesky(k + (shift + j) * eye)

    def failed(chol):
        return ~jnp.all(jnp.isfinite(chol))

    def body(state):
        _, j, tries = state
        j = jnp.minimum(jnp.maximum(10.0 * j, floor), cap)
        return factor(j), j, tries + 1

    state = (factor(jitter), jnp.asarray(jitter, k.dtype), 0)
    chol, used, _ = jax.lax.while_loop(
        lambda s: failed(s[0]) & (s[2] < MAX_JITTER_TRIES) & (s[1] < cap),
        body, state)
    return chol, used, ~failed(chol)


def factor_error(ridge, jitter) -> ValueError:
    """The error of a kernel matrix that could not be factored."""
    return ValueError(
        "the kernel matrix could not be factored: K + (ridge + jitter) I is not "
        f"positive definite even with jitter grown to {float(jitter):.3g} "
        f"(ridge={float(ridge):.3g}; the jitter stops at {MAX_RELATIVE_JITTER:g} "
        "of the mean diagonal: beyond, the matrix is indefinite, not merely "
        "singular). Use a positive-definite kernel (rbf, laplacian) or a larger "
        "ridge."
    )


def raise_if_not_factored(ok, ridge, jitter):
    """Raises :func:`factor_error` for the first ``False`` of ``ok`` ``[G]``
    (one flag per factor, with its ``ridge`` and ``jitter`` ``[G]``).

    Concrete flags cost one device-to-host copy. Under ``jit`` a host callback
    raises; it runs only when a factor failed, so a successful fit makes no
    transfer.
    """

    def check(ok_value, ridge_value, jitter_value):
        # Host copies first: calling jax ops inside a callback can deadlock.
        ok_value = np.asarray(ok_value).reshape(-1)
        if not ok_value.all():
            bad = int(np.argmin(ok_value))
            raise factor_error(np.asarray(ridge_value).reshape(-1)[bad],
                               np.asarray(jitter_value).reshape(-1)[bad])

    if is_concrete(ok):
        if not np.asarray(ok).all():  # the values are fetched only on failure
            check(*jax.device_get((ok, ridge, jitter)))
        return
    jax.lax.cond(jnp.all(ok), lambda: None,
                 lambda: jax.debug.callback(check, ok, ridge, jitter))


class PairSolve(NamedTuple):
    """What a solver of :func:`fit_per_pair` returns for one (gamma, ridge).

    Attributes:
      alpha: ``[M, c]`` coefficients of the pair's ``c`` target columns.
      extras: arrays whose last axis is those ``c`` columns (e.g. CG
        diagnostics); ``()`` for none.
      jitter: scalar jitter the factor used.
      ok: scalar bool, whether the factor is finite.
    """

    alpha: jax.Array
    extras: tuple
    jitter: jax.Array
    ok: jax.Array


def fit_per_pair(
    solve: Callable[[jax.Array, jax.Array, np.ndarray | slice], PairSolve], *,
    train_masks, gamma, ridge, y_mean, y_scale, coef0, kernel: str, degree: int,
) -> tuple[KernelSurrogate, tuple]:
    """One solve per distinct (gamma, ridge) pair among the targets, assembled
    into a :class:`KernelSurrogate`.

    Args:
      solve: ``(gamma, ridge, columns) -> PairSolve`` for scalar ``gamma`` and
        ``ridge`` and the target ``columns`` of that pair (an index array, or
        ``slice(None)`` when one pair serves every target).
      train_masks: ``[M, num_tasks]`` the surrogate's masks (or centres).
      gamma, ridge: from :func:`check_per_target`: scalars (traced allowed)
        or ``[num_targets]`` arrays (concrete: they are grouped on the host).
      y_mean, y_scale: ``[num_targets]`` standardisation; their dtype is the fit's.
      coef0, kernel, degree: the kernel's parameters.

    Returns:
      ``(surrogate, extras)``, each of ``extras`` with its last axis
      ``[num_targets]``. Factorisation failures raise once, after every pair
      is solved (one host sync for the whole fit).
    """
    dtype = y_mean.dtype
    num_targets = y_mean.shape[0]
    if gamma.ndim == 0 and ridge.ndim == 0:
        fit = solve(gamma, ridge, slice(None))
        raise_if_not_factored(fit.ok[None], ridge[None], fit.jitter[None])
        return KernelSurrogate(
            train_masks=train_masks, alpha=fit.alpha, gammas=gamma[None],
            gamma_index=jnp.zeros(num_targets, jnp.int32),
            ridge=jnp.full(num_targets, ridge),
            jitter=jnp.full(num_targets, fit.jitter), y_mean=y_mean, y_scale=y_scale,
            coef0=coef0, kernel=kernel, degree=degree), fit.extras
    if not (is_concrete(gamma) and is_concrete(ridge)):
        raise TypeError(
            "per-target gamma or ridge arrays must be concrete (not traced inside "
            "jit); pass scalars to fit under jit.")
    gamma_t = np.broadcast_to(np.asarray(gamma), (num_targets,))
    ridge_t = np.broadcast_to(np.asarray(ridge), (num_targets,))
    gammas, gamma_index = np.unique(gamma_t, return_inverse=True)
    alpha = extras = None
    jitter = jnp.zeros(num_targets, dtype)
    oks, pair_ridges, pair_jitters = [], [], []
    for g, r in sorted(set(zip(gamma_t.tolist(), ridge_t.tolist(), strict=True))):
        columns = np.nonzero((gamma_t == g) & (ridge_t == r))[0]
        fit = solve(jnp.asarray(g, dtype), jnp.asarray(r, dtype), columns)
        if alpha is None:
            alpha = _zeros_over_targets(fit.alpha, num_targets)
            extras = tuple(_zeros_over_targets(e, num_targets) for e in fit.extras)
        alpha = alpha.at[..., columns].set(fit.alpha)
        extras = tuple(e.at[..., columns].set(new)
                       for e, new in zip(extras, fit.extras, strict=True))
        jitter = jitter.at[columns].set(fit.jitter)
        oks.append(fit.ok)
        pair_ridges.append(r)
        pair_jitters.append(fit.jitter)
    raise_if_not_factored(jnp.stack(oks), np.asarray(pair_ridges),
                          jnp.stack(pair_jitters))
    return KernelSurrogate(
        train_masks=train_masks, alpha=alpha, gammas=jnp.asarray(gammas, dtype),
        gamma_index=jnp.asarray(gamma_index.reshape(-1), jnp.int32),
        ridge=jnp.asarray(ridge_t, dtype), jitter=jitter, y_mean=y_mean,
        y_scale=y_scale, coef0=coef0, kernel=kernel, degree=degree), extras


def _zeros_over_targets(x, num_targets):
    return jnp.zeros((*x.shape[:-1], num_targets), x.dtype)


# ----------------------------------------------------------------------------
# Hyperparameter searches
# ----------------------------------------------------------------------------


@pytree_dataclass(meta=("criterion", "method"))
class HyperparameterSearch:
    """Result of ``surrogates.select_kernel_hyperparameters`` (and of
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

DEFAULT_CRITERION = "mse"
"""The criterion of every hyperparameter search by default (as in the pipeline);
see ``surrogates.select_kernel_hyperparameters``."""


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

    This is the grid ``surrogates.select_kernel_hyperparameters`` and
    ``nystrom.select_nystrom_hyperparameters`` search when ``ridges=None``
    (the former also drops what the precision warning of a non-RBF kernel,
    whose diagonal is not 1, would flag): a default never trips the warning.
    """
    grid = 10.0 ** np.arange(-4, 2)
    if num_subsets is None or dtype is None:
        return grid
    eps = np.finfo(jax.dtypes.canonicalize_dtype(dtype)).eps
    return ridges_at_least(grid, 10 * float(eps) * num_subsets, dtype)


def ridges_at_least(grid, threshold, dtype) -> np.ndarray:
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


def check_grid(grid, name: str):
    """Raises unless ``grid`` (an array) is 1-D; returns it."""
    if grid.ndim != 1:
        raise ValueError(f"{name} must be a 1-D grid, got shape {grid.shape}.")
    return grid


def check_search_options(method, methods, criterion, scores, per_target):
    """``(criterion, per_target)`` checked; ``method`` must be one of ``methods``."""
    if not isinstance(method, str) or method not in methods:
        raise ValueError(
            f"method must be {' or '.join(map(repr, methods))}, got {method!r}.")
    return check_criterion(criterion, scores), check_bool(per_target, "per_target")


def check_num_folds(num_folds, num_subsets: int) -> int:
    """``num_folds``, at least 2 and at most ``num_subsets // 2`` (two rows
    per fold)."""
    num_folds = check_positive_int(num_folds, "num_folds", minimum=2)
    if num_folds > num_subsets // 2:
        raise ValueError(
            f"num_folds={num_folds} needs at least {2 * num_folds} subsets (two "
            f"per fold), got {num_subsets}.")
    return num_folds


def check_criterion(criterion, scores) -> str:
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


def criterion_values(truth, predicted, criterion):
    """``[num_targets]`` held-out criterion of ``predicted`` ``[n, T]``."""
    if criterion == "mse":
        return jnp.mean((predicted - truth) ** 2, axis=0)
    return metrics.spearman(truth, predicted)


def search_result(table, gammas, ridges, *, criterion: str, method: str,
                  per_target: bool) -> HyperparameterSearch:
    """The search over ``gammas`` ``[G]`` and ``ridges`` ``[R]`` whose
    criterion is ``table`` ``[G, R, num_targets]``: the best setting (per
    target with ``per_target``)."""
    gamma, ridge, mean_table = _choose_hyperparameters(table, gammas, ridges,
                                                       criterion, per_target)
    return HyperparameterSearch(gamma=gamma, ridge=ridge, gammas=gammas, ridges=ridges,
                                table=table, mean_table=mean_table,
                                criterion=criterion, method=method)


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


class DuplicateMasksWarning(UserWarning):
    """Masks given to a held-out criterion repeat rows: a held-out mask's copies
    stay in the training rows, so the criterion leaks (filter it with
    ``warnings.filterwarnings("ignore", category=DuplicateMasksWarning)`` when
    the repetition is intended)."""


def warn_if_duplicate_masks(
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
