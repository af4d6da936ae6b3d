import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax.core import metrics, nystrom, surrogates
from tasksurrogate_jax.core.kernels import gram
from tasksurrogate_jax.downstream import attribution, selection

# The random test masks repeat some rows on purpose (as bernoulli draws do);
# the cross-validations' warning about it is tested where it is the subject.
pytestmark = pytest.mark.filterwarnings(
    "ignore::tasksurrogate_jax.core.surrogates.DuplicateMasksWarning")

KEY = jax.random.key(0)
# Nyström (conjugate gradients stopped at a relative residual of
# nystrom.default_tolerance: sqrt(eps) = 3.5e-4 in float32) against the exact
# Cholesky solve, both in float32: ridges >= 0.05 on ~100 rows bound the
# condition number by ~2e3, so the solutions agree to ~2e3 x eps32 (1.2e-7)
# plus the CG tolerance: 1e-3 relative to the scores' scale.
AGREE = 1e-3


def smooth_scores(masks, num_targets, seed, noise):
    """A smooth nonlinear function of the masks (degree-2 dominated) + noise."""
    rng = np.random.default_rng(seed)
    num_tasks = masks.shape[1]
    w1, w2 = rng.normal(size=(2, num_tasks, num_targets))
    z = (2 * masks - 1) / np.sqrt(num_tasks)
    truth = np.logaddexp(0, 2 * z @ w1) + 0.5 * (z @ w2) ** 2
    return truth, truth + noise * truth.std(0) * rng.normal(size=truth.shape)


def small_data(m=90, num_tasks=8, num_targets=3, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, 2, (m, num_tasks)).astype(float)
    _, scores = smooth_scores(masks, num_targets, seed + 1, 0.1)
    return masks, scores


MASKS, SCORES = small_data()
NEW = np.random.default_rng(5).integers(0, 2, (25, 8)).astype(float)
ALL = 10**6  # more centres than distinct masks: every distinct mask


def nystrom_fit(masks=MASKS, scores=SCORES, **kwargs):
    kwargs.setdefault("num_centers", ALL)
    kwargs.setdefault("key", KEY)
    return nystrom.fit_nystrom_surrogate(masks, scores, **kwargs)


@pytest.mark.parametrize("standardize", [True, False])
def test_all_centers_equal_exact_solution(standardize):
    """Centres = every distinct mask: the Nyström solution is the exact one
    (duplicated rows included: K_nM^T K_nM + ridge K_MM keeps their counts)."""
    masks = np.concatenate([MASKS, MASKS[:10]])
    scores = np.concatenate([SCORES, SCORES[:10] + 0.05])
    exact = surrogates.fit_kernel_surrogate(masks, scores, gamma=0.3, ridge=0.05,
                                            standardize=standardize, jitter=0.0,
                                            solver="exact")
    fit = nystrom_fit(masks, scores, gamma=0.3, ridge=0.05, standardize=standardize)
    assert fit.surrogate.train_masks.shape[0] == np.unique(masks, axis=0).shape[0]
    assert bool(jnp.all(fit.converged))
    assert int(fit.iterations.max()) <= 3  # the preconditioner is exact up to rounding
    assert float(fit.residual.max()) < nystrom.default_tolerance(fit.residual.dtype)
    for new in (NEW, masks):
        np.testing.assert_allclose(fit.surrogate.predict(new), exact.predict(new),
                                   rtol=AGREE, atol=AGREE * np.abs(scores).max())


@pytest.mark.parametrize("kernel, params", [
    ("laplacian", {"gamma": 0.3}), ("polynomial", {"gamma": 0.1, "degree": 2}),
    ("linear", {}),
])
def test_all_centers_equal_exact_solution_other_kernels(kernel, params):
    """Also for the singular linear and polynomial K_MM (jitter): predictions
    are unique even where beta is not."""
    exact = surrogates.fit_kernel_surrogate(MASKS, SCORES, kernel=kernel, ridge=0.5,
                                            jitter=0.0, solver="exact", **params)
    fit = nystrom_fit(kernel=kernel, ridge=0.5, **params)
    assert fit.surrogate.kernel == kernel
    np.testing.assert_allclose(fit.surrogate.predict(NEW), exact.predict(NEW),
                               rtol=AGREE, atol=AGREE * np.abs(SCORES).max())


