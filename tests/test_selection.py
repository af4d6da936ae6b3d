import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax.core import surrogates
from tasksurrogate_jax.downstream import selection
from tasksurrogate_jax.downstream.selection import select_subset, surrogate_objective

K = 9
_rng = np.random.default_rng(0)
ADDITIVE = _rng.normal(size=K)
PAIRS = np.triu(_rng.normal(scale=0.7, size=(K, K)), 1)  # i < j interactions


def planted_np(mask):
    """F(s) for one mask [K]: additive terms plus pairwise interactions."""
    mask = np.asarray(mask, float)
    return float(mask @ ADDITIVE + mask @ PAIRS @ mask)


def planted_jax(masks):
    """The same objective, batched: [n, K] -> [n]."""
    return masks @ ADDITIVE + jnp.einsum("ni,ij,nj->n", masks, PAIRS, masks)


def feasible(num_tasks, sizes, required=(), excluded=()):
    """Feasible subsets in the documented tie order (size, then lexicographic)."""
    for k in sizes:
        for combo in itertools.combinations(range(num_tasks), k):
            if set(required) <= set(combo) and not set(combo) & set(excluded):
                yield combo


def as_mask(combo, num_tasks):
    mask = np.zeros(num_tasks)
    mask[list(combo)] = 1.0
    return mask


def brute_force(fn, num_tasks, sizes, required=(), excluded=()):
    """(best subset, its value, number of feasible subsets), one mask at a time."""
    best, best_value, count = None, np.inf, 0
    for combo in feasible(num_tasks, sizes, required, excluded):
        value = fn(as_mask(combo, num_tasks))
        count += 1
        if value < best_value:
            best, best_value = combo, value
    return best, best_value, count


def check_result(result, combo, value, num_tasks):
    assert result.indices == combo
    np.testing.assert_array_equal(result.mask, as_mask(combo, num_tasks))
    assert result.mask.dtype == np.float32
    # float32 objective against a float64 brute force: a value sums up to
    # K + K(K-1)/2 = 45 terms of magnitude <= ~2, so its rounding error is at
    # most ~45 x 2 x eps32 (1.2e-7) ~ 1e-5.
    np.testing.assert_allclose(result.predicted, value, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Exhaustive search against brute force
# ----------------------------------------------------------------------------

CONSTRAINTS = [
    dict(size=3),
    dict(size=1),
    dict(min_size=2, max_size=6),
    dict(),  # every non-empty subset
    dict(min_size=0),  # the empty set too
    dict(size=4, required=(2, 7), excluded=(0, 5)),
    dict(min_size=1, max_size=5, required=(4,), excluded=(1, 8)),
    dict(min_size=3, excluded=(3,)),
]


def _sizes(kw, num_tasks=K):
    if kw.get("size") is not None:
        return [kw["size"]]
    hi = kw.get("max_size")
    hi = num_tasks - len(kw.get("excluded", ())) if hi is None else hi
    return range(kw.get("min_size", 1), hi + 1)


@pytest.mark.parametrize("kw", CONSTRAINTS)
def test_exhaustive_matches_brute_force_on_planted_objective(kw):
    combo, value, count = brute_force(planted_np, K, _sizes(kw),
                                      kw.get("required", ()), kw.get("excluded", ()))
    result = select_subset(planted_jax, K, method="exhaustive", batch_size=64, **kw)
    check_result(result, combo, value, K)
    assert result.method == "exhaustive"
    assert result.num_evaluated == count


def test_exhaustive_chunking_does_not_change_the_answer():
    combo, value, _ = brute_force(planted_np, K, range(1, K + 1))
    for batch_size in (1, 7, 100, 10_000):
        result = select_subset(planted_jax, K, method="exhaustive",
                               batch_size=batch_size)
        check_result(result, combo, value, K)
        assert result.num_evaluated == 2**K - 1


def _fit_data(num_targets=3, num_subsets=60):
    rng = np.random.default_rng(1)
    masks = (rng.random((num_subsets, K)) < 0.5).astype(np.float64)
    scores = rng.normal(size=(num_subsets, num_targets))
    return masks, scores


def _surrogate_brute_force(surrogate, weights, sizes, required=(), excluded=()):
    combos = list(feasible(K, sizes, required, excluded))
    masks = np.stack([as_mask(c, K) for c in combos])
    predicted = np.asarray(surrogate.predict(masks))
    values = predicted @ (np.asarray(weights) / np.sum(weights))
    best = int(np.argmin(values))
    return combos[best], values[best]


@pytest.mark.parametrize("kind", ["kernel", "linear"])
@pytest.mark.parametrize("weights", [None, [0.2, 0.0, 3.0]])
def test_exhaustive_on_fitted_surrogates_matches_brute_force(kind, weights):
    masks, scores = _fit_data()
    if kind == "kernel":
        surrogate = surrogates.fit_kernel_surrogate(masks, scores, gamma=0.3,
                                                    ridge=1e-3)
    else:
        surrogate = surrogates.fit_linear_surrogate(masks, scores, ridge=1e-2)
    uniform = np.ones(3) if weights is None else weights
    objective = (surrogate if weights is None
                 else surrogate_objective(surrogate, target_weights=weights))
    for kw in (dict(size=3), dict(min_size=2, max_size=6, required=(1,),
                                  excluded=(4, 6))):
        combo, value = _surrogate_brute_force(
            surrogate, uniform, _sizes(kw), kw.get("required", ()),
            kw.get("excluded", ()))
        result = select_subset(objective, K, batch_size=32, **kw)
        assert result.method == "exhaustive"
        check_result(result, combo, value, K)


def test_surrogate_objective_is_weighted_mean_of_predictions():
    masks, scores = _fit_data()
    surrogate = surrogates.fit_kernel_surrogate(masks, scores, gamma=0.3)
    expected = np.asarray(surrogate.predict(masks)) @ np.array([1.0, 0.0, 3.0]) / 4.0
    got = surrogate_objective(surrogate, target_weights=[1, 0, 3])(masks)
    # The same float32 predictions, weighted on the device or in NumPy
    # float64: a 3-term weighted sum, a few float32 roundings (eps 1.2e-7).
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(surrogate_objective(surrogate)(masks)),
                               np.asarray(surrogate.predict(masks)).mean(1),
                               rtol=1e-6, atol=1e-6)


