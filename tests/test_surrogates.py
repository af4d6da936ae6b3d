import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import Ridge

from tasksurrogate_jax import pipeline
from tasksurrogate_jax.core import metrics, surrogates
from tasksurrogate_jax.core.kernels import KERNELS
from tasksurrogate_jax.downstream import attribution

# The random test masks repeat some rows on purpose (as bernoulli draws do);
# the cross-validations' warning about it is tested where it is the subject.
pytestmark = pytest.mark.filterwarnings(
    "ignore::tasksurrogate_jax.core.surrogates.DuplicateMasksWarning")

RNG = np.random.default_rng(0)
NUM_TASKS = 8


def make_data(m=60, num_targets=5, num_tasks=NUM_TASKS, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, 2, (m, num_tasks)).astype(float)
    w = rng.normal(size=(num_tasks, num_targets))
    pair = rng.normal(size=(num_targets,))
    scores = masks @ w + pair * (masks[:, 0] * masks[:, 1])[:, None] + 0.1 * rng.normal(
        size=(m, num_targets))
    return masks, scores


MASKS, SCORES = make_data()
DISTINCT = np.sort(np.unique(MASKS, axis=0, return_index=True)[1])  # rows
NEW = RNG.integers(0, 2, (17, NUM_TASKS)).astype(float)
KERNEL_PARAMS = {"rbf": {"gamma": 0.2}, "laplacian": {"gamma": 0.3},
                 "polynomial": {"gamma": 0.1, "degree": 2, "coef0": 1.0},
                 "linear": {}}


class KernelSurrogateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_sklearn_kernel_ridge_for_every_kernel(self):
        for kernel in KERNELS:
            params = KERNEL_PARAMS[kernel]
            ridge = 0.5

            def fit_predict(masks, scores, new, kernel=kernel, params=params,
                            ridge=ridge):
                fitted = surrogates.fit_kernel_surrogate(
                    masks, scores, kernel=kernel, ridge=ridge, jitter=0.0,
                    standardize=False, **params)
                return fitted.predict(new)

            ours = self.variant(fit_predict)(MASKS, SCORES, NEW)
            ref = KernelRidge(alpha=ridge, kernel=kernel, **params).fit(
                MASKS, SCORES).predict(NEW)
            # float32 against sklearn's float64: ridge 0.5 bounds the condition
            # number by (m + 0.5) / 0.5 ~ 120, so eps32 (1.2e-7) x 120 x |y| (~5)
            # ~ 1e-4 at worst.
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4,
                                       err_msg=kernel)


def test_standardized_fit_matches_sklearn_on_standardized_targets():
    mean, std = SCORES.mean(0), SCORES.std(0)
    fitted = surrogates.fit_kernel_surrogate(MASKS, SCORES, ridge=0.1, gamma=0.2,
                                             jitter=0.0, standardize=True)
    ref = KernelRidge(alpha=0.1, kernel="rbf", gamma=0.2).fit(
        MASKS, (SCORES - mean) / std).predict(NEW) * std + mean
    # float32 against float64: condition number <= (m + 0.1) / 0.1 ~ 600 on
    # standardized targets: eps32 x 600 ~ 1e-4.
    np.testing.assert_allclose(fitted.predict(NEW), ref, rtol=1e-4, atol=1e-4)


def test_per_target_hyperparameters_equal_separate_fits():
    gamma = np.array([0.1, 0.4, 0.1, 0.4, 0.2])
    ridge = np.array([1e-2, 1e-2, 1.0, 1e-2, 0.3])
    fitted = surrogates.fit_kernel_surrogate(MASKS, SCORES, gamma=gamma, ridge=ridge)
    assert fitted.gammas.shape == (3,)
    np.testing.assert_allclose(fitted.gamma, gamma)
    predicted = fitted.predict(NEW)
    for t in range(SCORES.shape[1]):
        single = surrogates.fit_kernel_surrogate(MASKS, SCORES[:, t], gamma=gamma[t],
                                                 ridge=ridge[t])
        # The same float32 solve, batched with the other targets or alone:
        # ridge 1e-2 (condition number up to ~6e3) x eps32 (1.2e-7) ~ 1e-3.
        np.testing.assert_allclose(predicted[:, t], single.predict(NEW)[:, 0],
                                   rtol=1e-3, atol=1e-3)
    jitted = jax.jit(lambda s, x: s.predict(x))(fitted, NEW)
    # One program against another (fusion changes the float32 rounding).
    np.testing.assert_allclose(jitted, predicted, rtol=1e-5, atol=1e-6)