def test_per_target_hyperparameters_equal_exact_solution():
    gamma, ridge = np.array([0.2, 0.3, 0.2]), np.array([0.05, 0.05, 0.1])
    exact = surrogates.fit_kernel_surrogate(MASKS, SCORES, gamma=gamma, ridge=ridge,
                                            jitter=0.0, solver="exact")
    fit = nystrom_fit(gamma=gamma, ridge=ridge)
    np.testing.assert_allclose(fit.surrogate.predict(NEW), exact.predict(NEW),
                               rtol=AGREE, atol=AGREE * np.abs(SCORES).max())
    # Stored in the fit's dtype, exactly.
    dtype = fit.surrogate.gamma.dtype
    np.testing.assert_array_equal(fit.surrogate.gamma, gamma.astype(dtype))
    np.testing.assert_array_equal(fit.surrogate.ridge, ridge.astype(dtype))


@pytest.mark.slow
def test_2000_subsets_500_centers_close_to_exact():
    """m = 2,000 subsets of 20 tasks, 500 centres (more than the 211 Walsh
    functions of degree <= 2 that carry the signal), ridge 0.1 (the better of
    1e-2 / 0.1 / 1 for both solvers here): held-out predictions within 5%
    relative RMS of the exact solver's (4.2% measured) and held-out Spearman
    against the noiseless truth within 0.01 (0.0002 measured). CG reaches the
    float64 tolerance sqrt(eps) = 1.5e-8 in fewer than 30 iterations (24
    measured) and 1e-4 in fewer than 15.

    (At ridge 1e-2 the exact solver also fits degree-3 noise: the two differ by
    13% RMS, and the Nyström Spearman is the higher, 0.984 against 0.974.)
    """
    rng = np.random.default_rng(1)
    masks = rng.integers(0, 2, (2300, 20)).astype(float)
    truth, scores = smooth_scores(masks, 4, 2, 0.3)
    train, test = slice(0, 2000), slice(2000, None)
    exact = surrogates.fit_kernel_surrogate(masks[train], scores[train], ridge=0.1,
                                            solver="exact")
    fit = nystrom_fit(masks[train], scores[train], num_centers=500, ridge=0.1)
    assert fit.surrogate.train_masks.shape[0] == 500
    assert bool(jnp.all(fit.converged)) and int(fit.iterations.max()) < 30
    loose = nystrom_fit(masks[train], scores[train], num_centers=500, ridge=0.1,
                        tolerance=1e-4)
    assert int(loose.iterations.max()) < 15
    ours, ref = fit.surrogate.predict(masks[test]), exact.predict(masks[test])
    rms = jnp.sqrt(jnp.mean((ours - ref) ** 2, 0) / jnp.mean(
        (ref - ref.mean(0)) ** 2, 0))
    assert float(rms.max()) < 0.05, rms
    rho_ours = metrics.spearman(truth[test], ours)
    rho_exact = metrics.spearman(truth[test], ref)
    np.testing.assert_allclose(rho_ours, rho_exact, atol=0.01)


def test_blocked_kernel_rows_match_cached():
    cached = nystrom_fit(num_centers=40)
    # 40 centres x 8 bytes x 4 x 7 rows: blocks of 7 rows, K_nM not cached.
    budget = 40 * 8 * 4 * 7
    layout = nystrom._layout(MASKS.shape[0], 40, 8, budget)
    assert not layout.cached and layout.block_rows <= 7
    blocked = nystrom_fit(num_centers=40, memory_budget=budget)
    np.testing.assert_array_equal(blocked.centers, cached.centers)
    # Same solve; only the order of the floating-point sums differs (and so,
    # by one at most, the number of CG steps: the CG tolerance, AGREE).
    np.testing.assert_allclose(blocked.surrogate.predict(NEW),
                               cached.surrogate.predict(NEW), rtol=AGREE,
                               atol=AGREE * np.abs(SCORES).max())
    assert np.abs(np.asarray(blocked.iterations - cached.iterations)).max() <= 1