def test_exhaustive_fifty_tasks_choose_four_picks_most_negative_coefficients():
    coef = np.random.default_rng(2).normal(size=50)
    surrogate = surrogates.LinearSurrogate(coef=jnp.asarray(coef)[:, None],
                                           intercept=jnp.asarray([0.5]))
    result = select_subset(surrogate, 50, size=4)
    best = tuple(sorted(np.argsort(coef)[:4].tolist()))
    assert result.method == "exhaustive"
    assert result.indices == best
    assert result.num_evaluated == math.comb(50, 4) == 230_300
    np.testing.assert_allclose(result.predicted, 0.5 + coef[list(best)].sum())


def test_ties_go_to_smaller_then_lexicographically_first_subset():
    constant = lambda masks: jnp.zeros(masks.shape[0])  # noqa: E731
    kw = dict(min_size=2, max_size=4, excluded=(0,), required=(5,))
    for method in ("exhaustive", "greedy", "beam"):
        result = select_subset(constant, 7, method=method, **kw)
        assert result.indices == (1, 5), method
    assert select_subset(constant, 7, size=3).indices == (0, 1, 2)


def test_only_the_required_set_is_feasible():
    for method in ("exhaustive", "greedy", "beam"):
        result = select_subset(planted_jax, K, size=2, required=(3, 6), method=method)
        assert result.indices == (3, 6)
        assert result.num_evaluated == 1
        np.testing.assert_allclose(result.predicted, planted_np(as_mask((3, 6), K)))
    result = select_subset(planted_jax, K, size=0)
    assert result.indices == () and result.predicted == 0.0


def test_objective_returning_column_and_unhashable_callable():
    class Unhashable:
        __hash__ = None

        def __call__(self, masks):
            return planted_jax(masks)[:, None]

    combo, value, _ = brute_force(planted_np, K, [3])
    check_result(select_subset(Unhashable(), K, size=3), combo, value, K)


# ----------------------------------------------------------------------------
# Greedy and beam
# ----------------------------------------------------------------------------


def test_greedy_finds_optimum_of_additive_objective():
    weights = np.random.default_rng(3).normal(size=12)

    def additive(masks):
        return masks @ weights

    for k in (1, 4, 11):
        result = select_subset(additive, 12, size=k, method="greedy")
        assert result.indices == tuple(sorted(np.argsort(weights)[:k].tolist()))
        assert result.method == "greedy"
    # A size range: the best set is every task with a negative weight.
    result = select_subset(additive, 12, method="greedy")
    assert result.indices == tuple(np.flatnonzero(weights < 0).tolist())
    np.testing.assert_allclose(result.predicted, weights[weights < 0].sum())
    assert result.num_evaluated == sum(range(1, 13))


