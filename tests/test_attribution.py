import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax.core import surrogates
from tasksurrogate_jax.core.subsets import all_masks
from tasksurrogate_jax.downstream import attribution

K = 8
ADDITIVE = np.array([0.5, -0.3, 0.2, 0.1, 0.8, -0.6, 0.4, 0.05])  # loss drop per task
PAIR, PAIR_STRENGTH = (0, 1), 0.7  # complements: the loss drops more with both
XOR, XOR_STRENGTH = (2, 3), 0.9  # the loss rises when exactly one of 2, 3 is in


def planted_loss(masks):
    """Synthetic F(s) [n, 2]: additive + a planted pair + an XOR pair; the second
    target is a scaled copy so per-target shapes are exercised."""
    masks = np.asarray(masks, float)
    a, b = PAIR
    c, d = XOR
    loss = (3.0 - masks @ ADDITIVE - PAIR_STRENGTH * masks[:, a] * masks[:, b]
            + XOR_STRENGTH * (masks[:, c] != masks[:, d]))
    return np.stack([loss, 2.0 * loss], axis=1)


def true_loo(masks_fn=planted_loss):
    full = np.ones((1, K))
    drops = np.ones((K, K)) - np.eye(K)
    return masks_fn(drops) - masks_fn(full)


def true_interactions():
    out = np.zeros((K, K, 2))
    full = planted_loss(np.ones((1, K)))[0]
    for i, j in itertools.combinations(range(K), 2):
        si, sj, sij = np.ones(K), np.ones(K), np.ones(K)
        si[i] = sj[j] = sij[i] = sij[j] = 0
        val = full - planted_loss(si[None])[0] - planted_loss(sj[None])[0] + \
            planted_loss(sij[None])[0]
        out[i, j] = out[j, i] = val
    return out


ALL = np.asarray(all_masks(K, include_empty=True), dtype=np.float64)
# Fit on a random half of the 256 subsets, none of them the full set, a LOO
# set or a leave-two-out set, so the surrogate must generalize to those.
near_full = ALL.sum(1) >= K - 2
FIT = np.random.default_rng(0).permutation(ALL[~near_full])[:128]


def kernel_fit(kernel="polynomial", **kw):
    params = dict(gamma=1.0, degree=2, coef0=1.0) if kernel == "polynomial" else kw
    return surrogates.fit_kernel_surrogate(FIT, planted_loss(FIT), kernel=kernel,
                                           ridge=1e-8, **params)


@pytest.mark.float64  # exact closed forms at 1e-8 to 1e-12 (interpolating fits)
def test_kernel_surrogate_recovers_planted_scores_and_interactions():
    # F is a degree-2 polynomial in s, so a degree-2 polynomial kernel holds it.
    surrogate = kernel_fit()
    np.testing.assert_allclose(attribution.loo_scores(surrogate), true_loo(), atol=1e-5)
    interactions = np.asarray(attribution.interaction_matrix(surrogate))
    np.testing.assert_allclose(interactions, true_interactions(), atol=1e-5)
    # The planted values, by hand: complements are negative, XOR is -2 x.
    assert interactions[0, 1, 0] == pytest.approx(-PAIR_STRENGTH, abs=1e-5)
    assert interactions[2, 3, 0] == pytest.approx(-2 * XOR_STRENGTH, abs=1e-5)
    # Positive = helps: removing a helpful task raises the loss.
    assert true_loo()[4, 0] > 0 and true_loo()[5, 0] < 0


def test_rbf_surrogate_recovers_the_ranking_and_the_xor_sign():
    surrogate = surrogates.fit_kernel_surrogate(
        FIT, planted_loss(FIT), kernel="rbf", gamma=0.05, ridge=1e-6)
    scores = np.asarray(attribution.loo_scores(surrogate))
    np.testing.assert_allclose(scores, true_loo(), atol=0.05)
    interactions = np.asarray(attribution.interaction_matrix(surrogate))
    assert interactions[2, 3, 0] == pytest.approx(-2 * XOR_STRENGTH, abs=0.1)


@pytest.mark.float64  # exact closed forms at 1e-8 to 1e-12 (interpolating fits)
def test_linear_surrogate_misses_the_xor_pair():
    # With uniform subsets, [s_2 != s_3] is uncorrelated with s_2 and s_3, so the
    # least-squares coefficients of tasks 2 and 3 carry only their additive part,
    # while removing either one from the full set raises the loss by XOR_STRENGTH
    # more than that.
    linear = surrogates.fit_linear_surrogate(ALL, planted_loss(ALL))
    scores = np.asarray(attribution.loo_scores(linear))
    np.testing.assert_allclose(scores[[2, 3], 0], ADDITIVE[[2, 3]], atol=1e-10)
    np.testing.assert_allclose(true_loo()[[2, 3], 0],
                               ADDITIVE[[2, 3]] + XOR_STRENGTH, atol=1e-12)
    np.testing.assert_allclose(scores, -np.asarray(linear.coef))
    assert np.all(np.asarray(attribution.interaction_matrix(linear)) == 0)


