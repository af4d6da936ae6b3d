"""Reliability (split-half ceiling) of replicate-averaged ground truths, intervals."""

import jax
import numpy as np
import pytest
import scipy.stats

from tasksurrogate_jax.truth.reliability import (
    bootstrap_interval,
    interval_over_targets,
    loo_reliability,
    loo_spearman_interval,
    spearman_brown,
    subset_reliability,
)

K, T = 30, 20


def _true_effects(rng):
    # A shared component makes the target-mean far more reliable than a target.
    return rng.standard_normal((K, 1)) + rng.standard_normal((K, T))


def _loo_scores(rng, mu, num_replicates, sigma):
    effects = mu + sigma * rng.standard_normal((num_replicates, K, T))
    return np.concatenate([np.zeros((num_replicates, 1, T)), effects], axis=1)


def _column_spearman(a, b):
    a = scipy.stats.rankdata(a, axis=0)
    b = scipy.stats.rankdata(b, axis=0)
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def test_spearman_brown_known_values():
    assert spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    r = np.array([-0.2, 0.0, 0.3, 0.9, 1.0])
    np.testing.assert_allclose(spearman_brown(r, 1), r)
    np.testing.assert_allclose(
        spearman_brown(spearman_brown(0.3, 2), 2), spearman_brown(0.3, 4)
    )
    with pytest.raises(ValueError, match="factor"):
        spearman_brown(0.5, 0)


@pytest.mark.slow
def test_even_r_correction_is_two_r_over_one_plus_r():
    rng = np.random.default_rng(0)
    rel = loo_reliability(_loo_scores(rng, _true_effects(rng), 6, 1.0))
    r_h = rel.split_half_mean
    assert rel.mean == pytest.approx(2 * r_h / (1 + r_h))
    r_h = rel.split_half_mean_target
    assert rel.mean_target == pytest.approx(2 * r_h / (1 + r_h))


@pytest.mark.slow
@pytest.mark.parametrize("num_replicates", [4, 5])
def test_corrected_split_half_matches_independent_ground_truths(num_replicates):
    """The estimate predicts the agreement of two fresh R-replicate means.

    Empirical side: 200 pairs of independent R-replicate means (SE ~0.003).
    Estimate: mean over 20 datasets (per dataset SD ~0.03, so SE ~0.007); the
    Spearman-Brown step on Spearman (not Pearson) values adds a bias of ~0.02
    at R=4 (measured), so 0.05 leaves ~4 SE of room.
    """
    rng = np.random.default_rng(1)
    sigma = 2.0
    empirical_pt, empirical_mt = [], []
    for _ in range(200):
        mu = _true_effects(rng)
        a = (mu + sigma * rng.standard_normal((num_replicates, K, T))).mean(0)
        b = (mu + sigma * rng.standard_normal((num_replicates, K, T))).mean(0)
        empirical_pt.append(_column_spearman(a, b).mean())
        empirical_mt.append(_column_spearman(a.mean(1), b.mean(1)))
    estimates = [
        loo_reliability(_loo_scores(rng, _true_effects(rng), num_replicates, sigma))
        for _ in range(20)
    ]
    assert np.mean([e.mean for e in estimates]) == pytest.approx(
        np.mean(empirical_pt), abs=0.05
    )
    assert np.mean([e.mean_target for e in estimates]) == pytest.approx(
        np.mean(empirical_mt), abs=0.03
    )
    # The per-target values average to about the per-target reliability.
    values = np.mean([e.per_target for e in estimates], axis=0)
    assert values.shape == (T,)
    assert np.mean(values) == pytest.approx(np.mean(empirical_pt), abs=0.06)


@pytest.mark.slow
def test_more_noise_lowers_reliability():
    rng = np.random.default_rng(2)
    mu = _true_effects(rng)
    quiet = loo_reliability(_loo_scores(np.random.default_rng(3), mu, 6, 0.5))
    noisy = loo_reliability(_loo_scores(np.random.default_rng(3), mu, 6, 3.0))
    assert quiet.mean > noisy.mean + 0.3
    assert quiet.mean_target > noisy.mean_target
    assert quiet.mean > 0.9
    # Pure noise has no reliability.
    noise = loo_reliability(_loo_scores(rng, np.zeros((K, T)), 6, 1.0))
    assert abs(noise.mean) < 0.15


@pytest.mark.slow
def test_subset_reliability_shares_the_split_half():
    rng = np.random.default_rng(4)
    scores = _loo_scores(rng, _true_effects(rng), 5, 1.0)
    effects = scores[:, 1:] - scores[:, :1]
    loo = loo_reliability(scores, seed=7)
    sub = subset_reliability(effects, seed=7)
    assert loo.mean == sub.mean
    np.testing.assert_array_equal(loo.per_target, sub.per_target)
    assert loo.num_splits == 10  # all C(5, 2) splits of 5 replicates
    # R = 2 has one split; the full-set row shifts scores, not effects.
    two = subset_reliability(effects[:2] + 3.0)
    assert two.num_splits == 1
    r_h = _column_spearman(effects[0], effects[1]).mean()
    assert two.split_half_mean == pytest.approx(r_h)