def _trap(masks):
    """Task 0 is the best single task, but tasks 1 and 2 together are far better."""
    return (-1.0 * masks[:, 0] - 0.5 * masks[:, 1] - 0.5 * masks[:, 2]
            - 2.0 * masks[:, 1] * masks[:, 2] + 0.3 * masks[:, 3:].sum(1))


def test_greedy_is_trapped_where_beam_finds_the_optimum():
    greedy = select_subset(_trap, 6, size=2, method="greedy")
    assert greedy.indices == (0, 1)
    np.testing.assert_allclose(greedy.predicted, -1.5)
    beam = select_subset(_trap, 6, size=2, method="beam", beam_width=2)
    exact = select_subset(_trap, 6, size=2, method="exhaustive")
    assert beam.indices == exact.indices == (1, 2)
    np.testing.assert_allclose(beam.predicted, -3.0)
    width_one = select_subset(_trap, 6, size=2, method="beam", beam_width=1)
    assert width_one.indices == greedy.indices
    assert width_one.num_evaluated == greedy.num_evaluated


def test_wide_beam_is_exact_and_deduplicates():
    combo, value, _ = brute_force(planted_np, K, range(2, 7), (), (1,))
    width = math.comb(K - 1, (K - 1) // 2)  # keeps every subset of every size
    result = select_subset(planted_jax, K, min_size=2, max_size=6, excluded=(1,),
                           method="beam", beam_width=width)
    check_result(result, combo, value, K)
    # Distinct subsets only: each subset of size <= 6 is scored once.
    assert result.num_evaluated == sum(math.comb(K - 1, s) for s in range(1, 7))


def test_search_is_deterministic():
    rounded = lambda masks: jnp.round(planted_jax(masks))  # noqa: E731  many ties
    for method in ("exhaustive", "greedy", "beam"):
        first = select_subset(rounded, K, method=method, beam_width=3, batch_size=5)
        again = select_subset(rounded, K, method=method, beam_width=3, batch_size=5)
        assert first.indices == again.indices
        assert first.predicted == again.predicted


def test_auto_picks_exhaustive_then_beam():
    count = math.comb(K, 3)
    result = select_subset(planted_jax, K, size=3)
    assert result.method == "exhaustive" and result.num_evaluated == count
    at_limit = select_subset(planted_jax, K, size=3, max_exhaustive=count)
    assert at_limit.method == "exhaustive"
    beyond = select_subset(planted_jax, K, size=3, max_exhaustive=count - 1,
                           beam_width=4)
    assert beyond.method == "beam"
    assert beyond.num_evaluated < count
    assert selection.count_feasible(K, 0, 3, 3) == count


# ----------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------


def test_one_trace_across_chunks_and_steps():
    shapes = []

    def objective(masks):
        shapes.append(masks.shape)  # runs only while tracing
        return planted_jax(masks)

    result = select_subset(objective, K, method="exhaustive", batch_size=16)
    assert result.num_evaluated == 2**K - 1  # 32 chunks, the last one padded
    assert shapes == [(16, K)]
    select_subset(objective, K, method="exhaustive", batch_size=16)
    assert len(shapes) == 1  # same objective and shapes: compiled program reused

    shapes.clear()
    select_subset(objective, K, method="beam", beam_width=3, batch_size=4)
    assert len(shapes) == 1  # every step and chunk shares one shape
    shapes.clear()
    select_subset(objective, K, min_size=0, method="greedy")
    assert shapes == [(K, K)]


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, match", [
    (dict(size=K + 1), ValueError, r"size=10 is larger than the number of allowed"),
    (dict(size=K - 1, excluded=(0, 1)), ValueError, r"size=8 is larger"),
    (dict(size=1, required=(0, 1)), ValueError, r"smaller than the number of requ"),
    (dict(size=-1), ValueError, r"size must be >= 0"),
    (dict(size=2.5), TypeError, r"size must be an int"),
    (dict(size=3, min_size=2), ValueError, r"size=3 and min_size=2 conflict"),
    (dict(size=3, max_size=4), ValueError, r"size=3 and max_size=4 conflict"),
    (dict(min_size=5, max_size=4), ValueError, r"min_size=5 is larger than max_siz"),
    (dict(min_size=K + 1), ValueError, r"min_size=10 is larger than max_size=9"),
    (dict(max_size=K + 1), ValueError, r"max_size=10 is larger than the number of a"),
    (dict(max_size=K, excluded=(2,)), ValueError, r"max_size=9 is larger"),
    (dict(max_size=1, required=(0, 1)), ValueError, r"max_size=1 is smaller"),
    (dict(required=(K,)), ValueError, r"required holds task index 9, out of range"),
    (dict(excluded=(-1,)), ValueError, r"excluded holds task index -1, out of ran"),
    (dict(required=(1, 1)), ValueError, r"required holds duplicated task indices"),
    (dict(excluded=3), TypeError, r"excluded must be a sequence of task indices"),
    (dict(required=(0.5,)), TypeError, r"required must hold ints"),
    (dict(required=(1, 2), excluded=(2,)), ValueError, r"share task indices \[2\]"),
    (dict(method="random"), ValueError, r"method must be one of"),
    (dict(beam_width=0), ValueError, r"beam_width must be >= 1"),
    (dict(batch_size=0), ValueError, r"batch_size must be >= 1"),
    (dict(max_exhaustive=0), ValueError, r"max_exhaustive must be >= 1"),
    (dict(size=4, method="exhaustive", max_exhaustive=100), ValueError,
     r"would score 126 subsets, more than max_exhaustive=100"),
])
def test_bad_constraints(kw, error, match):
    with pytest.raises(error, match=match):
        select_subset(planted_jax, K, **kw)