@pytest.mark.slow
def test_float32_converges_close_to_float64():
    masks, scores = small_data(m=400, num_tasks=10, seed=3)
    f64 = nystrom_fit(masks, scores, num_centers=150)
    f32 = nystrom_fit(masks.astype(np.float32), scores.astype(np.float32),
                      num_centers=150)
    assert f32.surrogate.alpha.dtype == jnp.float32
    assert bool(jnp.all(f32.converged))
    assert int(f32.iterations.max()) < nystrom.DEFAULT_MAX_ITERATIONS
    np.testing.assert_array_equal(f32.centers, f64.centers)
    new = np.random.default_rng(4).integers(0, 2, (30, 10)).astype(np.float32)
    p32, p64 = f32.surrogate.predict(new), f64.surrogate.predict(new)
    np.testing.assert_allclose(p32, p64, rtol=0, atol=1e-3 * np.abs(scores).max())


def test_same_key_same_centres_different_key_different():
    first = nystrom_fit(num_centers=30)
    again = nystrom_fit(num_centers=30)
    other = nystrom_fit(num_centers=30, key=jax.random.key(1))
    np.testing.assert_array_equal(first.centers, again.centers)
    np.testing.assert_array_equal(first.surrogate.predict(NEW),
                                  again.surrogate.predict(NEW))
    assert not np.array_equal(first.centers, other.centers)
    # Centres are distinct masks, sorted row indices of `masks`.
    assert np.all(np.diff(first.centers) > 0)
    assert np.unique(MASKS[first.centers], axis=0).shape[0] == 30


def test_centres_are_distinct_masks():
    masks = np.concatenate([MASKS[:5]] * 4)  # 5 distinct masks, 20 rows
    np.testing.assert_array_equal(nystrom.nystrom_centers(masks, 3, KEY).size, 3)
    np.testing.assert_array_equal(nystrom.nystrom_centers(masks, 7, KEY),
                                  np.arange(5))


def test_auto_solver_is_exact_for_small_m_and_nystrom_above_threshold(monkeypatch):
    exact = surrogates.fit_kernel_surrogate(MASKS, SCORES, solver="exact")
    auto = surrogates.fit_kernel_surrogate(MASKS, SCORES)
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(exact), strict=True):
        np.testing.assert_array_equal(a, b)

    monkeypatch.setattr(surrogates, "AUTO_EXACT_MAX_SUBSETS", MASKS.shape[0] - 1)
    auto = surrogates.fit_kernel_surrogate(MASKS, SCORES, num_centers=20)
    direct = nystrom_fit(num_centers=20,
                         key=jax.random.key(surrogates.NYSTROM_DEFAULT_SEED))
    assert auto.train_masks.shape[0] == 20
    np.testing.assert_array_equal(auto.alpha, direct.surrogate.alpha)
    monkeypatch.setattr(surrogates, "AUTO_EXACT_MAX_SUBSETS", MASKS.shape[0])
    assert surrogates.fit_kernel_surrogate(
        MASKS, SCORES, num_centers=20).train_masks.shape[0] == MASKS.shape[0]


def test_fit_kernel_surrogate_solver_errors():
    with pytest.raises(ValueError, match="solver"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES, solver="falkon")
    with pytest.raises(ValueError, match="num_centers"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES, solver="exact", num_centers=5)
    with pytest.raises(ValueError, match="key"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES, solver="exact", key=KEY)
    with pytest.raises(ValueError, match="ridge"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES, solver="nystrom", ridge=0.0)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda m, s: surrogates.fit_kernel_surrogate(
            m, s, solver="nystrom").alpha)(MASKS, SCORES)


def test_nystrom_surrogate_drives_attribution_and_selection():
    exact = surrogates.fit_kernel_surrogate(MASKS, SCORES, gamma=0.3, ridge=0.05,
                                            jitter=0.0, solver="exact")
    approx = nystrom_fit(gamma=0.3, ridge=0.05).surrogate
    np.testing.assert_allclose(attribution.loo_scores(approx),
                               attribution.loo_scores(exact), rtol=AGREE,
                               atol=AGREE * np.abs(SCORES).max())
    chosen = selection.select_subset(approx, 8, size=3)
    reference = selection.select_subset(exact, 8, size=3)
    assert chosen.indices == reference.indices
    np.testing.assert_allclose(chosen.predicted, reference.predicted, rtol=AGREE)


