"""Tests for tasksurrogate_jax.downstream.interactions: the pair-removal ground truth of
pairwise interactions, its ceiling, and interactions read off surrogates."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax.core import surrogates
from tasksurrogate_jax.downstream import attribution
from tasksurrogate_jax.downstream import interactions as ix


class Quadratic:
    """``g(s) = c + s @ a + sum_{i<j} b_ij s_i s_j``: a surrogate-like object
    with known pair interactions ``b``."""

    def __init__(self, num_tasks, num_targets, seed=0):
        rng = np.random.default_rng(seed)
        self.num_tasks = num_tasks
        self.a = rng.normal(size=(num_tasks, num_targets))
        b = rng.normal(size=(num_tasks, num_tasks, num_targets))
        self.b = np.triu(np.transpose(b, (2, 0, 1)), k=1).transpose(1, 2, 0)
        self.b = self.b + self.b.transpose(1, 0, 2)  # symmetric, 0 diagonal

    def predict(self, masks):
        m = jnp.asarray(masks, jnp.float64)
        return 1.0 + m @ self.a + 0.5 * jnp.einsum("ni,nj,ijt->nt", m, m, self.b)

    def pair_values(self, pairs):
        return self.b[pairs[:, 0], pairs[:, 1]]


# -- masks and the truth formula ----------------------------------------------


@pytest.mark.float64  # asks for float64 masks
def test_pair_removal_masks_rows():
    masks = np.asarray(ix.pair_removal_masks(4))
    pairs = ix.all_pairs(4)
    assert pairs.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert masks.shape == (1 + 4 + 6, 4) and masks.dtype == np.float32
    np.testing.assert_array_equal(masks[0], np.ones(4))
    np.testing.assert_array_equal(masks[1:5], 1 - np.eye(4))
    np.testing.assert_array_equal(masks[5 + 3], [1, 0, 0, 1])  # pair (1, 2)
    given = np.asarray(ix.pair_removal_masks(5, [[3, 1], [0, 4]], dtype=jnp.float64))
    assert given.shape == (1 + 5 + 2, 5) and given.dtype == np.float64
    np.testing.assert_array_equal(given[6:], [[1, 0, 1, 0, 1], [0, 1, 1, 1, 0]])


@pytest.mark.parametrize("pairs, error, match", [
    ([[0, 0]], ValueError, "distinct"),
    ([[0, 5]], ValueError, "index tasks"),
    ([[0, 1], [1, 0]], ValueError, "repeat"),
    ([0, 1], ValueError, r"\[P, 2\]"),
    ([[0.5, 1]], TypeError, "integers"),
])
def test_bad_pairs(pairs, error, match):
    with pytest.raises(error, match=match):
        ix.pair_removal_masks(5, pairs)


def test_sample_pairs_distinct_and_reproducible():
    a = ix.sample_pairs(jax.random.key(3), 12, 20)
    b = ix.sample_pairs(jax.random.key(3), 12, 20)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20, 2) and (a[:, 0] < a[:, 1]).all()
    assert len({tuple(p) for p in a.tolist()}) == 20
    with pytest.raises(ValueError, match="num_pairs"):
        ix.sample_pairs(jax.random.key(0), 4, 7)


def test_pair_interactions_by_hand():
    # Rows: full, -0, -1, -2, -{0,1}, -{0,2}, -{1,2}.
    scores = np.array([1.0, 1.5, 1.2, 1.1, 2.0, 1.4, 1.3])[:, None]
    # I_01 = 2.0 - 1.5 - 1.2 + 1.0; I_02 = 1.4 - 1.5 - 1.1 + 1.0;
    # I_12 = 1.3 - 1.2 - 1.1 + 1.0.
    expected = np.array([0.3, -0.2, 0.0])[:, None]
    one = ix.pair_interactions(scores)
    assert one.num_tasks == 3 and one.replicates.shape == (1, 3, 1)
    np.testing.assert_allclose(one.mean, expected, atol=1e-12)
    two = ix.pair_interactions(np.stack([scores, 3 * scores]))
    np.testing.assert_allclose(two.replicates[1], 3 * expected, atol=1e-12)
    np.testing.assert_allclose(two.mean, 2 * expected, atol=1e-12)
    # A subset of pairs: K is told from the rows.
    some = ix.pair_interactions(scores[[0, 1, 2, 3, 6]], pairs=[[1, 2]])
    np.testing.assert_allclose(some.mean, [[0.0]], atol=1e-12)
    with pytest.raises(ValueError, match="rows"):
        ix.pair_interactions(scores[:6])
    with pytest.raises(ValueError, match="finite"):
        ix.pair_interactions(np.where(np.arange(7)[:, None] == 2, np.nan, scores))


def test_sign_convention_duplicates_positive_complements_negative():
    """Losses of three toy mechanisms on the pair (0, 1) of K = 3."""
    masks = np.asarray(ix.pair_removal_masks(3))

    def truth(loss):
        return ix.pair_interactions(np.array([[loss(m)] for m in masks])).mean[0, 0]

    # Duplicates: either copy gives the whole benefit.
    assert truth(lambda m: 1.0 - 0.5 * max(m[0], m[1])) == pytest.approx(0.5)
    # Complements: useful only together.
    assert truth(lambda m: 1.0 - 0.5 * m[0] * m[1]) == pytest.approx(-0.5)
    # Conflict: 0 holds true labels, 1 the same inputs mislabelled; the loss
    # follows the label mix, with clean support c = 1 of the true labels.
    assert truth(lambda m: math.log(1 + m[1] / (1 + m[0]))) < 0
    # Additive effects: no interaction.
    assert truth(lambda m: 1.0 - 0.3 * m[0] - 0.2 * m[1]) == pytest.approx(0.0)


# -- planted signs, comparisons, errors ----------------------------------------


def test_planted_signs_correct():
    pairs = ix.all_pairs(4)
    values = np.zeros((6, 2))
    values[0] = [0.5, 0.1]    # (0, 1): positive
    values[5] = [-0.2, 0.1]   # (2, 3): mean -0.05, negative
    values[3] = [0.1, -0.1]   # (1, 2): mean exactly 0: never right
    planted = {(0, 1): 1, (3, 2): -1, (1, 2): 1}
    assert ix.planted_signs_correct(values, planted, pairs=pairs) == [2, 3]
    assert ix.planted_signs_correct(values, {(0, 1): -1}, pairs=pairs) == [0, 1]
    matrix = ix.interactions_to_matrix(values, pairs, 4)
    assert matrix.shape == (4, 4, 2) and np.allclose(matrix, matrix.transpose(1, 0, 2))
    assert ix.planted_signs_correct(matrix, planted) == [2, 3]
    assert ix.planted_signs_correct(matrix.mean(2), planted) == [2, 3]
    with pytest.raises(ValueError, match="not among pairs"):
        ix.planted_signs_correct(values[:2], {(2, 3): 1}, pairs=pairs[:2])
    with pytest.raises(ValueError, match="signs"):
        ix.planted_signs_correct(matrix, {(0, 1): 2})
    with pytest.raises(ValueError, match="matrix"):
        ix.planted_signs_correct(values, planted)


@pytest.mark.float64  # a linear surrogate's interactions cancel to exactly 0
def test_compare_interactions():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(30, 4))
    noisy = truth + 0.3 * rng.normal(size=truth.shape)
    out = ix.compare_interactions(truth, {"same": truth, "negated": -truth,
                                          "noisy": noisy, "zeros": 0 * truth},
                                  num_resamples=200)
    assert out["same"]["spearman"] == pytest.approx(1.0)
    assert out["same"]["pearson_mean_target"] == pytest.approx(1.0)
    assert out["negated"]["spearman_mean_target"] == pytest.approx(-1.0)
    low, high = out["noisy"]["spearman_mean_target_interval"]
    assert low < out["noisy"]["spearman_mean_target"] < high
    low, high = out["noisy"]["spearman_interval"]
    assert low <= out["noisy"]["spearman"] <= high
    assert 0.7 < out["noisy"]["pearson"] < 1.0
    assert math.isnan(out["zeros"]["spearman_mean_target"])  # a linear surrogate
    with pytest.raises(ValueError, match="shape"):
        ix.compare_interactions(truth, {"bad": truth[:5]})


def test_errors_on_pair_removal_subsets():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(40, 3))
    better, worse = true + 0.1 * rng.normal(size=true.shape), true + 0.5
    errors = ix.pair_removal_errors(true, {"better": better, "worse": worse})
    assert errors["better"] < 0.05 < errors["worse"]
    out = ix.normalized_error_difference(true, better, worse, num_resamples=300)
    assert out["difference"] == pytest.approx(errors["better"] - errors["worse"])
    low, high = out["difference_interval"]
    assert low <= out["difference"] <= high < 0


# -- the ceiling ---------------------------------------------------------------


def test_ceiling_matches_known_noise():
    """Signal s ~ N(0, 1) per (pair, target); each replicate's pair-removed
    scores get independent noise of std sigma, and its full-set score a noise
    common to all its pairs (a shift, which no ranking sees); the
    leave-one-out scores are one constant. The truth of R replicates then has
    reliability rho = 1 / (1 + sigma^2 / R) over the pairs, and two independent
    truths agree at Spearman (6 / pi) asin(rho / 2)."""
    num_tasks, num_targets, num_replicates, sigma = 48, 3, 8, 1.5
    pairs = ix.all_pairs(num_tasks)  # 1128 pairs
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(pairs.shape[0], num_targets))
    scores = np.zeros((num_replicates, 1 + num_tasks + pairs.shape[0], num_targets))
    scores[:, 1:1 + num_tasks] = 0.7
    scores[:, 0] = rng.normal(size=(num_replicates, num_targets))
    scores[:, 1 + num_tasks:] = signal + sigma * rng.normal(
        size=(num_replicates, pairs.shape[0], num_targets))
    truth = ix.pair_interactions(scores)
    rho = 1.0 / (1.0 + sigma**2 / num_replicates)
    expected = 6 / np.pi * np.arcsin(rho / 2)
    ceiling = ix.interaction_ceiling(truth, seed=0)
    assert ceiling.num_replicates == num_replicates
    assert ceiling.mean == pytest.approx(expected, abs=0.02)
    # The target mean averages independent signals and noises alike: same rho.
    assert ceiling.mean_target == pytest.approx(expected, abs=0.03)
    # The raw [R, P, T] array gives the same.
    assert ix.interaction_ceiling(truth.replicates, seed=0).mean == ceiling.mean
    # Twice the noise: the ceiling of rho = 1 / (1 + 4 sigma^2 / R).
    noisier = scores.copy()
    noisier[:, 1 + num_tasks:] += math.sqrt(3) * sigma * rng.normal(
        size=noisier[:, 1 + num_tasks:].shape)
    rho = 1.0 / (1.0 + 4 * sigma**2 / num_replicates)
    assert ix.interaction_ceiling(ix.pair_interactions(noisier)).mean == pytest.approx(
        6 / np.pi * np.arcsin(rho / 2), abs=0.04)


# -- read off surrogates -------------------------------------------------------


@pytest.mark.float64  # exact planted values at 1e-10 to 1e-12 (interpolating fits)
def test_surrogate_interactions_of_a_planted_quadratic():
    quad = Quadratic(6, 2)
    pairs = ix.all_pairs(6)
    np.testing.assert_allclose(ix.surrogate_pair_interactions(quad),
                               quad.pair_values(pairs), atol=1e-12)
    some = pairs[[4, 0]]
    np.testing.assert_allclose(ix.surrogate_pair_interactions(quad, some),
                               quad.pair_values(some), atol=1e-12)


@pytest.mark.parametrize("name", ["banzhaf_interactions", "shapley_interactions"])
@pytest.mark.float64  # exact planted values at 1e-10 to 1e-12 (interpolating fits)
def test_sampled_indices_of_a_planted_quadratic(name):
    """Every context gives ``b_ij``, so a few samples are exact."""
    quad = Quadratic(6, 2)
    values = getattr(ix, name)(quad, key=jax.random.key(0), num_samples=7,
                               batch_size=3)
    np.testing.assert_allclose(values, quad.pair_values(ix.all_pairs(6)),
                               atol=1e-12)


@pytest.mark.float64  # exact planted values at 1e-10 to 1e-12 (interpolating fits)
def test_fitted_kernel_surrogate_recovers_quadratic_coefficients():
    """A degree-2 polynomial kernel spans 1, s_i and s_i s_j on 0/1 masks: fit
    to every subset of a quadratic, its interactions are the coefficients."""
    quad = Quadratic(5, 2, seed=1)
    everything = np.array(list(itertools.product([0.0, 1.0], repeat=5)))
    scores = np.asarray(quad.predict(everything))
    fitted = surrogates.fit_kernel_surrogate(
        everything, scores, kernel="polynomial", degree=2, gamma=1.0, coef0=1.0,
        ridge=1e-9, solver="exact")
    pairs = ix.all_pairs(5)
    np.testing.assert_allclose(ix.surrogate_pair_interactions(fitted),
                               quad.pair_values(pairs), atol=1e-5)
    np.testing.assert_allclose(
        ix.banzhaf_interactions(fitted, key=jax.random.key(1), num_samples=16),
        quad.pair_values(pairs), atol=1e-5)


@pytest.mark.float64  # exact planted values at 1e-10 to 1e-12 (interpolating fits)
def test_matches_interaction_matrix_and_linear_is_zero():
    rng = np.random.default_rng(2)
    masks = (rng.random((40, 6)) < 0.6).astype(np.float64)
    scores = masks @ rng.normal(size=(6, 2)) + 0.3 * masks[:, :1] * masks[:, 1:3]
    kernel = surrogates.fit_kernel_surrogate(masks, scores, gamma=0.3, ridge=1e-2)
    pairs = ix.all_pairs(6)
    matrix = np.asarray(attribution.interaction_matrix(kernel))
    np.testing.assert_allclose(ix.surrogate_pair_interactions(kernel, pairs),
                               matrix[pairs[:, 0], pairs[:, 1]], atol=1e-10)
    linear = surrogates.fit_linear_surrogate(masks, scores)
    np.testing.assert_allclose(ix.surrogate_pair_interactions(linear), 0.0,
                               atol=1e-10)


def _exact_index(g, num_tasks, weight):
    """Sum over contexts C of the others of weight(|C|) * second difference."""
    out = {}
    for i, j in ix.all_pairs(num_tasks).tolist():
        others = [t for t in range(num_tasks) if t not in (i, j)]
        total = 0.0
        for size in range(len(others) + 1):
            for context in itertools.combinations(others, size):
                m = np.zeros(num_tasks)
                m[list(context)] = 1
                mij, mi, mj = m.copy(), m.copy(), m.copy()
                mij[[i, j]] = 1
                mi[i] = 1
                mj[j] = 1
                total += weight(size) * (g(mij) - g(mi) - g(mj) + g(m))
        out[(i, j)] = total
    return np.array([out[p] for p in sorted(out)])


def test_sampled_indices_match_exact_enumeration():
    """On a random (non-quadratic) function of K = 5 tasks, the sampled
    Banzhaf and Shapley interaction indices agree with their definitions
    (weights 2^-(K-2), and |C|! (K-|C|-2)! / (K-1)!)."""
    num_tasks = 5
    rng = np.random.default_rng(3)
    table = rng.normal(size=2**num_tasks)
    bits = 2 ** np.arange(num_tasks)

    class Table:
        def predict(self, masks):
            index = (jnp.asarray(masks) @ bits).astype(jnp.int32)
            return jnp.asarray(table)[index][:, None]

    def g(m):
        return table[int(m @ bits)]

    banzhaf = _exact_index(g, num_tasks, lambda s: 0.5 ** (num_tasks - 2))
    shapley = _exact_index(g, num_tasks, lambda s: math.factorial(s) * math.factorial(
        num_tasks - s - 2) / math.factorial(num_tasks - 1))
    assert np.abs(banzhaf - shapley).max() > 0.2  # the weights matter here
    key = jax.random.key(4)
    n = 20_000
    for fn, exact in ((ix.banzhaf_interactions, banzhaf),
                      (ix.shapley_interactions, shapley)):
        sampled = np.asarray(fn(Table(), key=key, num_samples=n, batch_size=500,
                                num_tasks=num_tasks))[:, 0]
        # Second differences of N(0, 1) values have std 2: 4 standard errors.
        np.testing.assert_allclose(sampled, exact, atol=4 * 2 / math.sqrt(n))


def test_surrogate_checks():
    with pytest.raises(TypeError, match="predict"):
        ix.surrogate_pair_interactions(object())

    class NoSize:
        def predict(self, masks):
            return jnp.zeros((masks.shape[0], 1))

    with pytest.raises(ValueError, match="num_tasks"):
        ix.surrogate_pair_interactions(NoSize())
    assert ix.surrogate_pair_interactions(NoSize(), num_tasks=3).shape == (3, 1)


# -- slow: the digits "interactions" preset --------------------------------------


@pytest.mark.slow
def test_digits_interactions_preset_truth_recovers_planted_signs():
    """The pair-removal truth of the preset (4 replicates here, 8 in the
    benchmark) gets every planted sign, in every replicate, and is reliable
    over all 45 pairs (about 0.95 on the target mean at 8 replicates)."""
    from tasksurrogate_jax.workloads.digits import digits_workload

    workload = digits_workload("interactions")
    masks = ix.pair_removal_masks(workload.num_tasks)
    scores = workload.replicate_scores(masks, key=jax.random.key(0),
                                       regime="finetune", replicates=4,
                                       progress=False)
    truth = ix.pair_interactions(scores)
    planted = workload.planted_interactions
    assert ix.planted_signs_correct(truth.mean, planted, pairs=truth.pairs) == [4, 4]
    for replicate in truth.replicates:
        assert ix.planted_signs_correct(replicate, planted,
                                        pairs=truth.pairs) == [4, 4]
    assert ix.interaction_ceiling(truth).mean_target > 0.8