@pytest.mark.parametrize("num_tasks, error, match", [
    (0, ValueError, r"num_tasks must be >= 1"),
    (3.0, TypeError, r"num_tasks must be an int"),
])
def test_bad_num_tasks(num_tasks, error, match):
    with pytest.raises(error, match=match):
        select_subset(planted_jax, num_tasks)


@pytest.mark.parametrize("method", ["exhaustive", "greedy", "beam"])
def test_objective_with_wrong_shape(method):
    with pytest.raises(ValueError, match=r"objective must map masks of shape "
                       r"\(\d+, 9\) to scores of shape \(\d+,\).*got shape \(\d+, 9\)"):
        select_subset(lambda masks: masks, K, size=2, method=method)
    with pytest.raises(ValueError, match=r"objective must map.*got shape \(\)"):
        select_subset(lambda masks: masks.sum(), K, size=2, method=method)


@pytest.mark.parametrize("method", ["exhaustive", "greedy", "beam"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_objective_returning_non_finite(method, bad):
    def objective(masks):
        return jnp.where(masks[:, 4] > 0, bad, planted_jax(masks))

    with pytest.raises(ValueError, match=r"objective returned a non-finite value "
                       r"\((nan|inf)\) for the subset \[.*4.*\]"):
        select_subset(objective, K, size=2, method=method, batch_size=8)


def test_bad_objectives():
    with pytest.raises(TypeError, match=r"objective must be a fitted .* or a callab"):
        select_subset(3.0, K)
    with pytest.raises(TypeError, match=r"objective must be traceable by jax.jit"):
        select_subset(lambda masks: np.asarray(masks).sum(1), K, size=2)
    with pytest.raises(TypeError, match=r"objective must return real scores"):
        select_subset(lambda masks: masks.sum(1) * 1j, K, size=2)
    surrogate = surrogates.fit_linear_surrogate(*_fit_data())
    with pytest.raises(ValueError, match=r"surrogate over 9 tasks, but num_tasks=8"):
        select_subset(surrogate, 8)
    with pytest.raises(ValueError, match=r"surrogate over 9 tasks, but num_tasks=10"):
        select_subset(surrogate_objective(surrogate), 10)


@pytest.mark.parametrize("weights, error, match", [
    ([1.0, 2.0], ValueError, r"target_weights must have shape \[num_targets\]=\(3,"),
    ([[1.0, 1.0, 1.0]], ValueError, r"got shape \(1, 3\)"),
    ([1.0, -1.0, 1.0], ValueError, r"finite and non-negative"),
    ([1.0, np.nan, 1.0], ValueError, r"finite and non-negative"),
    ([0.0, 0.0, 0.0], ValueError, r"positive sum"),
    ("abc", TypeError, r"target_weights must be a numeric array"),
])
def test_bad_target_weights(weights, error, match):
    surrogate = surrogates.fit_linear_surrogate(*_fit_data())
    with pytest.raises(error, match=match):
        surrogate_objective(surrogate, target_weights=weights)


def test_surrogate_objective_needs_a_surrogate():
    with pytest.raises(TypeError, match=r"surrogate must be a LinearSurrogate or"):
        surrogate_objective(lambda masks: masks.sum(1))
