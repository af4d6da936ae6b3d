"""Sequential (active) selection: fit, propose by a confidence bound, score
the proposals for real, refit.

A round of :func:`sequential_selection` is four steps: the fit
(hyperparameters, the exact kernel surrogate and its posterior), the candidate
masks not scored yet, the proposal (the lowest confidence bounds) and the
user's true scoring of it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import (
    as_typed_key,
    check_masks,
    check_positive_int,
    check_scores,
)
from tasksurrogate_jax.core.surrogates import (
    fit_kernel_surrogate,
    select_kernel_hyperparameters,
)
from tasksurrogate_jax.downstream.selection import select_subset
from tasksurrogate_jax.downstream.uncertainty.objectives import (
    MODES,
    bound_terms,
    check_nonnegative_number,
    lcb_objective,
)
from tasksurrogate_jax.downstream.uncertainty.posterior import (
    KernelPosterior,
    fit_posterior,
)
from tasksurrogate_jax.truth.chunking import map_padded_chunks


class RoundRecord(NamedTuple):
    """One round of :func:`sequential_selection`.

    Attributes:
      round: 1-based round number.
      gamma, ridge: hyperparameters used this round (chosen by LOO unless fixed).
      proposed: ``[p, num_tasks]`` float masks scored this round.
      predicted: ``[p]`` weighted posterior mean at them.
      std: ``[p]`` its posterior std.
      bound: ``[p]`` the objective (confidence bound) that chose them.
      observed: ``[p]`` weighted true scores returned by ``score_fn``.
      best_value: best weighted true score after the round.
    """

    round: int
    gamma: np.ndarray
    ridge: np.ndarray
    proposed: np.ndarray
    predicted: np.ndarray
    std: np.ndarray
    bound: np.ndarray
    observed: np.ndarray
    best_value: float


class SequentialResult(NamedTuple):
    """Result of :func:`sequential_selection`.

    Attributes:
      masks: ``[m, num_tasks]`` every scored mask, initial ones first.
      scores: ``[m, num_targets]`` their true scores.
      round_index: ``[m]`` the round that scored each row (0: initial).
      best_mask: ``[num_tasks]`` the truly-scored mask with the lowest weighted
        score (ties: the first).
      best_index: its row in ``masks``.
      best_value: its weighted score.
      history: one ``RoundRecord`` per round run.
      posterior: the posterior refit on every scored row.
    """

    masks: np.ndarray
    scores: np.ndarray
    round_index: np.ndarray
    best_mask: np.ndarray
    best_index: int
    best_value: float
    history: tuple
    posterior: KernelPosterior


def _all_masks(num_tasks, lo, hi):
    """Every mask with ``lo <= size <= hi`` tasks, in order of integer code."""
    codes = np.arange(2**num_tasks, dtype=np.int64)
    masks = ((codes[:, None] >> np.arange(num_tasks)) & 1).astype(np.float64)
    sizes = masks.sum(1)
    return masks[(sizes >= lo) & (sizes <= hi)]


def _sample_masks(key, num, num_tasks, lo, hi):
    """``num`` masks: a size uniform in ``[lo, hi]``, then a uniform subset."""
    size_key, order_key = jax.random.split(key)
    sizes = np.asarray(jax.random.randint(size_key, (num,), lo, hi + 1))
    uniforms = jax.random.uniform(order_key, (num, num_tasks), jnp.float32)
    ranks = np.argsort(np.asarray(uniforms),
                       axis=1, kind="stable")
    return (np.argsort(ranks, axis=1, kind="stable") < sizes[:, None]).astype(
        np.float64)


def _flip_neighbours(masks, lo, hi):
    """Masks one task away from each row of ``masks``, within the sizes."""
    num_tasks = masks.shape[1]
    out = np.repeat(masks, num_tasks, axis=0)
    cols = np.tile(np.arange(num_tasks), masks.shape[0])
    out[np.arange(out.shape[0]), cols] = 1.0 - out[np.arange(out.shape[0]), cols]
    sizes = out.sum(1)
    return out[(sizes >= lo) & (sizes <= hi)]


def _unique_rows(masks):
    """Distinct rows in order of first occurrence."""
    if masks.shape[0] == 0:
        return masks
    _, first = np.unique(masks, axis=0, return_index=True)
    return masks[np.sort(first)]


@dataclasses.dataclass(frozen=True)
class ConfidenceBound:
    """The bound each round of :func:`sequential_selection` proposes by
    (:func:`~tasksurrogate_jax.downstream.uncertainty.objectives.lcb_objective`).

    Attributes:
      kappa: non-negative multiple of the posterior std.
      mode: ``"optimistic"`` (mean − κ·std: explores, right when the proposals
        get truly scored) or ``"pessimistic"`` (mean + κ·std).
      include_noise: the std of a new observed score rather than of the latent
        one.
    """

    kappa: float = 2.0
    mode: str = "optimistic"
    include_noise: bool = False

    def __post_init__(self):
        object.__setattr__(self, "kappa",
                           check_nonnegative_number(self.kappa, "kappa"))
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if not isinstance(self.include_noise, bool):
            raise TypeError("include_noise must be a bool, got "
                            f"{type(self.include_noise).__name__}.")


@dataclasses.dataclass(frozen=True)
class SurrogateFit:
    """How each round of :func:`sequential_selection` fits: ``(gamma, ridge)``
    by closed-form LOO (``select_kernel_hyperparameters`` over ``kernel``,
    ``gammas``, ``ridges``, ``per_target``) unless both ``gamma`` and
    ``ridge`` are fixed, then the exact kernel surrogate and its posterior
    (``fit_posterior``'s ``signal_variance``)."""

    kernel: str = "rbf"
    gammas: Any = None
    ridges: Any = None
    per_target: bool = False
    gamma: Any = None
    ridge: Any = None
    signal_variance: Any = "mle"

    def __post_init__(self):
        if (self.gamma is None) != (self.ridge is None):
            raise ValueError(
                "gamma and ridge must be given together (fixed hyperparameters) "
                "or both left None (searched each round), got "
                f"gamma={self.gamma!r}, ridge={self.ridge!r}.")

    def fit(self, masks, scores):
        """``((gamma, ridge), posterior)`` on ``masks [m, K]``, ``scores [m, T]``."""
        if self.gamma is None:
            search = select_kernel_hyperparameters(
                masks, scores, kernel=self.kernel, gammas=self.gammas,
                ridges=self.ridges, per_target=self.per_target)
            chosen = (search.gamma, search.ridge)
        else:
            chosen = (self.gamma, self.ridge)
        surrogate = fit_kernel_surrogate(masks, scores, kernel=self.kernel,
                                         gamma=chosen[0], ridge=chosen[1],
                                         solver="exact")
        posterior = fit_posterior(surrogate, masks, scores,
                                  signal_variance=self.signal_variance)
        return chosen, posterior


@dataclasses.dataclass(frozen=True, eq=False)
class CandidatePool:
    """Where each round of :func:`sequential_selection` finds its candidates.

    ``candidates`` if given; else every mask with ``min_size..max_size`` tasks
    when there are at most ``max_enumerate`` of them; else ``num_candidates``
    random masks (a fresh draw each round), plus the one-task neighbours of
    the 8 best scored masks and the beam-search optimum of the bound
    (``select_subset``, ``beam_width``).

    Attributes:
      candidates: ``[N, K]`` a fixed pool (then the sizes are unused).
      min_size, max_size: subset sizes (``max_size`` ``None``: every task).
      max_enumerate: enumerate the pool up to this many masks.
      num_candidates: random masks per round otherwise.
      beam_width: of the beam search.
      batch_size: masks per call when evaluating the bound on the pool.
    """

    candidates: Any = None
    min_size: int = 1
    max_size: int | None = None
    max_enumerate: int = 2**16
    num_candidates: int = 4096
    beam_width: int = 16
    batch_size: int = 8192

    def __post_init__(self):
        for name in ("max_enumerate", "num_candidates", "beam_width", "batch_size"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.min_size, "min_size", minimum=0)
        if self.max_size is not None:
            check_positive_int(self.max_size, "max_size", minimum=0)

    def resolve(self, num_tasks: int) -> _Pool:
        """The pool for ``num_tasks`` tasks, its fixed masks built."""
        max_size = num_tasks if self.max_size is None else self.max_size
        if not self.min_size <= max_size <= num_tasks:
            raise ValueError(
                f"need min_size <= max_size <= num_tasks, got min_size="
                f"{self.min_size}, max_size={max_size}, num_tasks={num_tasks}.")
        fixed = None
        if self.candidates is not None:
            fixed = _unique_rows(np.asarray(check_masks(
                self.candidates, "candidates", num_tasks=num_tasks), np.float64))
        elif sum(math.comb(num_tasks, s) for s in range(
                self.min_size, max_size + 1)) <= self.max_enumerate:
            fixed = _all_masks(num_tasks, self.min_size, max_size)
        return _Pool(fixed, num_tasks, self.min_size, max_size,
                     self.num_candidates, self.beam_width, self.batch_size)


class _Pool(NamedTuple):
    """A :class:`CandidatePool` resolved for ``num_tasks``: ``fixed`` ``[N, K]``
    (given or enumerated), else sampled each round around the bound's beam
    optimum."""

    fixed: np.ndarray | None
    num_tasks: int
    min_size: int
    max_size: int
    num_candidates: int
    beam_width: int
    batch_size: int

    def candidates(self, objective, masks, scores, weights, key, r):
        """``[n, K]`` candidates of round ``r`` not among the scored ``masks``
        ``[m, K]`` (``scores [m, T]``, target ``weights [T]``)."""
        if self.fixed is not None:
            pool = self.fixed
        else:
            round_key = jax.random.fold_in(key, r)
            best_rows = masks[np.argsort(scores @ weights, kind="stable")[:8]]
            beam = select_subset(objective, self.num_tasks, min_size=self.min_size,
                                 max_size=self.max_size, method="beam",
                                 beam_width=self.beam_width,
                                 batch_size=self.batch_size)
            pool = _unique_rows(np.concatenate([
                beam.mask[None].astype(np.float64),
                _flip_neighbours(best_rows, self.min_size, self.max_size),
                _sample_masks(round_key, self.num_candidates, self.num_tasks,
                              self.min_size, self.max_size)]))
        scored = {row.tobytes() for row in masks}
        fresh = np.array([row.tobytes() not in scored for row in pool], bool)
        return pool[fresh]


def _propose(objective, pool, per_round, batch_size):
    """``(order [p], bound [n], mean [n], std [n])``: the bound and its terms
    on ``pool [n, K]``, and the ``per_round`` lowest (ties: pool order)."""
    dtype = objective.weights.dtype
    bound, mean, std = (np.asarray(a, np.float64) for a in map_padded_chunks(
        partial(bound_terms, objective), jnp.asarray(pool, dtype), batch_size))
    if not np.isfinite(bound).all():
        raise ValueError("the confidence bound is not finite on the candidate "
                         "pool (a non-finite surrogate fit).")
    return np.argsort(bound, kind="stable")[:per_round], bound, mean, std


def _score(score_fn, proposed, num_targets):
    """``[p, T]`` float64 true scores of ``proposed [p, K]``, checked."""
    new_scores = score_fn(proposed.copy())
    new_scores = np.asarray(check_scores(new_scores, "score_fn's output",
                                         num_rows=proposed.shape[0]), np.float64)
    if new_scores.shape[1] != num_targets:
        raise ValueError(
            f"score_fn returned {new_scores.shape[1]} target columns, expected "
            f"{num_targets} (as in scores).")
    return new_scores


def sequential_selection(
    score_fn: Callable, masks, scores, num_tasks: int, *, rounds: int,
    per_round: int, key, target_weights=None,
    bound: ConfidenceBound = ConfidenceBound(),
    fit: SurrogateFit = SurrogateFit(), pool: CandidatePool = CandidatePool(),
) -> SequentialResult:
    """Active selection: fit, propose by a confidence bound, score, refit.

    Each round: fit the exact kernel surrogate and its posterior on every
    scored row (``fit``: ``gamma``/``ridge`` by closed-form LOO, or fixed),
    evaluate ``lcb_objective(posterior, ...)`` (``bound``, ``target_weights``)
    on the round's candidates (``pool``), take the ``per_round`` lowest
    candidates not scored yet (ties: pool order), score them with
    ``score_fn``, append. After the last round the surrogate is refit on
    everything (``SequentialResult.posterior``). The default
    ``ConfidenceBound(mode="optimistic")`` explores, which is what proposals
    that get truly scored want; the result is the best *truly scored* mask,
    never a prediction.

    Each round compiles its fit anew, for its new number of scored rows
    (measured on 2 CPU cores, K = 12, 4 per round: about 5.5 compilations
    and 0.8 s per round); the true scoring of the proposals (retraining)
    usually costs far more.

    Args:
      score_fn: ``masks [p, num_tasks] (float64 NumPy) -> scores [p, T]`` (or
        ``[p]`` for one target): the true scoring (retraining or estimation).
      masks, scores: initial scored data ``[m0, K]``, ``[m0, T]`` (``m0 >= 3``).
      num_tasks: ``K``.
      rounds: number of rounds (``>= 1``).
      per_round: masks scored per round (``>= 1``).
      key: PRNG key (used by a sampled pool only; results are deterministic
        given it).
      target_weights: ``[T]`` as in :func:`lcb_objective` (``None``: the mean).
      bound: :class:`ConfidenceBound`, the bound proposals minimise.
      fit: :class:`SurrogateFit`, each round's hyperparameters and fit.
      pool: :class:`CandidatePool`, where candidates come from.

    Returns:
      ``SequentialResult``.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}.")
    for value, name, cls in ((bound, "bound", ConfidenceBound),
                             (fit, "fit", SurrogateFit),
                             (pool, "pool", CandidatePool)):
        if not isinstance(value, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got "
                            f"{type(value).__name__}.")
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    masks = np.asarray(check_masks(masks, num_tasks=num_tasks), np.float64)
    scores = np.asarray(check_scores(scores, num_rows=masks.shape[0]), np.float64)
    if masks.shape[0] < 3:
        raise ValueError(
            f"masks must have at least 3 subsets (rows) to start, got "
            f"{masks.shape[0]}.")
    rounds = check_positive_int(rounds, "rounds")
    per_round = check_positive_int(per_round, "per_round")
    key = as_typed_key(key)
    resolved_pool = pool.resolve(num_tasks)

    round_index = np.zeros(masks.shape[0], np.int64)
    history = []
    for r in range(1, rounds + 1):
        chosen, posterior = fit.fit(masks, scores)
        objective = lcb_objective(posterior, kappa=bound.kappa, mode=bound.mode,
                                  target_weights=target_weights,
                                  include_noise=bound.include_noise)
        weights = np.asarray(objective.weights, np.float64)
        fresh = resolved_pool.candidates(objective, masks, scores, weights, key, r)
        if fresh.shape[0] == 0:
            break
        order, values, mean, std = _propose(objective, fresh, per_round,
                                            resolved_pool.batch_size)
        proposed = fresh[order]
        new_scores = _score(score_fn, proposed, scores.shape[1])
        masks = np.concatenate([masks, proposed])
        scores = np.concatenate([scores, new_scores])
        round_index = np.concatenate([round_index,
                                      np.full(proposed.shape[0], r, np.int64)])
        history.append(RoundRecord(
            round=r, gamma=np.asarray(chosen[0]), ridge=np.asarray(chosen[1]),
            proposed=proposed, predicted=mean[order], std=std[order],
            bound=values[order], observed=new_scores @ weights,
            best_value=float(np.min(scores @ weights))))

    _, posterior = fit.fit(masks, scores)
    values = scores @ weights
    best = int(np.argmin(values))
    return SequentialResult(
        masks=masks, scores=scores, round_index=round_index,
        best_mask=masks[best].copy(), best_index=best, best_value=float(values[best]),
        history=tuple(history), posterior=posterior)