def test_fitted_surrogates_are_pytrees_that_pass_through_jit_without_retracing():
    kernel = surrogates.fit_kernel_surrogate(MASKS, SCORES)
    linear = surrogates.fit_linear_surrogate(MASKS, SCORES)

    @jax.jit
    @chex.assert_max_traces(n=2)
    def predict(surrogate, masks):
        return surrogate.predict(masks)

    for surrogate in (kernel, linear):
        np.testing.assert_allclose(predict(surrogate, NEW),
                                   surrogates.predict(surrogate, NEW), rtol=1e-12)
    refit = surrogates.fit_kernel_surrogate(MASKS, SCORES + 1.0)
    predict(refit, NEW)  # same structure: no new trace
    leaves = jax.tree_util.tree_leaves(kernel)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    doubled = jax.tree_util.tree_map(lambda a: a, kernel)
    assert doubled.kernel == "rbf"


def test_predict_and_jitted_fit_make_no_implicit_transfer():
    """Device-resident masks: eager and jitted predictions (one width, per-target
    widths, blocks) and a fit under jit run with implicit transfers disallowed."""
    per_target = surrogates.fit_kernel_surrogate(
        MASKS, SCORES, gamma=np.array([0.1, 0.4, 0.1, 0.4, 0.2]))
    fitted = (per_target, surrogates.fit_kernel_surrogate(MASKS, SCORES),
              surrogates.fit_linear_surrogate(MASKS, SCORES))
    expected = [s.predict(NEW) for s in fitted]
    masks, scores, new = (jax.device_put(x) for x in (MASKS, SCORES, NEW))
    jitted_predict = jax.jit(lambda s, x: s.predict(x))
    fit_predict = jax.jit(lambda m, y, x: surrogates.fit_kernel_surrogate(
        m, y, gamma=0.2, ridge=0.1).predict(x))
    with jax.transfer_guard("disallow"):
        eager = [s.predict(new) for s in fitted]
        jitted = [jitted_predict(s, new) for s in fitted]
        blocked = [s.predict(new, block_size=5) for s in fitted[:2]]
        refit = fit_predict(masks, scores, new)
    # Eager, jitted and blocked programs round float32 differently (eps 1.2e-7
    # over sums of m = 60 kernel terms); the refit solves at ridge 0.1.
    for ours, ref in zip(eager + jitted + blocked, expected * 2 + expected[:2],
                         strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(refit, surrogates.fit_kernel_surrogate(
        MASKS, SCORES, gamma=0.2, ridge=0.1).predict(NEW), rtol=1e-4, atol=1e-4)


def test_predict_does_not_copy_device_masks_to_the_host(monkeypatch):
    """The 0/1 check (a host copy) is skipped for a JAX array of the
    surrogate's dtype and shape, and still runs on other inputs."""
    fitted = surrogates.fit_kernel_surrogate(MASKS, SCORES)
    expected = fitted.predict(NEW)

    def host_check(masks, num_tasks):
        raise AssertionError("check_masks ran on device-resident masks")

    monkeypatch.setattr("tasksurrogate_jax.core.ridge.check_masks", host_check)
    np.testing.assert_allclose(fitted.predict(jax.device_put(NEW)), expected,
                               rtol=1e-12)
    with pytest.raises(AssertionError, match="check_masks ran"):
        fitted.predict(NEW)


def test_jitter_grows_until_the_factor_is_finite():
    duplicated = np.concatenate([MASKS[:10]] * 3)
    scores = np.concatenate([SCORES[:10]] * 3)
    fitted = surrogates.fit_kernel_surrogate(duplicated, scores, ridge=0.0,
                                             jitter=0.0)
    assert float(fitted.jitter[0]) > 0
    assert np.all(np.isfinite(fitted.predict(NEW)))


def test_factorization_failure_raises_clear_error_eagerly_and_under_jit():
    kwargs = {"kernel": "polynomial", "gamma": 1.0, "coef0": -1.0, "degree": 3,
              "ridge": 0.0}
    with pytest.raises(ValueError, match="could not be factored"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES, **kwargs)
    fit = jax.jit(lambda m, s: surrogates.fit_kernel_surrogate(m, s, **kwargs).alpha)
    with pytest.raises(Exception, match="could not be factored"):
        jax.block_until_ready(fit(MASKS, SCORES))


def test_factorization_failure_of_one_per_target_pair_names_its_ridge():
    """Every (gamma, ridge) pair is solved before the one check of the fit."""
    with pytest.raises(ValueError, match=r"could not be factored.*ridge=0;"):
        surrogates.fit_kernel_surrogate(
            MASKS, SCORES, kernel="polynomial", gamma=1.0, coef0=-1.0, degree=3,
            ridge=np.array([0.5, 0.5, 0.0, 0.5, 0.5]))


@pytest.mark.float64  # a rank-deficient least squares: its minimum-norm
class RankDeficientLinearSurrogateTest(chex.TestCase):  # solution is ill-conditioned
    @chex.variants(with_jit=True, without_jit=True)
    def test_no_intercept_min_norm_matches_numpy_lstsq_on_rank_deficient_masks(self):
        masks = np.concatenate([MASKS, MASKS[:, :2]], axis=1)  # repeated columns
        fit = self.variant(lambda m, s: surrogates.fit_linear_surrogate(
            m, s, fit_intercept=False))
        fitted = fit(masks, SCORES)
        ref = np.linalg.lstsq(masks, SCORES, rcond=None)[0]
        np.testing.assert_allclose(fitted.coef, ref, rtol=1e-8, atol=1e-10)
        np.testing.assert_array_equal(fitted.intercept, 0.0)


class LinearSurrogateTest(chex.TestCase):
    def test_intercept_least_squares_matches_lstsq_with_a_ones_column(self):
        fitted = surrogates.fit_linear_surrogate(MASKS, SCORES)
        design = np.concatenate([np.ones((MASKS.shape[0], 1)), MASKS], axis=1)
        ref = np.linalg.lstsq(design, SCORES, rcond=None)[0]
        # float32 normal equations against float64 lstsq: the 0/1 design's
        # Gram matrix has condition number ~1e2 (squared: ~1e4 x eps32 ~ 1e-3).
        np.testing.assert_allclose(fitted.intercept, ref[0], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(fitted.coef, ref[1:], rtol=1e-3, atol=1e-4)

    def test_ridge_matches_sklearn_ridge(self):
        for fit_intercept in (True, False):
            fitted = surrogates.fit_linear_surrogate(MASKS, SCORES, ridge=2.0,
                                                     fit_intercept=fit_intercept)
            ref = Ridge(alpha=2.0, fit_intercept=fit_intercept).fit(MASKS, SCORES)
            # float32 against float64, ridge 2 (well conditioned): ~1e2 x eps32.
            np.testing.assert_allclose(fitted.predict(NEW), ref.predict(NEW),
                                       rtol=1e-4, atol=1e-4)


def explicit_loo(masks, scores, gamma, ridge):
    predictions = np.zeros_like(scores)
    for i in range(masks.shape[0]):
        keep = np.arange(masks.shape[0]) != i
        model = KernelRidge(alpha=ridge, kernel="rbf", gamma=gamma).fit(
            masks[keep], scores[keep])
        predictions[i] = model.predict(masks[i:i + 1])[0]
    return predictions


GAMMAS = np.array([0.05, 0.2, 0.8])
RIDGES = np.array([1e-3, 1e-1, 1.0])


# Ridges down to 1e-3 on m = 30: condition numbers up to ~3e4, too many for
# float32 (3e4 x 1.2e-7 ~ 4e-3) against float64 sklearn refits at 1e-7 to 1e-10.
@pytest.mark.float64
def test_closed_form_loo_predictions_equal_explicit_refits():
    masks, scores = MASKS[:30], SCORES[:30]
    for gamma in GAMMAS:
        for ridge in RIDGES:
            closed = surrogates.kernel_loo_predictions(masks, scores, gamma=gamma,
                                                       ridge=ridge)
            np.testing.assert_allclose(closed, explicit_loo(masks, scores, gamma,
                                                            ridge),
                                       rtol=0, atol=1e-10)


@pytest.mark.float64  # ridges down to 1e-3, as above
@pytest.mark.parametrize("criterion", ["mse", "spearman"])
def test_closed_form_loo_table_is_the_criterion_of_those_predictions(criterion):
    masks, scores = MASKS[:30], SCORES[:30]
    search = surrogates.select_kernel_hyperparameters(
        masks, scores, gammas=GAMMAS, ridges=RIDGES, method="loo",
        criterion=criterion, standardize=False)
    assert search.table.shape == (3, 3, scores.shape[1])
    for a, gamma in enumerate(GAMMAS):
        for b, ridge in enumerate(RIDGES):
            held_out = explicit_loo(masks, scores, gamma, ridge)
            if criterion == "mse":
                ref = ((held_out - scores) ** 2).mean(0)
            else:
                # Spearman is discontinuous: the comparison holds only while no
                # two held-out predictions are closer than their rounding error
                # (1e-10 above), which this data guarantees by a wide margin.
                gaps = np.diff(np.sort(held_out, axis=0), axis=0)
                assert gaps.min() > 1e-8, (gamma, ridge, gaps.min())
                ref = scipy.stats.spearmanr(scores, held_out).statistic[
                    :scores.shape[1], scores.shape[1]:].diagonal()
            np.testing.assert_allclose(search.table[a, b], ref, rtol=1e-7,
                                       atol=1e-9)
    best = np.unravel_index(
        (np.argmin if criterion == "mse" else np.argmax)(search.mean_table), (3, 3))
    assert float(search.gamma) == GAMMAS[best[0]]
    assert float(search.ridge) == RIDGES[best[1]]


@pytest.mark.float64  # ridges down to 1e-3, as above
@pytest.mark.parametrize("standardize", [False, True])
def test_kfold_equals_explicit_refits_per_fold(standardize):
    masks, scores = MASKS[:43], SCORES[:43]  # unequal folds, like sklearn's KFold
    search = surrogates.select_kernel_hyperparameters(
        masks, scores, gammas=GAMMAS, ridges=RIDGES, method="kfold", num_folds=4,
        criterion="mse", standardize=standardize)
    folds = np.array_split(np.arange(43), 4)
    for a, gamma in enumerate(GAMMAS):
        for b, ridge in enumerate(RIDGES):
            per_fold = []
            for fold in folds:
                train = np.setdiff1d(np.arange(43), fold)
                y = scores[train]
                mean, std = (y.mean(0), y.std(0)) if standardize else (0.0, 1.0)
                model = KernelRidge(alpha=ridge, kernel="rbf", gamma=gamma).fit(
                    masks[train], (y - mean) / std)
                residual = model.predict(masks[fold]) - (scores[fold] - mean) / std
                per_fold.append((residual ** 2).mean(0))
            np.testing.assert_allclose(search.table[a, b], np.mean(per_fold, 0),
                                       rtol=1e-7)


@pytest.mark.parametrize("method", ["loo", "kfold"])
def test_selection_runs_under_jit(method):
    kwargs = {"gammas": GAMMAS, "ridges": RIDGES, "method": method}
    eager = surrogates.select_kernel_hyperparameters(MASKS, SCORES, **kwargs)
    jitted = jax.jit(lambda m, s: surrogates.select_kernel_hyperparameters(
        m, s, **kwargs))(MASKS, SCORES)
    # Squared errors (the default criterion) summed in another order under
    # jit: a few float32 ulps (observed 1.4e-6 relative), far below the
    # differences between grid cells.
    np.testing.assert_allclose(jitted.table, eager.table, rtol=1e-5)
    assert float(jitted.gamma) == float(eager.gamma)


def test_kfold_with_key_shuffles_reproducibly():
    kwargs = {"gammas": GAMMAS, "ridges": RIDGES, "method": "kfold"}
    a = surrogates.select_kernel_hyperparameters(MASKS, SCORES, key=jax.random.key(1),
                                                 **kwargs)
    b = surrogates.select_kernel_hyperparameters(MASKS, SCORES, key=jax.random.key(1),
                                                 **kwargs)
    c = surrogates.select_kernel_hyperparameters(MASKS, SCORES, **kwargs)
    np.testing.assert_array_equal(a.table, b.table)
    assert not np.allclose(a.table, c.table)


def test_per_target_selection_picks_the_best_cell_of_each_column():
    search = surrogates.select_kernel_hyperparameters(
        MASKS, SCORES, gammas=GAMMAS, ridges=RIDGES, per_target=True,
        criterion="mse")
    assert search.gamma.shape == (SCORES.shape[1],)
    for t in range(SCORES.shape[1]):
        a, b = np.unravel_index(np.argmin(search.table[..., t]), (3, 3))
        assert search.gamma[t] == GAMMAS[a] and search.ridge[t] == RIDGES[b]
    fitted = surrogates.fit_kernel_surrogate(MASKS, SCORES, gamma=search.gamma,
                                             ridge=search.ridge)
    assert fitted.predict(NEW).shape == (NEW.shape[0], SCORES.shape[1])


@pytest.mark.slow
def test_kernel_surrogate_captures_an_interaction_the_linear_one_misses():
    masks = np.asarray(jnp.asarray(RNG.integers(0, 2, (200, 6)), float))
    xor = (masks[:, 0] != masks[:, 1]).astype(float)[:, None]
    train, test = slice(0, 150), slice(150, None)
    kernel = surrogates.fit_kernel_surrogate(masks[train], xor[train], gamma=0.5,
                                             ridge=1e-3)
    linear = surrogates.fit_linear_surrogate(masks[train], xor[train])
    kernel_error = metrics.normalized_error(true=xor[test],
                                            predicted=kernel.predict(masks[test]))
    linear_error = metrics.normalized_error(true=xor[test],
                                            predicted=linear.predict(masks[test]))
    assert float(kernel_error[0]) < 0.05 < 0.9 < float(linear_error[0])


# --- bad input: one test each -------------------------------------------------


def test_masks_that_are_not_binary():
    with pytest.raises(ValueError, match="masks must hold only 0 and 1, found 0.5"):
        surrogates.fit_kernel_surrogate(MASKS * 0.5, SCORES)


def test_non_finite_scores():
    bad = SCORES.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"scores must be finite.*rows \[3\]"):
        surrogates.fit_linear_surrogate(MASKS, bad)


def test_mismatched_rows():
    with pytest.raises(ValueError, match="scores has 59 rows but masks has 60"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES[:-1])
    with pytest.raises(ValueError, match="scores has 59 rows but masks has 60"):
        jax.jit(surrogates.fit_kernel_surrogate)(MASKS, SCORES[:-1])


def test_different_num_tasks_at_predict_time():
    fitted = surrogates.fit_kernel_surrogate(MASKS, SCORES)
    with pytest.raises(ValueError, match="has 5 task columns, expected 8"):
        fitted.predict(NEW[:, :5])
    with pytest.raises(ValueError, match="has 5 task columns, expected 8"):
        jax.jit(lambda s, x: s.predict(x))(fitted, NEW[:, :5])
    linear = surrogates.fit_linear_surrogate(MASKS, SCORES)
    with pytest.raises(ValueError, match="has 5 task columns, expected 8"):
        linear.predict(NEW[:, :5])


def test_too_few_subsets():
    with pytest.raises(ValueError, match="at least 2 subsets"):
        surrogates.fit_kernel_surrogate(MASKS[:1], SCORES[:1])
    with pytest.raises(ValueError, match="num_folds=5 needs at least 10 subsets"):
        surrogates.select_kernel_hyperparameters(MASKS[:8], SCORES[:8],
                                                 method="kfold")


def test_unknown_kernel_name():
    with pytest.raises(ValueError, match="kernel must be one of"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES, kernel="gaussian")


def test_non_positive_gamma():
    with pytest.raises(ValueError, match="gamma must be positive"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES, gamma=0.0)
    with pytest.raises(ValueError, match="gammas must be positive"):
        surrogates.select_kernel_hyperparameters(MASKS, SCORES, gammas=[0.1, -1.0])


def test_negative_ridge():
    with pytest.raises(ValueError, match="ridge must be non-negative"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES, ridge=-1.0)
    with pytest.raises(ValueError, match="ridge must be non-negative"):
        surrogates.fit_linear_surrogate(MASKS, SCORES, ridge=-1.0)
    with pytest.raises(ValueError, match="ridges must be positive"):
        surrogates.select_kernel_hyperparameters(MASKS, SCORES, ridges=[0.0, 1.0])


def test_bad_selection_options():
    with pytest.raises(ValueError, match="method must be 'loo' or 'kfold'"):
        surrogates.select_kernel_hyperparameters(MASKS, SCORES, method="gcv")
    with pytest.raises(ValueError, match="criterion must be 'mse' or 'spearman'"):
        surrogates.select_kernel_hyperparameters(MASKS, SCORES, criterion="r2")
    with pytest.raises(ValueError, match=r"gamma must be a scalar or have shape"):
        surrogates.fit_kernel_surrogate(MASKS, SCORES, gamma=np.ones(3))
    with pytest.raises(TypeError, match="must be a LinearSurrogate or"):
        surrogates.predict("model", NEW)


@pytest.mark.float64  # float32 warns, float64 (its second half) does not
def test_selection_warns_when_a_ridge_is_below_float32_precision():
    masks32 = np.asarray(MASKS, np.float32)
    scores32 = np.asarray(SCORES, np.float32)
    with pytest.warns(RuntimeWarning, match="rounding error of the float32"):
        surrogates.select_kernel_hyperparameters(masks32, scores32, gammas=[0.1],
                                                 ridges=[1e-6, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        surrogates.select_kernel_hyperparameters(MASKS[DISTINCT], SCORES[DISTINCT],
                                                 gammas=[0.1], ridges=[1e-6, 1.0])


@pytest.mark.float64  # the default and np.float64 grids are float64's
def test_default_ridge_grid_drops_ridges_below_float32_precision():
    np.testing.assert_allclose(surrogates.default_ridge_grid(),
                               10.0 ** np.arange(-4, 2))
    assert surrogates.default_ridge_grid(100, np.float64).size == 6
    kept = surrogates.default_ridge_grid(100, np.float32)  # threshold 1.2e-4
    np.testing.assert_allclose(kept, 10.0 ** np.arange(-3, 2))
    masks = distinct_masks(100, 8).astype(np.float32)
    scores = masks @ np.arange(8, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no precision warning with this grid
        surrogates.select_kernel_hyperparameters(masks, scores, ridges=kept)


def distinct_masks(m, num_tasks, seed=0):
    """``m`` distinct random masks (codes drawn without replacement)."""
    codes = np.random.default_rng(seed).choice(2**num_tasks, m, replace=False)
    return ((codes[:, None] >> np.arange(num_tasks)) & 1).astype(np.float64)


@pytest.mark.parametrize("num_subsets", [128, 480])
@pytest.mark.parametrize("method, kernel", [("loo", "rbf"), ("kfold", "rbf"),
                                            ("loo", "polynomial"), ("loo", "linear")])
def test_default_ridges_never_trip_the_precision_warning_in_float32(
        num_subsets, method, kernel):
    # Issue 23: at m = 128 the default grid held 1e-4 < 10 eps m = 1.5e-4.
    masks = distinct_masks(num_subsets, 10).astype(np.float32)
    scores = (masks @ np.linspace(-1, 1, 10, dtype=np.float32)
              + 0.3 * masks[:, 0] * masks[:, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search = surrogates.select_kernel_hyperparameters(masks, scores,
                                                          method=method,
                                                          kernel=kernel)
    assert search.ridges.dtype == jnp.float32
    assert float(search.ridges.min()) >= 10 * np.finfo(np.float32).eps * num_subsets
    if kernel == "rbf":
        np.testing.assert_allclose(
            search.ridges, surrogates.default_ridge_grid(num_subsets, np.float32),
            rtol=1e-6)
    # The explicit full grid still warns: the threshold is real.
    with pytest.warns(RuntimeWarning, match="rounding error of the float32"):
        surrogates.select_kernel_hyperparameters(
            masks, scores, method=method, kernel=kernel,
            ridges=surrogates.default_ridge_grid())


@pytest.mark.float64  # np.float64 means float32 without 64-bit JAX
def test_default_ridge_grid_keeps_one_ridge_beyond_the_grid():
    # float32, 10 million subsets: 10 eps m = 11.9 is above the whole grid.
    grid = surrogates.default_ridge_grid(10_000_000, np.float32)
    np.testing.assert_allclose(grid, [100.0])
    assert surrogates.default_ridge_grid(128, np.float32).min() == 1e-3
    assert surrogates.default_ridge_grid(128, np.float64).min() == 1e-4


def test_default_criterion_is_mse_as_in_the_pipeline():
    search = surrogates.select_kernel_hyperparameters(
        MASKS[DISTINCT], SCORES[DISTINCT], gammas=GAMMAS, ridges=RIDGES)
    assert search.criterion == "mse" == surrogates.DEFAULT_CRITERION
    assert pipeline.PipelineConfig().cv_criterion == "mse"
    best = np.unravel_index(np.nanargmin(search.mean_table), (3, 3))
    # The grid values as stored: float32 copies of GAMMAS and RIDGES.
    assert float(search.gamma) == pytest.approx(GAMMAS[best[0]], rel=1e-7)
    assert float(search.ridge) == pytest.approx(RIDGES[best[1]], rel=1e-7)


def test_duplicate_masks_warn_that_held_out_rows_leak():
    masks = np.concatenate([MASKS[DISTINCT], MASKS[DISTINCT][:3]])
    scores = np.concatenate([SCORES[DISTINCT], SCORES[DISTINCT][:3]])
    for method in ("loo", "kfold"):
        with pytest.warns(surrogates.DuplicateMasksWarning,
                          match="masks holds 3 duplicate rows"):
            surrogates.select_kernel_hyperparameters(masks, scores, gammas=GAMMAS,
                                                     ridges=RIDGES, method=method)


def test_spearman_on_a_constant_target_falls_back_to_the_common_choice():
    scores = SCORES[DISTINCT].copy()
    scores[:, 1] = 0.5  # no ranking to predict: its Spearman is NaN everywhere
    search = surrogates.select_kernel_hyperparameters(
        MASKS[DISTINCT], scores, gammas=GAMMAS, ridges=RIDGES, per_target=True,
        criterion="spearman")
    assert np.isnan(search.table[..., 1]).all()
    common = surrogates.select_kernel_hyperparameters(
        MASKS[DISTINCT], scores, gammas=GAMMAS, ridges=RIDGES, criterion="spearman")
    assert float(search.gamma[1]) == float(common.gamma)
    assert float(search.ridge[1]) == float(common.ridge)
    with pytest.raises(ValueError, match="constant in every target column"):
        surrogates.select_kernel_hyperparameters(MASKS, np.ones_like(SCORES),
                                                 criterion="spearman")


def test_default_fit_keeps_the_signs_that_shrinkage_to_zero_inverts():
    # Scores at a level (0.6) large against the tasks' effects, subsets that
    # drop 4 of 10 tasks, a ridge in the shrinkage-dominated regime: shrinking
    # towards zero (standardize=False, the paper's reference code) turned the
    # helpful tasks' LOO effects negative; the default shrinks towards the mean.
    num_tasks = 10
    rng = np.random.default_rng(0)
    masks = np.stack([rng.permutation(num_tasks) >= 4 for _ in range(96)]).astype(
        float)
    effects = np.array([-0.02, -0.1, 0.01, 0.012, 0.018, 0.013, 0.014, 0.016, 0.015,
                        0.011])  # true LOO effects: two harmful, eight helpful
    scores = 0.6 - masks @ effects[:, None] * (1 + 0.1 * rng.normal(size=(1, 20)))
    scores = scores + 0.001 * rng.normal(size=scores.shape)

    def signs(**kwargs):
        fitted = surrogates.fit_kernel_surrogate(masks, scores, gamma=0.1, ridge=10.0,
                                                 **kwargs)
        return np.sign(np.asarray(attribution.loo_scores(fitted)).mean(1))

    assert (signs(standardize=False) != np.sign(effects)).sum() >= 4  # the old bug
    np.testing.assert_array_equal(signs(), np.sign(effects))
