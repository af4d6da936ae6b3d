"""Best subset of tasks under a fitted surrogate, or under any objective.

Scores are losses: lower is better, and every search here minimises. The
feasible subsets of ``num_tasks`` tasks are those that

- hold every task in ``required`` and no task in ``excluded``;
- have exactly ``size`` tasks, or between ``min_size`` and ``max_size``.

Methods of :func:`select_subset`:

- ``"exhaustive"``: scores every feasible subset; the optimum is exact.
- ``"greedy"``: starts from ``required`` and adds, one at a time, the task that
  gives the lowest objective.
- ``"beam"``: greedy that keeps the ``beam_width`` best distinct subsets of
  each size (greedy is ``beam_width=1``).
- ``"auto"``: exhaustive when there are at most ``max_exhaustive`` feasible
  subsets, beam otherwise.

The objective is called inside one ``jax.jit`` on chunks of masks
``[chunk, num_tasks]``, built on the device from ``[chunk, width]`` arrays of
task indices. The last chunk of each batch is padded by repeating its last row,
so all the calls of one search have the same shape and compile once. An
exhaustive search keeps its running best on the device and reads it back once.

Each chunk is split over the devices of a mesh (``mesh``, see
:mod:`tasksurrogate_jax.truth.sharding`; default: every device) along its rows, the
objective's arrays replicated; ``jax.jit`` partitions the call (GSPMD), so any
traceable objective gives the same result as on one device. Chunks are padded
to a multiple of the device count.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import check_positive_int, is_concrete
from tasksurrogate_jax.core.surrogates import (
    KernelSurrogate,
    LinearSurrogate,
    check_surrogate,
    surrogate_coefficients,
)
from tasksurrogate_jax.truth import sharding
from tasksurrogate_jax.truth.chunking import pad_rows

METHODS = ("auto", "exhaustive", "greedy", "beam")


class SelectionResult(NamedTuple):
    """Result of :func:`select_subset`.

    Attributes:
      mask: ``[num_tasks]`` float32 0/1, the chosen subset.
      indices: the chosen task indices, sorted.
      predicted: the objective's value at ``mask``.
      method: the method actually used: ``"exhaustive"``, ``"greedy"`` or
        ``"beam"`` (``"auto"`` resolves to one of them).
      num_evaluated: the number of masks scored (chunk padding not counted).
    """

    mask: np.ndarray
    indices: tuple[int, ...]
    predicted: float
    method: str
    num_evaluated: int


# ----------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------


@partial(jax.tree_util.register_dataclass, data_fields=["surrogate", "weights"],
         meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class SurrogateObjective:
    """``masks [n, num_tasks] -> [n]``: weighted mean of a surrogate's targets.

    A pytree: its arrays enter ``jax.jit`` as arguments, not as constants.

    Attributes:
      surrogate: a fitted ``LinearSurrogate`` or ``KernelSurrogate``.
      weights: ``[num_targets]`` non-negative target weights summing to 1.
    """

    surrogate: LinearSurrogate | KernelSurrogate
    weights: jax.Array

    @property
    def num_tasks(self) -> int:
        return self.surrogate.num_tasks

    def __call__(self, masks) -> jax.Array:
        """Objective values ``[n]`` for masks ``[n, num_tasks]``."""
        return self.surrogate.predict(masks) @ self.weights


def surrogate_objective(surrogate, *, target_weights=None) -> SurrogateObjective:
    """The objective ``masks -> weighted mean over targets of surrogate.predict``.

    Args:
      surrogate: a fitted ``LinearSurrogate`` or ``KernelSurrogate``.
      target_weights: ``[num_targets]`` non-negative, finite, with a positive
        sum (normalised to sum to 1); ``None`` is the uniform mean.

    Returns:
      ``SurrogateObjective``, a callable mapping masks ``[n, num_tasks]`` to
      ``[n]``.
    """
    check_surrogate(surrogate)
    arrays = surrogate_coefficients(surrogate)
    num_targets = arrays.shape[1]
    if target_weights is None:
        weights = np.full(num_targets, 1.0 / num_targets)
    else:
        if not is_concrete(target_weights):
            raise TypeError(
                "target_weights must be concrete (not traced inside jit): build the "
                "objective outside jit."
            )
        if isinstance(target_weights, (str, bytes)):
            raise TypeError(
                f"target_weights must be a numeric array, got {target_weights!r}."
            )
        try:
            weights = np.asarray(target_weights, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                "target_weights must be a numeric array of shape [num_targets], got "
                f"{type(target_weights).__name__}."
            ) from err
        if weights.shape != (num_targets,):
            raise ValueError(
                f"target_weights must have shape [num_targets]=({num_targets},), got "
                f"shape {weights.shape}."
            )
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(
                "target_weights must be finite and non-negative, got "
                f"{weights.tolist()}."
            )
        if weights.sum() <= 0:
            raise ValueError(
                "target_weights must have a positive sum (at least one target with "
                f"weight > 0), got {weights.tolist()}."
            )
        weights = weights / weights.sum()
    # An explicit upload: the weights are host values, put once per objective.
    return SurrogateObjective(
        surrogate=surrogate,
        weights=jax.device_put(np.asarray(weights, np.dtype(arrays.dtype))))


class _ByIdentity:
    """Wraps an unhashable callable so that ``jit`` can take it as static."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, masks):
        return self.fn(masks)