@pytest.mark.float64  # exact closed forms at 1e-8 to 1e-12 (interpolating fits)
def test_generic_path_equals_linear_closed_forms():
    # Kernel surrogate with a linear kernel is a linear model: LOO scores by
    # predictions equal the closed form of the same ridge fit without intercept.
    linear = surrogates.fit_linear_surrogate(ALL, planted_loss(ALL), ridge=0.1,
                                             fit_intercept=False)
    kernel = surrogates.fit_kernel_surrogate(ALL, planted_loss(ALL), kernel="linear",
                                             ridge=0.1, jitter=0.0, standardize=False)
    np.testing.assert_allclose(attribution.loo_scores(kernel),
                               attribution.loo_scores(linear), atol=1e-9)


@pytest.mark.float64  # exact closed forms at 1e-8 to 1e-12 (interpolating fits)
def test_sampled_values_of_a_linear_surrogate_are_exact():
    linear = surrogates.fit_linear_surrogate(FIT, planted_loss(FIT))
    for values_fn in (attribution.banzhaf_values, attribution.shapley_values):
        values = values_fn(linear, key=jax.random.key(0), num_samples=7, batch_size=3)
        np.testing.assert_allclose(values, -np.asarray(linear.coef), atol=1e-10)


def exact_values(predict, weight_fn):
    """Exhaustive semivalue of v = -predict: sum over s not containing i of
    weight(|s|) * (predict(s) - predict(s + e_i))."""
    preds = np.asarray(predict(ALL))
    index = {tuple(row.astype(int)): n for n, row in enumerate(ALL)}
    out = np.zeros((K, preds.shape[1]))
    for n, row in enumerate(ALL):
        for i in np.nonzero(row == 0)[0]:
            plus = row.copy()
            plus[i] = 1
            out[i] += weight_fn(int(row.sum())) * (preds[n] - preds[index[tuple(
                plus.astype(int))]])
    return out


@pytest.mark.float64  # exact closed forms at 1e-8 to 1e-12 (interpolating fits)
def test_sampled_banzhaf_and_shapley_converge_to_exhaustive_values():
    surrogate = kernel_fit()
    banzhaf = exact_values(surrogate.predict, lambda size: 1 / 2 ** (K - 1))
    shapley = exact_values(
        surrogate.predict,
        lambda size: math.factorial(size) * math.factorial(K - size - 1) /
        math.factorial(K))
    est_b = attribution.banzhaf_values(surrogate, key=jax.random.key(1),
                                       num_samples=20000, batch_size=1000)
    est_s = attribution.shapley_values(surrogate, key=jax.random.key(2),
                                       num_samples=20000, batch_size=1000)
    # Monte Carlo: per-sample spreads are at most ~1 (target 0), so 20,000
    # samples give standard errors below 0.01.
    np.testing.assert_allclose(est_b[:, 0], banzhaf[:, 0], atol=0.03)
    np.testing.assert_allclose(est_s[:, 0], shapley[:, 0], atol=0.03)
    np.testing.assert_allclose(est_s[:, 1], 2 * est_s[:, 0], rtol=1e-6)
    # Efficiency holds exactly for every sample of orders.
    preds = surrogate.predict(jnp.stack([jnp.zeros(K), jnp.ones(K)]))
    np.testing.assert_allclose(np.asarray(est_s).sum(0), preds[0] - preds[1],
                               rtol=1e-8)


def test_reproducible_from_the_key_and_jittable():
    surrogate = kernel_fit()
    a = attribution.banzhaf_values(surrogate, key=jax.random.key(3), num_samples=50)
    b = attribution.banzhaf_values(surrogate, key=jax.random.key(3), num_samples=50,
                                   batch_size=7)
    np.testing.assert_allclose(a, b, atol=1e-12)
    jitted = jax.jit(attribution.loo_scores)(surrogate)
    np.testing.assert_allclose(jitted, attribution.loo_scores(surrogate), atol=1e-12)