@pytest.mark.slow
def test_same_key_or_seed_same_result():
    rng = np.random.default_rng(5)
    scores = _loo_scores(rng, _true_effects(rng), 10, 2.0)  # 126 splits > 20
    a = loo_reliability(scores, key=jax.random.key(1), num_splits=20)
    b = loo_reliability(scores, key=jax.random.key(1), num_splits=20)
    c = loo_reliability(scores, key=jax.random.key(2), num_splits=20)
    assert a.num_splits == 20
    np.testing.assert_array_equal(a.per_target, b.per_target)
    assert a.mean != c.mean
    d = loo_reliability(scores, seed=3, num_splits=20)
    assert d.mean == loo_reliability(scores, seed=3, num_splits=20).mean
    assert d.mean != loo_reliability(scores, seed=4, num_splits=20).mean


def test_one_replicate_raises_the_documented_message():
    with pytest.raises(
        ValueError,
        match=r"a ceiling needs at least 2 replicates, "
        r"got R=1",
    ):
        loo_reliability(np.zeros((1, K + 1, T)))


@pytest.mark.parametrize(
    ("scores", "error", "match"),
    [
        (np.zeros((3, 4)), ValueError, "replicate_scores must be 3-D"),
        (np.full((3, 4, 2), np.nan), ValueError, "replicate_scores must be finite"),
        (np.zeros((3, 2, 2)), ValueError, "at least 3 rows"),
        ("abc", TypeError, "replicate_scores must be a numeric array"),
    ],
)
def test_bad_replicate_scores(scores, error, match):
    with pytest.raises(error, match=match):
        loo_reliability(scores)


def test_bad_interval_arguments():
    x = np.arange(10.0)
    for level in (0.0, 1.0, 1.5, True):
        with pytest.raises(ValueError, match="level"):
            interval_over_targets(x, level=level)
    with pytest.raises(ValueError, match="data must be finite"):
        bootstrap_interval(np.mean, (np.array([1.0, np.inf, 2.0]),))
    with pytest.raises(ValueError, match="paired"):
        bootstrap_interval(np.mean, (x, x[:5]))
    with pytest.raises(TypeError, match="statistic"):
        bootstrap_interval(None, (x,))
    with pytest.raises(ValueError, match="method"):
        bootstrap_interval(np.mean, (x,), method="normal")
    with pytest.raises(ValueError, match="per_target_values must be 1-D"):
        interval_over_targets(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="predicted_effects and true_effects"):
        loo_spearman_interval(x, x[:5])


def test_interval_over_targets_covers_at_about_the_nominal_rate():
    rng = np.random.default_rng(6)
    hits = 0
    for i in range(100):
        low, high = interval_over_targets(
            0.4 + 0.2 * rng.standard_normal(30), num_resamples=500, seed=i
        )
        hits += low <= 0.4 <= high
    assert 85 <= hits <= 100


def test_interval_over_targets_ignores_nan_and_degenerate_is_nan():
    values = np.array([0.1, np.nan, 0.5, 0.3, 0.2])
    low, high = interval_over_targets(values, num_resamples=500)
    assert low < np.nanmean(values) < high
    assert np.isnan(interval_over_targets(np.full(5, 0.3))).all()
    assert np.isnan(interval_over_targets(np.array([0.3, np.nan]))).all()


def test_bootstrap_interval_is_seeded_and_paired():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(40)

    def diff(a, b):
        return float(np.mean(a - b))

    # Paired resampling of identical columns gives a zero-width distribution.
    assert np.isnan(bootstrap_interval(diff, (x, x))).all()
    y = x + 0.1 * rng.standard_normal(40)
    first = bootstrap_interval(diff, (x, y), num_resamples=500, seed=1)
    assert first == bootstrap_interval(diff, (x, y), num_resamples=500, seed=1)
    assert first[1] - first[0] < 0.1  # paired: only the small differences vary


def test_loo_spearman_interval_brackets_point_and_narrows():
    rng = np.random.default_rng(8)
    widths = []
    for num_tasks in (20, 200):
        true = rng.standard_normal((num_tasks, 4))
        predicted = true + rng.standard_normal((num_tasks, 4))
        point = scipy.stats.spearmanr(predicted.mean(1), true.mean(1)).statistic
        low, high = loo_spearman_interval(predicted, true, num_resamples=500)
        assert low < point < high
        widths.append(high - low)
    assert widths[1] < 0.6 * widths[0]