def _objective_parts(objective, num_tasks: int):
    """Splits ``objective`` into ``(static callable, dynamic pytree, mask dtype)``.

    Exactly one of the first two is ``None``: surrogates travel as pytrees (their
    arrays are ``jit`` arguments), other callables as static arguments.
    """
    if isinstance(objective, (LinearSurrogate, KernelSurrogate)):
        objective = surrogate_objective(objective)
    if isinstance(objective, SurrogateObjective):
        if objective.num_tasks != num_tasks:
            raise ValueError(
                f"objective is a surrogate over {objective.num_tasks} tasks, but "
                f"num_tasks={num_tasks}; pass num_tasks={objective.num_tasks}."
            )
        return None, objective, objective.weights.dtype
    if not callable(objective):
        raise TypeError(
            "objective must be a fitted LinearSurrogate / KernelSurrogate or a "
            "callable mapping masks [n, num_tasks] to scores [n], got "
            f"{type(objective).__name__}."
        )
    try:
        hash(objective)
    except TypeError:
        objective = _ByIdentity(objective)
    return objective, None, jnp.result_type(float)


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------


def _check_indices(values, name: str, num_tasks: int) -> tuple[int, ...]:
    """Sorted distinct task indices in ``[0, num_tasks)``, or raises naming them."""
    if isinstance(values, (int, np.integer, str, bytes)) or values is None:
        raise TypeError(
            f"{name} must be a sequence of task indices (e.g. (0, 3)), got "
            f"{values!r}."
        )
    try:
        items = list(values)
    except TypeError as err:
        raise TypeError(
            f"{name} must be a sequence of task indices, got {type(values).__name__}."
        ) from err
    out = []
    for item in items:
        if isinstance(item, (bool, np.bool_)) or not isinstance(
                item, (int, np.integer)):
            raise TypeError(f"{name} must hold ints (task indices), got {item!r}.")
        if not 0 <= item < num_tasks:
            raise ValueError(
                f"{name} holds task index {int(item)}, out of range for "
                f"num_tasks={num_tasks} (expected 0 <= index < {num_tasks})."
            )
        out.append(int(item))
    duplicated = sorted({i for i in out if out.count(i) > 1})
    if duplicated:
        raise ValueError(f"{name} holds duplicated task indices {duplicated}.")
    return tuple(sorted(out))


