import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from tasksurrogate_jax.core import metrics

RNG = np.random.default_rng(1)


class CorrelationTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_spearman_with_ties_matches_scipy(self):
        x = RNG.integers(0, 4, (40, 6)).astype(float)  # many ties
        y = RNG.normal(size=(40, 6)).round(1)
        ours = self.variant(metrics.spearman)(x, y)
        ref = [scipy.stats.spearmanr(x[:, j], y[:, j]).statistic for j in range(6)]
        # float32 ranks are exact; the correlation of 40 float32 values
        # rounds ~ sqrt(40) x eps32 (1.2e-7) ~ 1e-6.
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pearson_matches_scipy(self):
        x, y = RNG.normal(size=(2, 30, 4))
        ours = self.variant(metrics.pearson)(x, y)
        ref = [scipy.stats.pearsonr(x[:, j], y[:, j]).statistic for j in range(4)]
        # float32 inputs and sums of 30 terms (~ sqrt(30) x eps32 ~ 1e-6),
        # against scipy in float64; correlations near 0: absolute too.
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_rankdata_matches_scipy_average_method():
    x = RNG.integers(0, 5, (17, 3)).astype(float)
    np.testing.assert_array_equal(metrics.rankdata(x, axis=0),
                                  scipy.stats.rankdata(x, axis=0))
    np.testing.assert_array_equal(metrics.rankdata(x, axis=1),
                                  scipy.stats.rankdata(x, axis=1))


def test_ranks_computed_in_the_same_jit_as_their_values_are_a_ranking():
    # Regression: XLA fused the values into both the sort and a lookup with
    # different rounding, so values did not find themselves (ranks 1.5, 8.5
    # without partners). Closed-form LOO predictions reproduced it.
    x = RNG.integers(0, 2, (30, 8)).astype(float)
    y = RNG.normal(size=(30, 5))

    def loo_predictions(x, y):
        k = jnp.exp(-0.05 * ((x[:, None] - x[None]) ** 2).sum(-1))
        evals, evecs = jnp.linalg.eigh(k)
        inv = 1.0 / (evals + 1.0)
        a_y = evecs @ (inv[:, None] * (evecs.T @ y))
        return y - a_y / ((evecs * evecs) @ inv)[:, None]

    fused = jax.jit(lambda x, y: metrics.rankdata(loo_predictions(x, y), 0))(x, y)
    ref = scipy.stats.rankdata(np.asarray(loo_predictions(x, y)), axis=0)
    np.testing.assert_array_equal(fused, ref)


def test_rankdata_of_a_column_with_nan_is_nan_as_scipy():
    x = np.array([[1.0, 3.0], [np.nan, 1.0], [2.0, 2.0]])
    np.testing.assert_array_equal(metrics.rankdata(x, 0),
                                  scipy.stats.rankdata(x, axis=0))


def test_spearman_of_constant_column_is_nan_and_mean_ignores_it():
    x = np.stack([np.arange(5.0), np.ones(5)], axis=1)
    y = np.stack([np.arange(5.0), np.arange(5.0)], axis=1)
    rho = np.asarray(metrics.spearman(x, y))
    assert rho[0] == pytest.approx(1.0) and np.isnan(rho[1])
    assert float(metrics.mean_spearman(x, y)) == pytest.approx(1.0)


@pytest.mark.float64  # float64 NumPy references at numpy's default rtol 1e-7
def test_normalized_and_relative_error():
    true = RNG.normal(size=(50, 3))
    pred = true + RNG.normal(scale=0.1, size=(50, 3))
    expected = ((pred - true) ** 2).mean(0) / true.var(0)
    np.testing.assert_allclose(metrics.normalized_error(true=true, predicted=pred),
                               expected)
    np.testing.assert_allclose(
        metrics.normalized_error(true=true, predicted=true.mean(0) + 0 * true), 1.0)
    np.testing.assert_allclose(metrics.relative_error(true=true, predicted=pred),
                               np.abs(pred - true) / np.abs(true))
    pooled = ((pred - true) ** 2).mean() / true.var(0).mean()
    np.testing.assert_allclose(
        metrics.pooled_normalized_error(true=true, predicted=pred), pooled)


def test_order_sensitive_metrics_take_keywords_only():
    # The errors are normalised by the truth: a swapped positional call would
    # give another number, so positional calls are refused.
    true, pred = np.ones((4, 2)), np.full((4, 2), 2.0)
    for fn in (metrics.normalized_error, metrics.pooled_normalized_error,
               metrics.relative_error):
        with pytest.raises(TypeError):
            fn(true, pred)
    with pytest.raises(TypeError):
        metrics.loo_correlation(true, pred)
    assert float(metrics.relative_error(true=true, predicted=pred).max()) == 1.0
    assert float(metrics.relative_error(true=pred, predicted=true).max()) == 0.5


@pytest.mark.slow
def test_loo_correlation_per_target_mean_and_mean_target():
    true = RNG.normal(size=(25, 8))
    pred = true + RNG.normal(scale=0.5, size=(25, 8))
    out = metrics.loo_correlation(true_effects=true, predicted_effects=pred)
    ref = [scipy.stats.spearmanr(pred[:, j], true[:, j]).statistic for j in range(8)]
    # Spearman of 25 float32 values against scipy's float64 (see above).
    np.testing.assert_allclose(out.per_target, ref, rtol=1e-5, atol=1e-6)
    assert float(out.mean) == pytest.approx(np.mean(ref))
    ref_mean = scipy.stats.spearmanr(pred.mean(1), true.mean(1)).statistic
    assert float(out.mean_target) == pytest.approx(ref_mean)
    pearson = metrics.loo_correlation(true_effects=true, predicted_effects=pred,
                                      method="pearson")
    assert float(pearson.mean_target) == pytest.approx(
        scipy.stats.pearsonr(pred.mean(1), true.mean(1)).statistic)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        metrics.spearman(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="n >= 2"):
        metrics.pearson(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="method must be"):
        metrics.loo_correlation(true_effects=np.zeros((4, 2)),
                                predicted_effects=np.zeros((4, 2)), method="kendall")
