"""Float32 paths against float64 references.

The suite runs in float32 (tests/conftest.py). These tests compare a float32
computation with the same computation on the same values in float64, so they
are marked ``float64`` (64-bit JAX on for the test only): the inputs are cast
to float32 explicitly (JAX keeps float32 arrays float32 with 64-bit enabled:
nothing is promoted unless a float64 array enters), every result is checked to
stay float32, and compared with the float64 one at float32 tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from tasksurrogate_jax.core import metrics, surrogates
from tasksurrogate_jax.core.subsets import leave_one_out_masks
from tasksurrogate_jax.data import make_target_data, make_task_data
from tasksurrogate_jax.downstream import attribution
from tasksurrogate_jax.workloads import SupervisedWorkload, TrainSettings

RNG = np.random.default_rng(7)
pytestmark = pytest.mark.float64  # float64 references (see above)


def as32(*arrays):
    """float32 copies, and the same values in float64 (the reference inputs)."""
    small = [np.asarray(a, np.float32) for a in arrays]
    return small, [a.astype(np.float64) for a in small]


def assert_float32(*arrays):
    for a in arrays:
        assert jnp.asarray(a).dtype == jnp.float32, jnp.asarray(a).dtype


# -- metrics -----------------------------------------------------------------


@pytest.mark.slow
def test_correlations_and_errors_of_float32_scores_match_float64():
    (x, y, ties), (x64, y64, ties64) = as32(
        RNG.normal(size=(40, 5)), RNG.normal(size=(40, 5)),
        RNG.integers(0, 4, (40, 5)))  # exact ties, the same in both precisions
    y = y + 0.5 * x  # correlated: correlations away from 0
    y64 = y.astype(np.float64)
    rho = metrics.spearman(x, y)
    r = metrics.pearson(x, y)
    rho_ties = metrics.spearman(ties, y)
    assert_float32(rho, r, rho_ties, metrics.rankdata(ties))
    # The same values in float64: scipy. Equal values rank equally in both.
    for j in range(5):
        assert rho[j] == pytest.approx(
            scipy.stats.spearmanr(x64[:, j], y64[:, j]).statistic, abs=1e-5)
        assert r[j] == pytest.approx(
            scipy.stats.pearsonr(x64[:, j], y64[:, j]).statistic, abs=1e-5)
        assert rho_ties[j] == pytest.approx(
            scipy.stats.spearmanr(ties64[:, j], y64[:, j]).statistic, abs=1e-5)
    np.testing.assert_array_equal(metrics.rankdata(ties),
                                  scipy.stats.rankdata(ties64, axis=0))
    error = metrics.normalized_error(true=x, predicted=y)
    assert_float32(error)
    np.testing.assert_allclose(error, ((y64 - x64) ** 2).mean(0) / x64.var(0),
                               rtol=1e-5)
    loo = metrics.loo_correlation(true_effects=x, predicted_effects=y)
    assert_float32(loo.per_target, loo.mean_target)
    assert float(loo.mean_target) == pytest.approx(
        scipy.stats.spearmanr(y64.mean(1), x64.mean(1)).statistic, abs=1e-5)


# -- surrogates ----------------------------------------------------------------


def _surrogate_problem(num_subsets=48, num_tasks=8, num_targets=3):
    masks = RNG.integers(0, 2, (num_subsets, num_tasks))
    coef = RNG.normal(size=(num_tasks, num_targets))
    scores = (2.0 + masks @ coef + 0.8 * (masks[:, :1] * masks[:, 1:2])
              + 0.05 * RNG.normal(size=(num_subsets, num_targets)))
    new = RNG.integers(0, 2, (20, num_tasks))
    return as32(masks, scores, new)


@pytest.mark.slow
def test_linear_and_kernel_surrogates_fit_in_float32_as_in_float64():
    (masks, scores, new), (masks64, scores64, new64) = _surrogate_problem()
    scale = np.abs(scores64).max()
    for fit, kw in ((surrogates.fit_linear_surrogate, {"ridge": 0.0}),
                    (surrogates.fit_kernel_surrogate, {"gamma": 0.125, "ridge": 0.1})):
        small, wide = fit(masks, scores, **kw), fit(masks64, scores64, **kw)
        predicted = small.predict(new)
        effects = attribution.loo_scores(small)
        assert_float32(surrogates.surrogate_coefficients(small), predicted, effects)
        assert surrogates.surrogate_coefficients(wide).dtype == jnp.float64
        np.testing.assert_allclose(predicted, wide.predict(new64), rtol=1e-4,
                                   atol=1e-5 * scale, err_msg=str(kw))
        np.testing.assert_allclose(effects, attribution.loo_scores(wide), rtol=1e-3,
                                   atol=1e-5 * scale, err_msg=str(kw))


@pytest.mark.slow
def test_hyperparameter_search_in_float32_tabulates_the_float64_criterion():
    (masks, scores, _), (masks64, scores64, _) = _surrogate_problem()
    grid = dict(gammas=[0.0625, 0.25], ridges=[0.05, 0.5, 5.0])
    small = surrogates.select_kernel_hyperparameters(masks, scores, **grid)
    wide = surrogates.select_kernel_hyperparameters(masks64, scores64, **grid)
    assert_float32(small.table, small.mean_table)
    # The closed-form LOO criterion values, not their argmin (near-equal cells
    # may swap).
    np.testing.assert_allclose(small.table, wide.table, rtol=1e-3)
    held_out = surrogates.kernel_loo_predictions(masks, scores, gamma=0.25, ridge=0.5)
    assert_float32(held_out)
    np.testing.assert_allclose(
        held_out, surrogates.kernel_loo_predictions(masks64, scores64, gamma=0.25,
                                                    ridge=0.5),
        rtol=1e-4, atol=1e-5 * np.abs(scores64).max())


# -- a supervised workload -----------------------------------------------------


def _workload(precision):
    """A 16-32-3 tanh MLP in plain JAX on 5 tasks of a synthetic 3-class problem
    (643 parameters: more than the estimate's default 512 projected ones)."""
    rng = np.random.default_rng(0)
    n, d, c = 120, 16, 3
    x = rng.normal(size=(n, d))
    w_true = rng.normal(size=(d, c))
    y = (x @ w_true + 0.5 * rng.normal(size=(n, c))).argmax(1)
    data = make_task_data(x, y, np.arange(n) % 5, num_classes=c)
    x_target = rng.normal(size=(20, d))
    target = make_target_data(x_target, (x_target @ w_true).argmax(1), num_classes=c)

    def init_fn(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (d, 32)) / np.sqrt(d), "b1": jnp.zeros(32),
                "w2": jax.random.normal(k2, (32, c)) / np.sqrt(32), "b2": jnp.zeros(c)}

    def apply_fn(params, inputs):
        return jnp.tanh(inputs @ params["w1"] + params["b1"]) @ params["w2"] + (
            params["b2"])

    return SupervisedWorkload(
        apply_fn=apply_fn, init_fn=init_fn, data=data, target=target,
        train=TrainSettings(optax.adam(0.05), 40, 32),
        finetune=TrainSettings(optax.sgd(0.1), 10, 32), precision=precision)


@pytest.mark.slow
def test_float32_workload_retrains_and_estimates_as_in_float64():
    masks = leave_one_out_masks(5)[:4]
    key = jax.random.key(0)
    results = {}
    for precision in ("float32", "float64"):
        workload = _workload(precision)
        theta = workload.base_params(key=key)
        finetuned = workload.replicate_scores(masks, key=key, regime="finetune",
                                              replicates=2, progress=False)
        scratch = workload.exact_scores(masks, key=key, regime="scratch",
                                        progress=False)
        estimated = workload.estimated_scores(masks, key=key)
        results[precision] = (theta, finetuned, scratch, estimated)
    small, wide = results["float32"], results["float64"]
    # float32 all the way: parameters, ground truth and estimates.
    assert_float32(*jax.tree.leaves(small[0]), *small[1:])
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(wide[0]))
    # θ* trains to the same parameters, and the losses agree at float32
    # precision (the loss of a confident prediction is tiny: absolute too).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 small[0], wide[0])
    for name, a, b in zip(("finetune", "scratch", "estimate"), small[1:], wide[1:],
                          strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=name)
    # The masks matter (so agreement is not between constants).
    assert np.abs(np.asarray(wide[1][0, 0] - wide[1][0, 1])).max() > 1e-3