def _check_sizes(size, min_size, max_size, *, num_required: int,
                 num_allowed: int) -> tuple[int, int]:
    """Resolves the size constraint to an inclusive range ``(lo, hi)``."""
    allowed = (f"the number of allowed tasks ({num_allowed}: num_tasks minus "
               "excluded)")
    if size is not None:
        size = check_positive_int(size, "size", minimum=0)
        if min_size != 1 and min_size != size:
            raise ValueError(
                f"size={size} and min_size={min_size} conflict: give either size "
                "(exactly that many tasks) or min_size/max_size (a range)."
            )
        if max_size is not None and max_size != size:
            raise ValueError(
                f"size={size} and max_size={max_size} conflict: give either size "
                "(exactly that many tasks) or min_size/max_size (a range)."
            )
        if size > num_allowed:
            raise ValueError(f"size={size} is larger than {allowed}.")
        if size < num_required:
            raise ValueError(
                f"size={size} is smaller than the number of required tasks "
                f"({num_required}); every subset holds all of them."
            )
        return size, size
    min_size = check_positive_int(min_size, "min_size", minimum=0)
    if max_size is None:
        max_size = num_allowed
    else:
        max_size = check_positive_int(max_size, "max_size", minimum=0)
        if max_size > num_allowed:
            raise ValueError(f"max_size={max_size} is larger than {allowed}.")
        if max_size < num_required:
            raise ValueError(
                f"max_size={max_size} is smaller than the number of required tasks "
                f"({num_required}); every subset holds all of them."
            )
    if min_size > max_size:
        raise ValueError(
            f"min_size={min_size} is larger than max_size={max_size} (max_size=None "
            f"means {allowed})."
        )
    return max(min_size, num_required), max_size


def count_feasible(num_free: int, num_required: int, lo: int, hi: int) -> int:
    """Number of subsets with sizes in ``[lo, hi]`` that hold the required tasks
    and any of the ``num_free`` free ones."""
    return sum(math.comb(num_free, s - num_required) for s in range(lo, hi + 1))


# ----------------------------------------------------------------------------
# Evaluation on the device
# ----------------------------------------------------------------------------


def _build_masks(base, idx):
    """``[n, num_tasks]`` masks: ``base`` plus ones at ``idx`` ``[n, width]``.

    Entries of ``idx`` equal to ``num_tasks`` are padding and are dropped.
    """
    n = idx.shape[0]
    rows = jnp.arange(n)[:, None]
    masks = jnp.broadcast_to(base, (n, base.shape[0]))
    return masks.at[rows, idx].set(1, mode="drop")


_UNTRACEABLE = (
    jax.errors.TracerArrayConversionError,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _call_objective(static_fn, dynamic, masks):
    """Calls the objective on ``masks`` and checks its output shape: ``[n]``."""
    fn = dynamic if static_fn is None else static_fn
    try:
        out = fn(masks)
    except _UNTRACEABLE as err:
        raise TypeError(
            "objective must be traceable by jax.jit (write it with jax.numpy, "
            "without converting masks to NumPy or Python values)."
        ) from err
    try:
        out = jnp.asarray(out)
    except TypeError as err:
        raise TypeError(
            f"objective must return an array of scores, got {type(out).__name__}."
        ) from err
    n = masks.shape[0]
    if out.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"objective must map masks of shape {tuple(masks.shape)} to scores of "
            f"shape ({n},) (or ({n}, 1)), got shape {tuple(out.shape)}. For several "
            "targets, reduce them to one score per mask (e.g. surrogate_objective "
            "with target_weights)."
        )
    if not (jnp.issubdtype(out.dtype, jnp.floating)
            or jnp.issubdtype(out.dtype, jnp.integer) or out.dtype == jnp.bool_):
        raise TypeError(f"objective must return real scores, got dtype {out.dtype}.")
    return out.reshape(n)


@partial(jax.jit, static_argnums=0)
def _score_chunk(static_fn, dynamic, base, idx):
    """Scores ``[chunk]`` of the masks given by ``idx`` ``[chunk, width]``."""
    scores = _call_objective(static_fn, dynamic, _build_masks(base, idx))
    return scores.astype(jnp.result_type(float))