def test_not_converging_warns():
    with pytest.warns(RuntimeWarning, match="max_iterations=1"):
        fit = nystrom_fit(num_centers=20, max_iterations=1, tolerance=1e-12)
    assert not bool(jnp.any(fit.converged))
    np.testing.assert_array_equal(fit.iterations, 1)


def test_constant_target_is_converged_at_zero():
    scores = np.column_stack([SCORES[:, 0], np.full(MASKS.shape[0], 2.5)])
    fit = nystrom_fit(scores=scores, num_centers=20)
    assert int(fit.iterations[1]) == 0 and float(fit.residual[1]) == 0.0
    np.testing.assert_allclose(fit.surrogate.predict(NEW)[:, 1], 2.5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_centers": 0}, ValueError, "num_centers"),
    ({"num_centers": 2.5}, TypeError, "num_centers"),
    ({"ridge": 0.0}, ValueError, "ridge"),
    ({"ridge": -1.0}, ValueError, "ridge"),
    ({"memory_budget": 0}, ValueError, "memory_budget"),
    ({"memory_budget": 1.5e9}, TypeError, "memory_budget"),
    ({"max_iterations": 0}, ValueError, "max_iterations"),
    ({"tolerance": 0.0}, ValueError, "tolerance"),
    ({"tolerance": 1.5}, ValueError, "tolerance"),
    ({"tolerance": "small"}, TypeError, "tolerance"),
    ({"max_iterations": 10.0}, TypeError, "max_iterations"),
    ({"key": None}, TypeError, "key"),
    ({"gamma": -1.0}, ValueError, "gamma"),
    ({"gamma": np.ones(2)}, ValueError, "gamma"),
    ({"kernel": "cosine"}, ValueError, "kernel"),
    ({"jitter": -1.0}, ValueError, "jitter"),
])
def test_fit_bad_inputs_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        nystrom_fit(**kwargs)


def test_fit_bad_data_errors():
    with pytest.raises(ValueError, match="scores"):
        nystrom.fit_nystrom_surrogate(MASKS, SCORES[:-1], num_centers=5, key=KEY)
    with pytest.raises(ValueError, match="masks"):
        nystrom.fit_nystrom_surrogate(MASKS + 0.5, SCORES, num_centers=5, key=KEY)


def gp_data(true_gamma, m=600, num_tasks=14, seed=7):
    """Scores drawn from a Gaussian process with an RBF covariance of width
    ``true_gamma``, plus 10% noise."""
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, 2, (m, num_tasks)).astype(float)
    evals, evecs = np.linalg.eigh(np.asarray(gram(masks, masks, gamma=true_gamma)))
    truth = (evecs * np.sqrt(np.maximum(evals, 0))) @ rng.normal(size=(m, 2))
    return masks, truth + 0.1 * truth.std(0) * rng.normal(size=truth.shape)


GRID = {"gammas": [0.05, 0.5, 5.0], "ridges": [1e-2, 1e-1, 1.0]}


@pytest.mark.slow
@pytest.mark.parametrize("true_gamma", [0.05, 0.5])
def test_holdout_search_picks_true_gamma(true_gamma):
    masks, scores = gp_data(true_gamma)
    search = nystrom.select_nystrom_hyperparameters(
        masks, scores, key=KEY, num_centers=300, criterion="mse", **GRID)
    assert search.method == "holdout" and search.criterion == "mse"
    assert search.table.shape == (3, 3, 2)
    assert float(search.gamma) == pytest.approx(true_gamma)
    assert search.ridge in np.asarray(GRID["ridges"], search.ridges.dtype)


@pytest.mark.slow
def test_kfold_search_picks_true_gamma_per_target():
    masks, scores = gp_data(0.5)
    search = nystrom.select_nystrom_hyperparameters(
        masks, scores, key=KEY, num_centers=300, method="kfold", num_folds=3,
        criterion="spearman", per_target=True, **GRID)
    assert search.method == "kfold" and search.gamma.shape == (2,)
    np.testing.assert_allclose(search.gamma, 0.5)