def test_bad_arguments():
    surrogate = kernel_fit()
    with pytest.raises(TypeError, match="surrogate must be a LinearSurrogate"):
        attribution.loo_scores(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        attribution.banzhaf_values(surrogate, key=jax.random.key(0), num_samples=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        attribution.shapley_values(surrogate, key=jax.random.key(0), batch_size=0)
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        attribution.shapley_values(surrogate, key="seven")


def _enumerated_fixed_size(predict, size):
    """Exact fixed-size effects [K, T] and interactions [K, K, T] by enumerating
    every context (the quantities the sampled functions estimate)."""
    effects, effect_counts = 0.0, np.zeros((K, 1))
    for context in itertools.combinations(range(K), size - 1):
        free = [j for j in range(K) if j not in context]
        masks = np.zeros((len(free), K))
        masks[:, list(context)] = 1
        masks[np.arange(len(free)), free] = 1
        scores = predict(masks)
        e = np.zeros((K, scores.shape[1]))
        e[free] = scores.mean(0) - scores
        effects = effects + e
        effect_counts[free] += 1
    inter, inter_counts = 0.0, np.zeros((K, K, 1))
    for context in itertools.combinations(range(K), size - 2):
        free = [j for j in range(K) if j not in context]
        pairs = list(itertools.combinations(free, 2))
        masks = np.zeros((len(pairs), K))
        masks[:, list(context)] = 1
        for r, (i, j) in enumerate(pairs):
            masks[r, [i, j]] = 1
        scores = predict(masks)
        # Least-squares fit of c + u_i + u_j on the pairs, then the residuals.
        design = np.zeros((len(pairs), 1 + len(free)))
        design[:, 0] = 1
        for r, (i, j) in enumerate(pairs):
            design[r, 1 + free.index(i)] = design[r, 1 + free.index(j)] = 1
        coef = np.linalg.lstsq(design, scores, rcond=None)[0]
        residual = scores - design @ coef
        m = np.zeros((K, K, scores.shape[1]))
        for r, (i, j) in enumerate(pairs):
            m[i, j] = m[j, i] = residual[r]
            inter_counts[i, j] += 1
            inter_counts[j, i] += 1
        inter = inter + m
    return effects / effect_counts, inter / np.maximum(inter_counts, 1)


@pytest.mark.slow
def test_fixed_size_effects_and_interactions_match_enumeration():
    kernel = kernel_fit()

    def predict(masks):
        return np.asarray(kernel.predict(masks))

    size = 4
    effects, inter = _enumerated_fixed_size(predict, size)
    key = jax.random.key(3)
    got_effects = attribution.fixed_size_effects(kernel, key=key, size=size,
                                                 num_samples=4000)
    got_inter = attribution.fixed_size_interactions(kernel, key=key, size=size,
                                                    num_samples=2000)
    # Sampled contexts: Monte Carlo error only.
    np.testing.assert_allclose(got_effects, effects, atol=0.03 * np.abs(effects).max())
    np.testing.assert_allclose(got_inter, inter, atol=0.03 * np.abs(inter).max())
    np.testing.assert_allclose(got_inter, np.swapaxes(got_inter, 0, 1), atol=1e-12)
    assert np.abs(np.diagonal(got_inter, axis1=0, axis2=1)).max() < 1e-12
    # The planted complements (0, 1) and the XOR pair (2, 3) (either alone is
    # worse than both) are the two most negative pairs, by a margin far above
    # the sampling tolerance (no near-ties for rounding to flip).
    flat = np.asarray(got_inter)[:, :, 0][np.triu_indices(K, 1)]
    pairs = list(zip(*np.triu_indices(K, 1), strict=True))
    planted = [flat[pairs.index(p)] for p in ((0, 1), (2, 3))]
    others = [v for p, v in zip(pairs, flat, strict=True) if p not in ((0, 1), (2, 3))]
    assert min(others) - max(planted) > 0.1 * np.abs(flat).max()
    # Task 4 (largest additive drop) and task 0 (additive drop plus its
    # complement) are the most valuable; task 5 (raises the loss) the least.
    e = np.asarray(got_effects)[:, 0]
    rest = e[[i for i in range(K) if i not in (0, 4, 5)]]
    margin = 0.1 * np.abs(e).max()
    assert min(e[0], e[4]) - max(rest.max(), e[5]) > margin
    assert min(rest.min(), e[0], e[4]) - e[5] > margin


@pytest.mark.slow
def test_fixed_size_functions_of_a_linear_surrogate():
    linear = surrogates.fit_linear_surrogate(FIT, planted_loss(FIT))
    key = jax.random.key(0)
    inter = attribution.fixed_size_interactions(linear, key=key, size=3,
                                                num_samples=50)
    # Second differences of float32 predictions (~1-10) cancel to a few
    # roundings: ~4 x eps32 (1.2e-7) x 10 ~ 5e-6, averaged over the samples.
    assert np.abs(np.asarray(inter)).max() < 5e-6
    effects = attribution.fixed_size_effects(linear, key=key, size=3,
                                             num_samples=3000)
    exact, _ = _enumerated_fixed_size(lambda m: np.asarray(linear.predict(m)), 3)
    np.testing.assert_allclose(effects, exact, atol=0.03 * np.abs(exact).max())
    # Additive: the effects follow minus the coefficients (a continuous
    # comparison, not a ranking that near-equal coefficients could flip).
    coef = np.asarray(linear.coef)[:, 0]
    assert np.corrcoef(np.asarray(effects)[:, 0], -coef)[0, 1] > 0.99


@pytest.mark.parametrize("fn", ["fixed_size_effects", "fixed_size_interactions"])
def test_fixed_size_bad_sizes(fn):
    kernel = kernel_fit()
    with pytest.raises(ValueError, match="size must be <= num_tasks=8"):
        getattr(attribution, fn)(kernel, key=jax.random.key(0), size=9)
    with pytest.raises(ValueError, match="size must be < num_tasks=8"):
        getattr(attribution, fn)(kernel, key=jax.random.key(0), size=8)
    with pytest.raises(ValueError, match="size must be >="):
        getattr(attribution, fn)(kernel, key=jax.random.key(0), size=0)