class _Best(NamedTuple):
    """Running reduction of an exhaustive search (on the device)."""

    value: jax.Array  # best finite score so far (inf before any)
    row: jax.Array  # [width] its task indices (padded with num_tasks)
    bad: jax.Array  # a non-finite score was seen
    bad_row: jax.Array  # [width] the first subset with a non-finite score
    bad_value: jax.Array  # that score


@partial(jax.jit, static_argnums=0)
def _reduce_chunk(static_fn, dynamic, base, idx, best: _Best) -> _Best:
    """Folds the chunk's scores into ``best``; ties keep the earlier row."""
    scores = _call_objective(static_fn, dynamic, _build_masks(base, idx))
    scores = scores.astype(best.value.dtype)
    finite = jnp.isfinite(scores)
    pos = jnp.argmin(jnp.where(finite, scores, jnp.inf))  # first minimum
    better = finite[pos] & (scores[pos] < best.value)
    first_bad = jnp.argmax(~finite)
    new_bad = ~best.bad & ~finite.all()
    return _Best(
        value=jnp.where(better, scores[pos], best.value),
        row=jnp.where(better, idx[pos], best.row),
        bad=best.bad | new_bad,
        bad_row=jnp.where(new_bad, idx[first_bad], best.bad_row),
        bad_value=jnp.where(new_bad, scores[first_bad], best.bad_value),
    )


def _non_finite_error(value, indices) -> ValueError:
    return ValueError(
        f"objective returned a non-finite value ({float(value)}) for the subset "
        f"{list(indices)}; it must return finite scores for every feasible subset."
    )


# ----------------------------------------------------------------------------
# Searches
# ----------------------------------------------------------------------------


def _combination_chunks(free: np.ndarray, free_sizes, width: int, sentinel: int,
                        chunk: int) -> Iterator[tuple[np.ndarray, int]]:
    """Yields ``([chunk, width] int32 task indices, number of real rows)``.

    Rows run over ``free_sizes`` in order and, within a size, over the
    combinations of ``free`` in lexicographic order; each row is padded with
    ``sentinel`` to ``width`` columns, and the last chunk repeats its last row.
    """
    pending: list[np.ndarray] = []
    num_pending = 0
    for k in free_sizes:
        combos = itertools.combinations(free.tolist(), k)
        while True:
            take = chunk - num_pending
            if k == 0:
                rows = np.empty((len(list(itertools.islice(combos, take))), 0),
                                np.int32)
            else:
                flat = np.fromiter(
                    itertools.chain.from_iterable(itertools.islice(combos, take)),
                    dtype=np.int32)
                rows = flat.reshape(-1, k)
            if rows.shape[0] == 0:
                break
            if width > k:
                rows = np.pad(rows, ((0, 0), (0, width - k)),
                              constant_values=sentinel)
            pending.append(rows)
            num_pending += rows.shape[0]
            if num_pending == chunk:
                yield np.concatenate(pending), chunk
                pending, num_pending = [], 0
    if num_pending:
        yield pad_rows(np.concatenate(pending), chunk), num_pending


def _exhaustive(parts, base, free, num_required, lo, hi, count, batch_size, mesh):
    """Exact minimum over every feasible subset: ``(row, value, num_evaluated)``."""
    static_fn, dynamic, _ = parts
    num_tasks = base.shape[0]
    width = hi - num_required
    chunk = sharding.round_up(min(batch_size, count), mesh)
    dtype = np.dtype(jnp.result_type(float))
    # Built on the host and uploaded explicitly (by ``replicate``) in one go.
    best = _Best(
        value=np.full((), np.inf, dtype),
        row=np.full((width,), num_tasks, np.int32),
        bad=np.zeros((), bool),
        bad_row=np.full((width,), num_tasks, np.int32),
        bad_value=np.zeros((), dtype),
    )
    dynamic, base, best = sharding.replicate((dynamic, base, best), mesh)
    num_evaluated = 0
    free_sizes = range(lo - num_required, hi - num_required + 1)
    for idx, num_real in _combination_chunks(free, free_sizes, width, num_tasks,
                                             chunk):
        best = _reduce_chunk(static_fn, dynamic, base,
                             sharding.shard_subsets(idx, mesh), best)
        num_evaluated += num_real
    best = sharding.to_host(best)
    if best.bad:
        raise _non_finite_error(best.bad_value, _row_indices(best.bad_row, num_tasks))
    return np.asarray(best.row), float(best.value), num_evaluated


