import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel

from tasksurrogate_jax.core import surrogates
from tasksurrogate_jax.downstream import selection, uncertainty
from tasksurrogate_jax.downstream.selection import select_subset
from tasksurrogate_jax.downstream.uncertainty import (
    CandidatePool,
    ConfidenceBound,
    SurrogateFit,
    calibrate_kappa,
    fit_posterior,
    lcb_objective,
    sequential_selection,
    trust_region_objective,
)

# The random test masks repeat some rows on purpose (as bernoulli draws do);
# the leave-one-out calibration's warning about it is tested in
# tests/test_bad_inputs.py.
pytestmark = pytest.mark.filterwarnings(
    "ignore::tasksurrogate_jax.core.surrogates.DuplicateMasksWarning")


def all_masks(num_tasks, min_size=0):
    """Every mask of ``num_tasks`` tasks with at least ``min_size``, in the
    order of ``select_subset``'s exhaustive ties (size, then lexicographic)."""
    rows = []
    for k in range(min_size, num_tasks + 1):
        for combo in itertools.combinations(range(num_tasks), k):
            row = np.zeros(num_tasks)
            row[list(combo)] = 1.0
            rows.append(row)
    return np.array(rows)


def rbf(a, b, gamma):
    return np.exp(-gamma * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def hamming_to_data(masks, data):
    return np.abs(masks[:, None, :] - data[None, :, :]).sum(-1).min(1)


def random_problem(m=20, num_tasks=6, num_targets=2, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, 2, (m, num_tasks)).astype(float)
    coef = rng.normal(size=(num_tasks, num_targets))
    scores = masks @ coef + 0.3 * np.sin(masks.sum(1, keepdims=True)) \
        + 0.1 * rng.normal(size=(m, num_targets)) + 2.0
    return masks, scores


# ----------------------------------------------------------------------------
# Posterior
# ----------------------------------------------------------------------------


# The posterior variance 1 - k^T (K + lam I)^-1 k cancels to ~0 near the data,
# so its float32 value has an absolute error ~ cond(K + lam I) x eps32
# (ridges 0.05-0.1: up to ~400 x 1.2e-7 ~ 5e-5) on values that small: the
# comparisons with float64 NumPy / sklearn references below need float64.
class TestPosterior:
    @pytest.mark.float64
    def test_mean_is_predict_and_variance_matches_numpy_per_target(self):
        masks, scores = random_problem(num_targets=3)
        gammas, ridges = np.array([0.2, 0.5, 0.2]), np.array([0.05, 0.2, 0.05])
        sur = surrogates.fit_kernel_surrogate(masks, scores, gamma=gammas,
                                              ridge=ridges)
        post = fit_posterior(sur, masks, scores)
        assert post.chol.shape == (2, 20, 20)  # targets 0 and 2 share a factor
        query = all_masks(6)
        np.testing.assert_array_equal(post.mean(query), sur.predict(query))
        mean, var = post.mean_and_variance(query)
        np.testing.assert_allclose(mean, sur.predict(query), rtol=1e-12, atol=1e-12)
        y = (scores - scores.mean(0)) / scores.std(0)
        for t in range(3):
            lam = ridges[t] + float(sur.jitter[t])
            inv = np.linalg.inv(rbf(masks, masks, gammas[t]) + lam * np.eye(20))
            sigma2 = y[:, t] @ inv @ y[:, t] / 20  # maximum likelihood
            np.testing.assert_allclose(post.signal_variance[t], sigma2, rtol=1e-10)
            k = rbf(query, masks, gammas[t])
            latent = sigma2 * (1.0 - np.einsum("ij,jk,ik->i", k, inv, k))
            expected = latent * scores[:, t].std() ** 2
            np.testing.assert_allclose(var[:, t], expected, rtol=1e-9, atol=1e-13)
            np.testing.assert_allclose(post.std(query)[:, t], np.sqrt(expected),
                                       rtol=1e-8, atol=1e-9)
            noisy = post.variance(query, include_noise=True)[:, t]
            np.testing.assert_allclose(
                noisy, expected + sigma2 * lam * scores[:, t].std() ** 2, rtol=1e-9)
        np.testing.assert_allclose(post.variance(query, block_size=7), var,
                                   rtol=1e-12, atol=1e-15)

    @pytest.mark.float64
    def test_polynomial_kernel_prior_variance(self):
        masks, scores = random_problem(num_targets=1, seed=1)
        sur = surrogates.fit_kernel_surrogate(masks, scores, kernel="polynomial",
                                              gamma=0.2, ridge=0.1, degree=2)
        post = fit_posterior(sur, masks, scores, signal_variance="unit")
        query = all_masks(6)
        k_qs = (0.2 * query @ masks.T + 1.0) ** 2
        k_ss = (0.2 * masks @ masks.T + 1.0) ** 2
        prior = (0.2 * (query * query).sum(1) + 1.0) ** 2
        lam = 0.1 + float(sur.jitter[0])
        inv = np.linalg.inv(k_ss + lam * np.eye(20))
        expected = (prior - np.einsum("ij,jk,ik->i", k_qs, inv, k_qs)) \
            * scores.std() ** 2
        np.testing.assert_allclose(post.variance(query)[:, 0], expected,
                                   rtol=1e-7, atol=1e-9)

    @pytest.mark.float64  # ridge 1e-10: an ill-conditioned solve
    def test_std_vanishes_at_data_and_grows_with_distance(self):
        num_tasks = 8
        query = all_masks(num_tasks)
        centre = np.zeros(num_tasks)
        centre[:4] = 1.0
        data = query[np.abs(query - centre).sum(1) <= 1]  # 9 masks
        scores = data @ np.linspace(-1, 1, num_tasks) + data.sum(1) ** 2 / 10
        sur = surrogates.fit_kernel_surrogate(data, scores, gamma=0.3, ridge=1e-10,
                                              jitter=0.0)
        post = fit_posterior(sur, data, scores, signal_variance="unit")
        std = np.asarray(post.std(query))[:, 0] / scores.std()
        assert np.max(post.std(data)) < 1e-4
        distance = hamming_to_data(query, data)
        means = [std[distance == d].mean() for d in range(int(distance.max()) + 1)]
        assert means[0] < 1e-4
        assert np.all(np.diff(means) > 0.01), means
        assert means[-1] <= 1.0 + 1e-12  # at most the prior std (unit signal)

    @pytest.mark.float64
    @pytest.mark.parametrize("signal_variance", ["unit", "mle"])
    def test_matches_sklearn_gaussian_process(self, signal_variance):
        masks, scores = random_problem(m=25, num_targets=1, seed=2)
        gamma, ridge = 0.25, 0.05
        sur = surrogates.fit_kernel_surrogate(masks, scores, gamma=gamma,
                                              ridge=ridge, jitter=0.0)
        post = fit_posterior(sur, masks, scores, signal_variance=signal_variance)
        y_mean, y_scale = scores.mean(), scores.std()
        y = (scores[:, 0] - y_mean) / y_scale
        sigma2 = float(post.signal_variance[0])
        if signal_variance == "unit":
            assert sigma2 == 1.0
        # The GP with prior sigma2 * RBF and noise sigma2 * ridge, on the
        # standardised targets: sklearn's std times y_scale is ours.
        kernel = ConstantKernel(sigma2, "fixed") * RBF(
            length_scale=np.sqrt(1.0 / (2.0 * gamma)), length_scale_bounds="fixed")
        gp = GaussianProcessRegressor(kernel=kernel, alpha=sigma2 * ridge,
                                      optimizer=None, normalize_y=False).fit(masks, y)
        query = all_masks(6)
        sk_mean, sk_std = gp.predict(query, return_std=True)
        mean, var = post.mean_and_variance(query)
        np.testing.assert_allclose(mean[:, 0], sk_mean * y_scale + y_mean,
                                   rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(np.sqrt(var[:, 0]), sk_std * y_scale,
                                   rtol=1e-6, atol=1e-7)
        # Unit-amplitude sklearn GP (alpha=ridge): differs by sqrt(sigma2) only.
        gp1 = GaussianProcessRegressor(
            kernel=RBF(np.sqrt(1.0 / (2.0 * gamma)), "fixed"), alpha=ridge,
            optimizer=None, normalize_y=False).fit(masks, y)
        np.testing.assert_allclose(np.sqrt(var[:, 0]),
                                   np.sqrt(sigma2) * gp1.predict(
                                       query, return_std=True)[1] * y_scale,
                                   rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def posterior():
    masks, scores = random_problem(m=18, num_targets=2, seed=3)
    sur = surrogates.fit_kernel_surrogate(masks, scores, gamma=0.3, ridge=0.05)
    return fit_posterior(sur, masks, scores)


class TestObjectives:
    @pytest.mark.parametrize("mode", ["pessimistic", "optimistic"])
    def test_lcb_exhaustive_is_brute_force_argmin(self, posterior, mode):
        weights = np.array([0.25, 0.75])
        kappa = 1.5
        objective = lcb_objective(posterior, kappa=kappa, mode=mode,
                                  target_weights=[1.0, 3.0])
        query = all_masks(6, min_size=1)
        mean = np.asarray(posterior.mean(query)) @ weights
        std = np.sqrt(np.asarray(posterior.variance(query)) @ weights**2)
        values = mean + (kappa if mode == "pessimistic" else -kappa) * std
        # The same float32 posterior, weighted on the device or in NumPy
        # float64: a few float32 roundings (eps 1.2e-7) of values ~ 1-10.
        np.testing.assert_allclose(objective(query), values, rtol=1e-5, atol=1e-5)
        result = select_subset(objective, 6, method="exhaustive")
        best = int(np.argmin(values))
        np.testing.assert_array_equal(result.mask, query[best])
        np.testing.assert_allclose(result.predicted, values[best], rtol=1e-5,
                                   atol=1e-5)
        if mode == "pessimistic":
            for method in ("greedy", "beam"):
                other = select_subset(objective, 6, method=method, beam_width=4)
                assert other.predicted >= result.predicted - 1e-5
                np.testing.assert_allclose(
                    other.predicted, float(objective(other.mask[None])[0]),
                    rtol=1e-6)
        else:  # exploring: a less certain mask than the plain mean's choice
            assert std[best] > std[np.argmin(mean)]

    def test_objective_arrays_are_jit_arguments(self, posterior):
        first = lcb_objective(posterior, kappa=1.0)
        second = lcb_objective(posterior, kappa=2.0, mode="optimistic")
        assert selection._objective_parts(first, 6)[1] is first
        select_subset(first, 6, method="exhaustive", size=3)
        before = selection._reduce_chunk._cache_size()
        select_subset(lcb_objective(posterior, kappa=0.5), 6, method="exhaustive",
                      size=3)
        assert selection._reduce_chunk._cache_size() == before
        assert second.mode == "optimistic"

    def test_trust_region_never_leaves_the_radius(self):
        num_tasks = 7
        query = all_masks(num_tasks, min_size=1)
        data = query[query.sum(1) <= 2][::2]
        coef = -np.linspace(0.5, 1.5, num_tasks)  # predictions favour big masks
        scores = data @ coef
        sur = surrogates.fit_kernel_surrogate(data, scores, gamma=0.1, ridge=1e-3)
        distance = hamming_to_data(query, data)
        predicted = np.asarray(sur.predict(query))[:, 0]
        free = select_subset(sur, num_tasks, method="exhaustive")
        assert hamming_to_data(free.mask[None], data)[0] > 2  # leaves the data
        for radius in (0, 1, 2):
            objective = trust_region_objective(sur, max_distance=radius)
            result = select_subset(objective, num_tasks, method="exhaustive")
            chosen = hamming_to_data(result.mask[None], data)[0]
            assert chosen <= radius
            inside = np.flatnonzero(distance <= radius)
            best = inside[np.argmin(predicted[inside])]
            np.testing.assert_array_equal(result.mask, query[best])
            np.testing.assert_allclose(result.predicted, predicted[best], rtol=1e-6)
            values = np.asarray(objective(query))
            assert np.isfinite(values).all()
            assert values[distance > radius].min() > predicted.max()
        # No feasible mask within the radius: the nearest one wins.
        objective = trust_region_objective(sur, max_distance=1)
        result = select_subset(objective, num_tasks, size=6, method="exhaustive")
        size6 = query[query.sum(1) == 6]
        assert hamming_to_data(result.mask[None], data)[0] == \
            hamming_to_data(size6, data).min()


# ----------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------


class TestCalibration:
    @pytest.mark.float64  # float64 NumPy refits; LOO variances cancel (above)
    def test_equals_refit_leave_one_out(self):
        rng = np.random.default_rng(4)
        m, num_tasks = 9, 4
        masks = rng.integers(0, 2, (m, num_tasks)).astype(float)
        scores = np.stack([masks @ rng.normal(size=num_tasks),
                           np.sin(masks.sum(1)) + 0.1 * rng.normal(size=m)], 1)
        gamma, ridge = 0.4, 0.1
        weights = np.array([0.25, 0.75])
        cal = calibrate_kappa(masks, scores, gamma=gamma, ridge=ridge, jitter=0.0,
                              target_weights=[1.0, 3.0], coverage=0.8)
        y_mean, y_scale = scores.mean(0), scores.std(0)
        y = (scores - y_mean) / y_scale
        full = rbf(masks, masks, gamma) + ridge * np.eye(m)
        sigma2 = np.einsum("it,ij,jt->t", y, np.linalg.inv(full), y) / m
        loo_mean, loo_var = np.zeros((m, 2)), np.zeros((m, 2))
        for i in range(m):
            keep = np.arange(m) != i
            refit = surrogates.fit_kernel_surrogate(
                masks[keep], y[keep], gamma=gamma, ridge=ridge, jitter=0.0,
                standardize=False)
            loo_mean[i] = np.asarray(refit.predict(masks[i:i + 1]))[0]
            k = rbf(masks[i:i + 1], masks[keep], gamma)[0]
            inv = np.linalg.inv(full[np.ix_(keep, keep)])
            loo_var[i] = sigma2 * (1.0 + ridge - k @ inv @ k)
        loo_mean = loo_mean * y_scale + y_mean
        loo_var = loo_var * y_scale**2
        np.testing.assert_allclose(cal.loo_mean, loo_mean, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(cal.loo_std, np.sqrt(loo_var), rtol=1e-8)
        z = ((scores - loo_mean) @ weights) / np.sqrt(loo_var @ weights**2)
        np.testing.assert_allclose(cal.z, z, rtol=1e-7, atol=1e-10)
        expected = max(np.quantile(z, 0.8, method="inverted_cdf"), 0.0)
        assert cal.kappa == pytest.approx(expected, rel=1e-7)
        assert cal.achieved >= 0.8
        np.testing.assert_allclose(
            cal.coverage_table, [(z <= k).mean() for k in cal.kappa_grid])
        both = calibrate_kappa(masks, scores, gamma=gamma, ridge=ridge, jitter=0.0,
                               target_weights=[1.0, 3.0], tail="both")
        assert both.kappa == pytest.approx(
            np.quantile(np.abs(z), 0.9, method="inverted_cdf"), rel=1e-7)
        again = calibrate_kappa(masks, scores, gamma=gamma, ridge=ridge, jitter=0.0,
                                target_weights=[1.0, 3.0], coverage=0.8)
        assert again.kappa == cal.kappa

    def test_coverage_on_gaussian_process_data(self):
        """Four draws of a GP with known noise, 300 fitting masks each: the LOO
        kappa is near the N(0, 1) quantile and the bound covers about 90% of
        fresh observations at the other 724 masks."""
        num_tasks, gamma, signal, noise = 10, 0.3, 4.0, 0.04
        query = all_masks(num_tasks)
        n = query.shape[0]
        chol = np.linalg.cholesky(signal * rbf(query, query, gamma)
                                  + 1e-8 * np.eye(n))
        rng = np.random.default_rng(0)
        kappas, covered = [], []
        for _ in range(4):
            f = chol @ rng.normal(size=n) + 3.0
            observed = f + np.sqrt(noise) * rng.normal(size=n)
            fresh = f + np.sqrt(noise) * rng.normal(size=n)
            order = rng.permutation(n)
            train, test = order[:300], order[300:]
            # The noise-to-signal ratio on standardised targets.
            ridge = noise / observed[train].var()
            cal = calibrate_kappa(query[train], observed[train], gamma=gamma,
                                  ridge=ridge, coverage=0.9)
            assert abs(cal.achieved - 0.9) < 0.01
            mean, var = cal.posterior.mean_and_variance(query[test],
                                                        include_noise=True)
            bound = np.asarray(mean)[:, 0] + cal.kappa * np.sqrt(
                np.asarray(var)[:, 0])
            kappas.append(cal.kappa)
            covered.append(fresh[test] <= bound)
        assert abs(np.mean(kappas) - 1.2816) < 0.2, kappas  # N(0, 1) 90% quantile
        coverage = np.mean(covered)
        assert abs(coverage - 0.9) < 0.05, coverage


# ----------------------------------------------------------------------------
# Sequential selection
# ----------------------------------------------------------------------------

K8 = 8
C8 = np.array([-1.0, -0.9, -0.8, -0.7, -0.6, -0.5, 0.4, 0.6])


def diminishing_returns(masks):
    """Additive gains with a quadratic cost in the subset size: pairs look
    additive, so a fit on small masks extrapolates to taking every good task,
    while the optimum is the three best ones."""
    masks = np.atleast_2d(masks)
    return (masks @ C8 + 0.11 * masks.sum(1) ** 2)[:, None]


def initial_design():
    singles = np.eye(K8)
    pairs = np.array([m for m in all_masks(K8) if m.sum() == 2
                      and not (m[0] and m[1])])[::5]
    return np.concatenate([singles, pairs])


GAMMAS, RIDGES = [0.0625, 0.125, 0.25], [1e-3, 1e-1]


def check_run(result, init, kappa=2.0):
    """Rows: the initial design, then 4 distinct new masks per round, truly
    scored; the history and final refit agree with them."""
    rounds = len(result.history)
    assert result.masks.shape == (init.shape[0] + 4 * rounds, K8)
    np.testing.assert_array_equal(result.masks[:init.shape[0]], init)
    assert np.unique(result.masks, axis=0).shape[0] == result.masks.shape[0]
    np.testing.assert_array_equal(
        result.round_index, np.repeat(np.arange(rounds + 1),
                                      [init.shape[0]] + [4] * rounds))
    np.testing.assert_allclose(result.scores, diminishing_returns(result.masks))
    assert result.history[-1].best_value == result.best_value
    assert result.posterior.surrogate.train_masks.shape[0] == result.masks.shape[0]
    for record in result.history:
        np.testing.assert_allclose(record.observed,
                                   diminishing_returns(record.proposed)[:, 0])
        # One float32 multiply-add (eps 1.2e-7) on values ~ 1-10.
        np.testing.assert_allclose(record.bound, record.predicted
                                   - kappa * record.std, rtol=1e-6, atol=1e-6)


class TestSequential:
    @pytest.mark.slow
    def test_finds_optimum_a_one_shot_fit_misses(self):
        """With the hyperparameters the LOO search picks on the initial design
        (gamma=1/16, ridge=1e-3; the slow test below searches every round)."""
        query = all_masks(K8, min_size=1)
        truth = diminishing_returns(query)[:, 0]
        optimum = query[np.argmin(truth)]
        init = initial_design()
        scores = diminishing_returns(init)
        assert not (init == optimum).all(1).any()
        gamma, ridge = 0.0625, 1e-3
        one_shot = select_subset(surrogates.fit_kernel_surrogate(
            init, scores, gamma=gamma, ridge=ridge), K8)
        assert not np.array_equal(one_shot.mask, optimum)

        run = dict(rounds=2, per_round=4, key=jax.random.key(0),
                   bound=ConfidenceBound(kappa=2.0),
                   fit=SurrogateFit(gamma=gamma, ridge=ridge))
        result = sequential_selection(diminishing_returns, init, scores, K8, **run)
        np.testing.assert_array_equal(result.best_mask, optimum)
        assert result.best_value == pytest.approx(truth.min())
        assert result.history[0].best_value > truth.min()  # found in round 2
        check_run(result, init)
        again = sequential_selection(diminishing_returns, init, scores, K8, **run)
        np.testing.assert_array_equal(again.masks, result.masks)
        np.testing.assert_array_equal(again.scores, result.scores)

    @pytest.mark.slow
    def test_finds_optimum_with_hyperparameter_search_each_round(self):
        query = all_masks(K8, min_size=1)
        truth = diminishing_returns(query)[:, 0]
        optimum = query[np.argmin(truth)]
        init = initial_design()
        scores = diminishing_returns(init)
        search = surrogates.select_kernel_hyperparameters(init, scores,
                                                          gammas=GAMMAS,
                                                          ridges=RIDGES)
        assert (float(search.gamma), float(search.ridge)) == pytest.approx(
            (0.0625, 1e-3), rel=1e-7)  # float32 copies of the grid's values
        one_shot = select_subset(surrogates.fit_kernel_surrogate(
            init, scores, gamma=search.gamma, ridge=search.ridge), K8)
        assert not np.array_equal(one_shot.mask, optimum)
        run = dict(rounds=2, per_round=4, key=jax.random.key(0),
                   bound=ConfidenceBound(kappa=2.0),
                   fit=SurrogateFit(gammas=GAMMAS, ridges=RIDGES))
        result = sequential_selection(diminishing_returns, init, scores, K8, **run)
        np.testing.assert_array_equal(result.best_mask, optimum)
        check_run(result, init)
        again = sequential_selection(diminishing_returns, init, scores, K8, **run)
        np.testing.assert_array_equal(again.masks, result.masks)

    def test_sampled_pool_is_deterministic_given_the_key(self):
        init = initial_design()
        scores = diminishing_returns(init)
        run = dict(rounds=2, per_round=4, bound=ConfidenceBound(kappa=1.0),
                   fit=SurrogateFit(gamma=0.125, ridge=1e-2),
                   pool=CandidatePool(max_enumerate=8, num_candidates=32,
                                      min_size=2, max_size=5, beam_width=2))
        a = sequential_selection(diminishing_returns, init, scores, K8,
                                 key=jax.random.key(7), **run)
        b = sequential_selection(diminishing_returns, init, scores, K8,
                                 key=jax.random.key(7), **run)
        np.testing.assert_array_equal(a.masks, b.masks)
        check_run(a, init, kappa=1.0)
        new = a.masks[init.shape[0]:]
        assert ((new.sum(1) >= 2) & (new.sum(1) <= 5)).all()
        assert float(a.history[0].gamma) == 0.125

    def test_explicit_candidates_searched_hyperparameters_and_bad_scores(self):
        init = initial_design()
        scores = diminishing_returns(init)
        candidates = all_masks(K8)[::17]
        result = sequential_selection(diminishing_returns, init, scores, K8,
                                      rounds=1, per_round=4, key=jax.random.key(0),
                                      pool=CandidatePool(candidates=candidates),
                                      fit=SurrogateFit(gammas=GAMMAS, ridges=RIDGES))
        check_run(result, init)
        new = result.masks[init.shape[0]:]
        assert all((candidates == row).all(1).any() for row in new)
        # The grids as stored: float32 copies.
        assert result.history[0].gamma in np.asarray(GAMMAS, np.float32)
        assert result.history[0].ridge in np.asarray(RIDGES, np.float32)
        run = dict(rounds=1, per_round=4, key=jax.random.key(0),
                   fit=SurrogateFit(gamma=0.125, ridge=1e-2))
        with pytest.raises(ValueError, match="score_fn"):
            sequential_selection(lambda m: np.zeros((m.shape[0] + 1, 1)), init,
                                 scores, K8, **run)
        with pytest.raises(ValueError, match="target columns"):
            sequential_selection(lambda m: np.zeros((m.shape[0], 2)), init,
                                 scores, K8, **run)


# ----------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    masks, scores = random_problem(m=12, num_targets=2, seed=5)
    sur = surrogates.fit_kernel_surrogate(masks, scores, gamma=0.3, ridge=0.1)
    return masks, scores, sur, fit_posterior(sur, masks, scores)


class TestBadInputs:
    def test_fit_posterior(self, fitted):
        masks, scores, sur, _ = fitted
        linear = surrogates.fit_linear_surrogate(masks, scores)
        with pytest.raises(TypeError, match="surrogate"):
            fit_posterior(linear, masks, scores)
        with pytest.raises(TypeError, match="surrogate"):
            fit_posterior("model", masks, scores)
        with pytest.raises(ValueError, match="train_masks"):
            fit_posterior(sur, masks[::-1], scores[::-1])
        with pytest.raises(ValueError, match="scores"):
            fit_posterior(sur, masks, scores + np.arange(12)[:, None])
        with pytest.raises(ValueError, match="target columns"):
            fit_posterior(sur, masks, scores[:, :1])
        with pytest.raises(ValueError, match="signal_variance"):
            fit_posterior(sur, masks, scores, signal_variance="big")
        with pytest.raises(ValueError, match="signal_variance"):
            fit_posterior(sur, masks, scores, signal_variance=-1.0)
        with pytest.raises(ValueError, match="masks"):
            fit_posterior(sur, masks[:, :3], scores)

    def test_nystrom_surrogate_is_refused(self, fitted):
        masks, scores, _, _ = fitted
        nystrom = surrogates.fit_kernel_surrogate(
            masks, scores, gamma=0.3, ridge=0.1, solver="nystrom", num_centers=6)
        with pytest.raises(ValueError, match="Nyström"):
            fit_posterior(nystrom, masks, scores)

    def test_objectives_and_calibration(self, fitted):
        masks, scores, sur, post = fitted
        with pytest.raises(TypeError, match="posterior"):
            lcb_objective(sur, kappa=1.0)
        with pytest.raises(ValueError, match="kappa"):
            lcb_objective(post, kappa=-1.0)
        with pytest.raises(TypeError, match="kappa"):
            lcb_objective(post, kappa="1")
        with pytest.raises(ValueError, match="mode"):
            lcb_objective(post, kappa=1.0, mode="lower")
        with pytest.raises(ValueError, match="target_weights"):
            lcb_objective(post, kappa=1.0, target_weights=[1.0])
        with pytest.raises(ValueError, match="block_size"):
            lcb_objective(post, kappa=1.0, block_size=0)
        with pytest.raises(ValueError, match="max_distance"):
            trust_region_objective(sur, max_distance=-1)
        linear = surrogates.fit_linear_surrogate(masks, scores)
        with pytest.raises(ValueError, match="masks"):
            trust_region_objective(linear, max_distance=1)
        assert trust_region_objective(linear, max_distance=1, masks=masks)(
            jnp.asarray(masks)).shape == (12,)
        with pytest.raises(ValueError, match="coverage"):
            calibrate_kappa(masks, scores, gamma=0.3, ridge=0.1, coverage=1.5)
        with pytest.raises(ValueError, match="tail"):
            calibrate_kappa(masks, scores, gamma=0.3, ridge=0.1, tail="left")
        with pytest.raises(ValueError, match="kappa_grid"):
            calibrate_kappa(masks, scores, gamma=0.3, ridge=0.1, kappa_grid=[-1.0])
        with pytest.raises(ValueError, match="masks"):
            post.std(masks[:, :3])

    def test_sequential_arguments(self, fitted):
        masks, scores, _, _ = fitted
        key = jax.random.key(0)

        def score(m):
            return np.zeros((m.shape[0], 2))

        with pytest.raises(ValueError, match="rounds"):
            sequential_selection(score, masks, scores, 6, rounds=0, per_round=1,
                                 key=key)
        with pytest.raises(ValueError, match="per_round"):
            sequential_selection(score, masks, scores, 6, rounds=1, per_round=0,
                                 key=key)
        with pytest.raises(TypeError, match="key"):
            sequential_selection(score, masks, scores, 6, rounds=1, per_round=1,
                                 key=0)
        with pytest.raises(TypeError, match="score_fn"):
            sequential_selection(None, masks, scores, 6, rounds=1, per_round=1,
                                 key=key)
        with pytest.raises(ValueError, match="gamma and ridge"):
            SurrogateFit(gamma=0.3)
        with pytest.raises(TypeError, match="fit must be a SurrogateFit"):
            sequential_selection(score, masks, scores, 6, rounds=1, per_round=1,
                                 key=key, fit={"gamma": 0.3, "ridge": 0.1})
        with pytest.raises(ValueError, match="kappa"):
            ConfidenceBound(kappa=-1.0)
        with pytest.raises(ValueError, match="mode"):
            ConfidenceBound(mode="greedy")
        with pytest.raises(ValueError, match="num_candidates"):
            CandidatePool(num_candidates=0)
        with pytest.raises(ValueError, match="num_tasks"):
            sequential_selection(score, masks, scores, 5, rounds=1, per_round=1,
                                 key=key)
        with pytest.raises(ValueError, match="max_size"):
            sequential_selection(score, masks, scores, 6, rounds=1, per_round=1,
                                 key=key, pool=CandidatePool(max_size=9))


def test_module_exports():
    for name in uncertainty.__all__:
        assert hasattr(uncertainty, name)


def extrapolation_trap():
    """Every task lowers the loss by 0.2, but tasks 0 and 1 together add 2.0;
    the fitting masks hold at most 4 tasks and never both 0 and 1, so an
    additive extrapolation takes every task (true loss 2.4; the best is 0.6)."""
    num_tasks = 8

    def truth(masks):
        masks = np.atleast_2d(masks)
        return (2.0 - 0.2 * masks.sum(1) + 2.0 * masks[:, 0] * masks[:, 1])[:, None]

    masks = np.array([row for row in all_masks(num_tasks, min_size=1)
                      if row.sum() <= 4 and not (row[0] and row[1])])
    scores = truth(masks) + 0.02 * np.random.default_rng(0).normal(size=(len(masks), 1))
    return num_tasks, truth, masks, scores


def test_trust_region_avoids_an_extrapolation_trap_that_mean_selection_falls_into():
    num_tasks, truth, masks, scores = extrapolation_trap()
    search = surrogates.select_kernel_hyperparameters(masks, scores)
    fitted = surrogates.fit_kernel_surrogate(
        masks, scores, gamma=float(search.gamma), ridge=float(search.ridge))
    plain = select_subset(fitted, num_tasks, method="exhaustive")
    assert plain.mask[0] and plain.mask[1]  # the trap: additive extrapolation
    assert float(truth(plain.mask)[0, 0]) > 2.0
    for radius in (0, 1, 2):
        robust = select_subset(
            trust_region_objective(fitted, max_distance=radius, masks=masks),
            num_tasks, method="exhaustive")
        assert not (robust.mask[0] and robust.mask[1])
        assert hamming_to_data(robust.mask[None], masks)[0] <= radius
        assert float(truth(robust.mask)[0, 0]) < 1.25


def test_pessimistic_bound_avoids_the_trap_that_mean_selection_falls_into():
    """With a lengthscale under which the trap (4 flips from the data) is
    uncertain, mean + 4 std picks a best mask (true loss 0.6) where the mean
    alone falls into the trap; the margins are 0.04 and more (no near-ties)."""
    num_tasks, truth, masks, scores = extrapolation_trap()
    fitted = surrogates.fit_kernel_surrogate(masks, scores, gamma=0.25, ridge=0.01)
    posterior = uncertainty.fit_posterior(fitted, masks, scores)
    every = all_masks(num_tasks, min_size=1)
    trap = np.ones((1, num_tasks))
    plain = select_subset(fitted, num_tasks, method="exhaustive")
    np.testing.assert_array_equal(plain.mask, trap[0])
    mean = np.asarray(fitted.predict(every))[:, 0]
    assert np.sort(mean)[1] - mean.min() > 0.03
    bound = lcb_objective(posterior, kappa=4.0, mode="pessimistic")
    robust = select_subset(bound, num_tasks, method="exhaustive")
    assert not (robust.mask[0] and robust.mask[1])
    assert float(truth(robust.mask)[0, 0]) == pytest.approx(0.6)
    assert float(bound(trap)[0]) - robust.predicted > 0.03