@pytest.mark.slow
def test_select_table_matches_direct_holdout_fit():
    """One cell of the table = a fit on the training split scored on the rest."""
    search = nystrom.select_nystrom_hyperparameters(
        MASKS, SCORES, key=KEY, num_centers=ALL, gammas=[0.3], ridges=[0.05, 0.5],
        criterion="mse")
    split_key, _ = jax.random.split(KEY)
    order = np.asarray(jax.random.permutation(split_key, MASKS.shape[0]))
    held = np.sort(order[MASKS.shape[0] - 18:])
    train = np.setdiff1d(order, held)
    fit = nystrom_fit(MASKS[train], SCORES[train], gamma=0.3, ridge=0.5)
    mean, scale = SCORES[train].mean(0), SCORES[train].std(0)
    predicted = (fit.surrogate.predict(MASKS[held]) - mean) / scale
    mse = np.mean((predicted - (SCORES[held] - mean) / scale) ** 2, 0)
    np.testing.assert_allclose(search.table[0, 1], mse, rtol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "loo"}, ValueError, "method"),
    ({"criterion": "r2"}, ValueError, "criterion"),
    ({"holdout_fraction": 0.0}, ValueError, "holdout_fraction"),
    ({"holdout_fraction": 1.0}, ValueError, "holdout_fraction"),
    ({"holdout_fraction": 0.001}, ValueError, "holdout_fraction"),
    ({"holdout_fraction": None}, TypeError, "holdout_fraction"),
    ({"method": "kfold", "num_folds": 1}, ValueError, "num_folds"),
    ({"method": "kfold", "num_folds": 50}, ValueError, "num_folds"),
    ({"ridges": [0.0, 1.0]}, ValueError, "ridges"),
    ({"gammas": [-1.0]}, ValueError, "gammas"),
    ({"num_centers": 0}, ValueError, "num_centers"),
    ({"key": None}, TypeError, "key"),
    ({"memory_budget": -5}, ValueError, "memory_budget"),
])
def test_select_bad_inputs_name_the_argument(kwargs, error, match):
    kwargs = {"key": KEY, "num_centers": 20, **kwargs}
    with pytest.raises(error, match=match):
        nystrom.select_nystrom_hyperparameters(MASKS, SCORES, **kwargs)


def test_default_search_is_mse_on_ridges_above_the_rounding_error():
    rows = np.sort(np.unique(MASKS, axis=0, return_index=True)[1])  # distinct
    masks32 = np.asarray(MASKS[rows], np.float32)
    search = nystrom.select_nystrom_hyperparameters(
        masks32, np.asarray(SCORES[rows], np.float32), key=KEY, num_centers=20,
        gammas=[0.3])
    assert search.criterion == "mse"
    np.testing.assert_allclose(
        search.ridges, surrogates.default_ridge_grid(rows.size, np.float32),
        rtol=1e-6)
    assert float(search.ridges.min()) >= 10 * np.finfo(np.float32).eps * rows.size


def test_default_num_centers_rule():
    assert nystrom.default_num_centers(500) == 500
    assert nystrom.default_num_centers(8_000) == 2_000
    assert nystrom.default_num_centers(100_000) == 3_163
    assert nystrom.default_tolerance(np.float64) == pytest.approx(1.49e-8, rel=1e-2)


def test_predict_makes_no_implicit_transfer():
    """The Nyström surrogate's prediction of device-resident masks, eager and
    jitted, runs with implicit transfers disallowed."""
    surrogate = nystrom_fit(num_centers=30,
                            gamma=np.array([0.1, 0.3, 0.1])).surrogate
    expected = surrogate.predict(NEW)
    new = jax.device_put(NEW)
    with jax.transfer_guard("disallow"):
        eager = surrogate.predict(new)
        jitted = jax.jit(lambda s, x: s.predict(x))(surrogate, new)
    np.testing.assert_allclose(eager, expected, rtol=1e-12)
    np.testing.assert_allclose(jitted, expected, rtol=1e-12)