def _row_indices(row, num_tasks: int) -> list[int]:
    return [int(i) for i in np.asarray(row) if i < num_tasks]


def _beam_chunk_size(num_free: int, num_required: int, lo: int, hi: int,
                     beam_width: int, batch_size: int) -> int:
    """Rows per call: the most candidates any step of the beam can score."""
    most = 1 if lo == num_required else 0
    for step in range(1, hi - num_required + 1):
        parents = min(beam_width, math.comb(num_free, step - 1))
        most = max(most, parents * (num_free - step + 1))
    return max(1, min(batch_size, most))


def _beam(parts, base, free, num_required, lo, hi, beam_width, batch_size, mesh):
    """Beam search over added free tasks: ``(row, value, num_evaluated)``."""
    static_fn, dynamic, _ = parts
    num_tasks = base.shape[0]
    num_free = free.shape[0]
    width = hi - num_required
    chunk = sharding.round_up(
        _beam_chunk_size(num_free, num_required, lo, hi, beam_width, batch_size),
        mesh)
    dynamic, base = sharding.replicate((dynamic, base), mesh)

    def to_rows(members: np.ndarray) -> np.ndarray:
        """``[n, num_free]`` bool membership -> ``[n, width]`` task indices."""
        n, step = members.shape[0], int(members[0].sum())
        positions = np.nonzero(members)[1].reshape(n, step)
        rows = np.full((n, width), num_tasks, np.int32)
        rows[:, :step] = free[positions]
        return rows

    def evaluate(rows: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, rows.shape[0], chunk):
            part = rows[start:start + chunk]
            idx = sharding.shard_subsets(pad_rows(part, chunk), mesh)
            scores = sharding.to_host(_score_chunk(static_fn, dynamic, base, idx))
            out.append(scores[:part.shape[0]])
        scores = np.concatenate(out)
        bad = ~np.isfinite(scores)
        if bad.any():
            first = int(np.argmax(bad))
            raise _non_finite_error(scores[first],
                                    _row_indices(rows[first], num_tasks))
        return scores

    beam = np.zeros((1, num_free), bool)
    best_row, best_value, num_evaluated = None, np.inf, 0
    if lo == num_required:
        best_value = float(evaluate(to_rows(beam))[0])
        best_row, num_evaluated = to_rows(beam)[0], 1
    for step in range(1, hi - num_required + 1):
        # Children in order: parents in beam order, added task ascending.
        parent, added = np.nonzero(~beam)
        children = beam[parent]
        children[np.arange(parent.shape[0]), added] = True
        _, first = np.unique(children, axis=0, return_index=True)
        children = children[np.sort(first)]
        rows = to_rows(children)
        scores = evaluate(rows)
        num_evaluated += rows.shape[0]
        order = np.argsort(scores, kind="stable")
        beam = children[order[:beam_width]]
        if num_required + step >= lo and scores[order[0]] < best_value:
            best_value, best_row = float(scores[order[0]]), rows[order[0]]
    return best_row, best_value, num_evaluated


def select_subset(
    objective, num_tasks: int, *, size: int | None = None, min_size: int = 1,
    max_size: int | None = None, required=(), excluded=(), method: str = "auto",
    beam_width: int = 16, max_exhaustive: int = 2**20, batch_size: int = 8192,
    mesh=None,
) -> SelectionResult:
    """The feasible subset of tasks with the lowest objective (scores are losses).

    Ties go to the first subset in a deterministic order. Exhaustive: smaller
    subsets first, then the lexicographic order of the sorted task indices.
    Greedy and beam: smaller subsets first, then the order in which candidates
    are generated (parents in beam order, each with its added task ascending).
    The same inputs give the same result.

    Args:
      objective: a fitted ``LinearSurrogate`` / ``KernelSurrogate`` (scored with
        ``surrogate_objective(objective)``, the mean over targets), a
        ``SurrogateObjective``, or a callable mapping float masks
        ``[n, num_tasks]`` to scores ``[n]`` (or ``[n, 1]``), traceable by
        ``jax.jit``. It is called on chunks of ``min(batch_size, ...)`` masks;
        every value it returns must be finite.
      num_tasks: number of tasks ``K``.
      size: exactly this many tasks. Leave ``min_size`` and ``max_size`` at
        their defaults (or equal to ``size``) when giving it.
      min_size: fewest tasks, when ``size`` is ``None`` (raised to
        ``len(required)`` if below).
      max_size: most tasks, when ``size`` is ``None``; ``None`` means
        ``num_tasks - len(excluded)``.
      required: task indices in every subset.
      excluded: task indices in no subset.
      method: ``"auto"``, ``"exhaustive"``, ``"greedy"`` or ``"beam"``.
      beam_width: subsets kept per size by ``"beam"`` (and ``"auto"``).
      max_exhaustive: ``"auto"`` is exhaustive up to this many feasible subsets;
        ``"exhaustive"`` refuses more.
      batch_size: most masks per objective call (rounded up to a multiple of
        the device count).
      mesh: a ``jax.sharding.Mesh`` with a ``"subsets"`` axis to split each
        chunk of masks over; ``None``: every device (see
        :func:`tasksurrogate_jax.truth.sharding.subset_mesh`; after
        ``jax.distributed.initialize()`` every process must then make the same
        call, or pass ``subset_mesh(jax.local_devices())``).

    Returns:
      ``SelectionResult``.
    """
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    parts = _objective_parts(objective, num_tasks)
    required = _check_indices(required, "required", num_tasks)
    excluded = _check_indices(excluded, "excluded", num_tasks)
    both = sorted(set(required) & set(excluded))
    if both:
        raise ValueError(
            f"required and excluded share task indices {both}: a task cannot be "
            "both in every subset and in none."
        )
    lo, hi = _check_sizes(size, min_size, max_size, num_required=len(required),
                          num_allowed=num_tasks - len(excluded))
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    beam_width = check_positive_int(beam_width, "beam_width")
    max_exhaustive = check_positive_int(max_exhaustive, "max_exhaustive")
    batch_size = check_positive_int(batch_size, "batch_size")
    mesh = sharding.check_mesh(mesh)

    taken = set(required) | set(excluded)
    free = np.array([i for i in range(num_tasks) if i not in taken], np.int32)
    count = count_feasible(free.shape[0], len(required), lo, hi)
    if method == "auto":
        method = "exhaustive" if count <= max_exhaustive else "beam"
    elif method == "exhaustive" and count > max_exhaustive:
        raise ValueError(
            f"method='exhaustive' would score {count} subsets, more than "
            f"max_exhaustive={max_exhaustive}; raise max_exhaustive or use "
            "method='beam'."
        )

    base_np = np.zeros(num_tasks, np.float32)
    base_np[list(required)] = 1.0
    base = jnp.asarray(base_np, parts[2])
    if method == "exhaustive":
        row, value, num_evaluated = _exhaustive(parts, base, free, len(required), lo,
                                                hi, count, batch_size, mesh)
    else:
        width = 1 if method == "greedy" else beam_width
        row, value, num_evaluated = _beam(parts, base, free, len(required), lo, hi,
                                          width, batch_size, mesh)
    indices = tuple(sorted(list(required) + _row_indices(row, num_tasks)))
    mask = np.zeros(num_tasks, np.float32)
    mask[list(indices)] = 1.0
    return SelectionResult(mask=mask, indices=indices, predicted=value, method=method,
                           num_evaluated=num_evaluated)

