"""Every public entry point refuses bad inputs with an error that names them.

One table: each case is ``(id, call, error type, regex)``; ``call()`` makes one
bad call, which must raise ``error`` with a message matching ``regex`` (the
name of the argument, usually with what was expected). Sizes are tiny and the
checks run before any real computation, so the whole table takes seconds.

A call that must not silently accept its input but where the input is only
suspicious (duplicate masks for a cross-validation) warns; ``_strict`` turns
warnings into the errors the table expects.
"""

import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tasksurrogate_jax import data, pipeline
from tasksurrogate_jax.core import kernels, metrics, nystrom, subsets, surrogates
from tasksurrogate_jax.downstream import attribution, selection, uncertainty
from tasksurrogate_jax.estimate import baselines
from tasksurrogate_jax.estimate.estimation import EstimationSettings
from tasksurrogate_jax.truth import reliability, retraining
from tasksurrogate_jax.truth.store import ChunkStore, StoreMismatchError
from tasksurrogate_jax.workloads.supervised import SupervisedWorkload, TrainSettings

K = 4
KEY = jax.random.key(0)
# Six distinct masks over four tasks and two targets.
MASKS = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1],
                  [1, 1, 1, 0], [0, 0, 1, 1]], float)
SCORES = np.array([[0.1, 0.5], [0.3, 0.2], [0.2, 0.9], [0.6, 0.4], [0.5, 0.1],
                   [0.9, 0.7]])
DUPLICATED = np.concatenate([MASKS, MASKS[:2]])
DUPLICATED_SCORES = np.concatenate([SCORES, SCORES[:2]])
SIZE_TWO = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], float)

# Fitted surrogates built from their arrays (no fit, no compilation).
LINEAR = surrogates.LinearSurrogate(coef=jnp.zeros((K, 2)), intercept=jnp.zeros(2))
KERNEL = surrogates.KernelSurrogate(
    train_masks=jnp.asarray(MASKS), alpha=jnp.zeros((6, 2)),
    gammas=jnp.array([0.25]), gamma_index=jnp.zeros(2, jnp.int32),
    ridge=jnp.full(2, 0.1), jitter=jnp.zeros(2), y_mean=jnp.zeros(2),
    y_scale=jnp.ones(2), coef0=jnp.asarray(1.0))
POSTERIOR = uncertainty.KernelPosterior(
    surrogate=KERNEL, chol=jnp.eye(6)[None], group_gamma=jnp.array([0.25]),
    group_index=jnp.zeros(2, jnp.int32), signal_variance=jnp.ones(2))

# A tiny supervised problem: 8 examples, 2 per task, 3 features, 2 classes.
INPUTS = np.zeros((8, 3), np.float32)
LABELS = np.array([0, 1] * 4)
TASK_IDS = np.array([0, 0, 1, 1, 2, 2, 3, 3])
DATA = data.make_task_data(INPUTS, LABELS, TASK_IDS, num_classes=2)
TARGET = data.make_target_data(np.zeros((2, 3), np.float32), np.array([0, 1]),
                               num_classes=2)
PARAMS = {"w": jnp.zeros((3, 2), jnp.float32)}


def apply_fn(params, x):
    return x @ params["w"]


def init_fn(key):
    return {"w": jnp.zeros((3, 2), jnp.float32)}


SPEC = retraining.make_train_spec(apply_fn=apply_fn, optimizer=optax.sgd(0.1),
                                  num_steps=1)
SETTINGS = TrainSettings(optax.sgd(0.1), 1)


def _strict(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with warnings raised as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def _store_of_another_program():
    with tempfile.TemporaryDirectory() as folder:
        ChunkStore(folder, {"program": "a", "steps": 10})
        ChunkStore(folder, {"program": "b", "steps": 10})


def _store(config):
    with tempfile.TemporaryDirectory() as folder:
        ChunkStore(folder, config)


def _unreadable_manifest():
    with tempfile.TemporaryDirectory() as folder:
        with open(f"{folder}/manifest.json", "w") as f:
            f.write("{not json")
        ChunkStore(folder, {"program": "a"})


def _retrain_into_store_of_another_program():
    with tempfile.TemporaryDirectory() as folder:
        ChunkStore(folder, {"program": "another"})
        retraining.retrain(MASKS, data=DATA, target=TARGET, spec=SPEC, key=KEY,
                           init_fn=init_fn, chunk_size=6, store_dir=folder,
                           store_config={"model": "linear"}, progress=False)


def _retrain_with_store_config_list():
    with tempfile.TemporaryDirectory() as folder:
        _retrain(store_dir=folder, store_config=["linear"])


def _retrain(masks=MASKS, **overrides):
    kwargs = dict(data=DATA, target=TARGET, spec=SPEC, key=KEY, init_fn=init_fn,
                  chunk_size=6, progress=False)
    return retraining.retrain(masks, **{**kwargs, **overrides})


def _workload(**overrides):
    kwargs = dict(apply_fn=apply_fn, init_fn=init_fn, data=DATA, target=TARGET,
                  train=SETTINGS, finetune=None)
    return SupervisedWorkload(**{**kwargs, **overrides})


def _config(**fields):
    """The config's own checks, then those against a supervised workload
    (``K = 4``: too few tasks for the default numbers of subsets, so the
    checks that need them are not reached here)."""
    config = pipeline.PipelineConfig(**fields)
    pipeline.check_applies(config, SupervisedWorkload)
    return pipeline.configured_workload(config, _workload(finetune=SETTINGS))


def _nan(x, row=0, col=0):
    x = np.array(x, float)
    x[row, col] = np.nan
    return x


def _inf(x, row=0, col=0):
    x = np.array(x, float)
    x[row, col] = np.inf
    return x


fit_linear = surrogates.fit_linear_surrogate
fit_kernel = surrogates.fit_kernel_surrogate
select = surrogates.select_kernel_hyperparameters
fit_nys = nystrom.fit_nystrom_surrogate
select_nys = nystrom.select_nystrom_hyperparameters
V, E, T = ValueError, TypeError, StoreMismatchError
D = surrogates.DuplicateMasksWarning

CASES = [
    # -- subsets --------------------------------------------------------------
    ("bernoulli-zero-subsets", lambda: subsets.bernoulli_masks(KEY, 0, K), V,
     "num_subsets must be >= 1"),
    ("bernoulli-float-count", lambda: subsets.bernoulli_masks(KEY, 2.5, K), E,
     "num_subsets must be an int"),
    ("bernoulli-p-nan", lambda: subsets.bernoulli_masks(KEY, 3, K, p=np.nan), V,
     r"p must be in \(0, 1\]"),
    ("bernoulli-p-string", lambda: subsets.bernoulli_masks(KEY, 3, K, p="0.5"), E,
     "p must be a number"),
    ("bernoulli-int-key", lambda: subsets.bernoulli_masks(0, 3, K), E,
     "key must be a JAX PRNG key"),
    ("bernoulli-int-dtype",
     lambda: subsets.bernoulli_masks(KEY, 3, K, dtype=jnp.int32), E,
     "dtype must be a floating dtype"),
    ("bernoulli-too-many-distinct",
     lambda: subsets.bernoulli_masks(KEY, 17, K, unique=True), V,
     "num_subsets=17 distinct subsets"),
    ("fixed-size-too-large",
     lambda: subsets.fixed_size_masks(KEY, 3, K, subset_size=5), V,
     "subset_size must be <= num_tasks"),
    ("size-range-inverted",
     lambda: subsets.size_range_masks(KEY, 3, K, min_size=3, max_size=2), V,
     "min_size=3, max_size=2"),
    ("all-masks-too-many-tasks", lambda: subsets.all_masks(21), V,
     "num_tasks must be <= 20"),
    ("all-masks-include-empty-string",
     lambda: subsets.all_masks(3, include_empty="yes"), E,
     "include_empty must be a bool"),
    ("unique-masks-complex", lambda: subsets.unique_masks(MASKS + 0j), E,
     "masks must have a real dtype"),
    # -- kernels --------------------------------------------------------------
    ("gram-unknown-kernel", lambda: kernels.gram(MASKS, MASKS, kernel="cosine"), V,
     "kernel must be one of"),
    ("gram-zero-gamma", lambda: kernels.gram(MASKS, MASKS, gamma=0.0), V,
     "gamma must be positive"),
    ("gram-column-mismatch", lambda: kernels.gram(MASKS, MASKS[:, :3]), V,
     "same number of columns"),
    ("gram-string-x", lambda: kernels.gram("abc", MASKS), E,
     "x must be a numeric array"),
    ("gram-nan-x", lambda: kernels.gram(_nan(MASKS), MASKS), V, "x must be finite"),
    ("gram-zero-degree",
     lambda: kernels.gram(MASKS, MASKS, kernel="polynomial", degree=0), V,
     "degree must be >= 1"),
    ("gram-nan-coef0",
     lambda: kernels.gram(MASKS, MASKS, kernel="polynomial", coef0=np.nan), V,
     "coef0 must be finite"),
    # -- linear surrogate -----------------------------------------------------
    ("linear-not-binary", lambda: fit_linear(MASKS * 0.5, SCORES), V,
     "masks must hold only 0 and 1"),
    ("linear-nan-scores", lambda: fit_linear(MASKS, _nan(SCORES, 2, 1)), V,
     r"scores must be finite, found 1 non-finite values in rows \[2\]"),
    ("linear-inf-scores", lambda: fit_linear(MASKS, _inf(SCORES)), V,
     "scores must be finite"),
    ("linear-row-mismatch", lambda: fit_linear(MASKS, SCORES[:5]), V,
     "scores has 5 rows but masks has 6"),
    ("linear-negative-ridge", lambda: fit_linear(MASKS, SCORES, ridge=-1.0), V,
     "ridge must be non-negative"),
    ("linear-complex-masks", lambda: fit_linear(MASKS.astype(complex), SCORES), E,
     "masks must have a real dtype"),
    ("linear-negative-rcond", lambda: fit_linear(MASKS, SCORES, rcond=-1.0), V,
     "rcond must be non-negative"),
    ("linear-intercept-string",
     lambda: fit_linear(MASKS, SCORES, fit_intercept="False"), E,
     "fit_intercept must be a bool"),
    # -- kernel surrogate -----------------------------------------------------
    ("kernel-negative-ridge", lambda: fit_kernel(MASKS, SCORES, ridge=-0.1), V,
     "ridge must be non-negative"),
    ("kernel-unknown-solver", lambda: fit_kernel(MASKS, SCORES, solver="cg"), V,
     "solver must be one of"),
    ("kernel-centers-with-exact",
     lambda: fit_kernel(MASKS, SCORES, solver="exact", num_centers=3), V,
     "num_centers is used only by solver='nystrom'"),
    ("kernel-nystrom-zero-ridge",
     lambda: fit_kernel(MASKS, SCORES, solver="nystrom", ridge=0.0), V,
     "ridge must be positive"),
    ("kernel-gamma-per-target-length",
     lambda: fit_kernel(MASKS, SCORES, gamma=np.array([0.1, 0.2, 0.3])), V,
     r"gamma must be a scalar or have shape \[num_targets\]"),
    ("kernel-zero-degree",
     lambda: fit_kernel(MASKS, SCORES, kernel="polynomial", degree=0), V,
     "degree must be >= 1"),
    ("kernel-standardize-string",
     lambda: fit_kernel(MASKS, SCORES, standardize="no"), E,
     "standardize must be a bool"),
    # -- hyperparameter search ------------------------------------------------
    ("select-unknown-criterion", lambda: select(MASKS, SCORES, criterion="r2"), V,
     "criterion must be 'mse' or 'spearman'"),
    ("select-unknown-method", lambda: select(MASKS, SCORES, method="holdout"), V,
     "method must be 'loo' or 'kfold'"),
    ("select-zero-ridge", lambda: select(MASKS, SCORES, ridges=[0.0, 1.0]), V,
     "ridges must be positive"),
    ("select-negative-gamma", lambda: select(MASKS, SCORES, gammas=[-1.0]), V,
     "gammas must be positive"),
    ("select-too-many-folds",
     lambda: select(MASKS, SCORES, method="kfold", num_folds=4), V,
     "num_folds=4 needs at least 8 subsets"),
    ("select-constant-scores-spearman",
     lambda: select(MASKS, np.ones((6, 2)), criterion="spearman"), V,
     "scores are constant in every target column"),
    ("select-duplicate-masks",
     lambda: _strict(select, DUPLICATED, DUPLICATED_SCORES), D,
     "masks holds 2 duplicate rows"),
    ("loo-predictions-negative-gamma",
     lambda: surrogates.kernel_loo_predictions(MASKS, SCORES, gamma=-0.1,
                                               ridge=0.1),
     V, "gamma must be positive"),
    # -- prediction -----------------------------------------------------------
    ("predict-not-a-surrogate", lambda: surrogates.predict("model", MASKS), E,
     "surrogate must be a LinearSurrogate or KernelSurrogate"),
    ("predict-kernel-wrong-tasks", lambda: KERNEL.predict(np.ones((2, 5))), V,
     r"masks has 5 task columns, expected 4"),
    ("predict-nan-masks", lambda: surrogates.predict(KERNEL, _nan(MASKS)), V,
     "masks must hold only 0 and 1, found nan"),
    # -- Nystrom --------------------------------------------------------------
    ("nystrom-zero-centers",
     lambda: fit_nys(MASKS, SCORES, key=KEY, num_centers=0), V,
     "num_centers must be >= 1"),
    ("nystrom-no-key", lambda: fit_nys(MASKS, SCORES, key=None), E,
     "key must be a JAX PRNG key"),
    ("nystrom-zero-iterations",
     lambda: fit_nys(MASKS, SCORES, key=KEY, max_iterations=0), V,
     "max_iterations must be >= 1"),
    ("nystrom-tolerance-above-one",
     lambda: fit_nys(MASKS, SCORES, key=KEY, tolerance=2.0), V,
     r"tolerance must be in \(0, 1\)"),
    ("nystrom-zero-budget",
     lambda: fit_nys(MASKS, SCORES, key=KEY, memory_budget=0), V,
     "memory_budget must be >= 1"),
    ("nystrom-select-unknown-method",
     lambda: select_nys(MASKS, SCORES, key=KEY, method="loo"), V,
     "method must be 'holdout' or 'kfold'"),
    ("nystrom-select-holdout-fraction",
     lambda: select_nys(MASKS, SCORES, key=KEY, holdout_fraction=1.5), V,
     r"holdout_fraction must be in \(0, 1\)"),
    ("nystrom-select-duplicate-masks",
     lambda: _strict(select_nys, DUPLICATED, DUPLICATED_SCORES, key=KEY),
     D, "masks holds 2 duplicate rows"),
    # -- metrics --------------------------------------------------------------
    ("pearson-shape-mismatch", lambda: metrics.pearson(SCORES, SCORES[:5]), V,
     "x and y must have the same shape"),
    ("spearman-one-row", lambda: metrics.spearman(SCORES[:1], SCORES[:1]), V,
     "n >= 2"),
    ("spearman-complex", lambda: metrics.spearman(SCORES, SCORES + 1j), E,
     "y must have a real dtype"),
    ("mean-spearman-nan-prediction",
     lambda: metrics.mean_spearman(SCORES, _nan(SCORES)), V,
     "predicted must be finite|y must be finite"),
    ("normalized-error-inf",
     lambda: metrics.normalized_error(true=_inf(SCORES), predicted=SCORES), V,
     "true must be finite"),
    ("loo-correlation-method",
     lambda: metrics.loo_correlation(true_effects=SCORES, predicted_effects=SCORES,
                                     method="kendall"), V, "method must be"),
    ("rankdata-string", lambda: metrics.rankdata("abc"), E,
     "x must be a numeric array"),
    # -- attribution ----------------------------------------------------------
    ("loo-scores-not-a-surrogate", lambda: attribution.loo_scores(MASKS), E,
     "surrogate must be a LinearSurrogate or KernelSurrogate"),
    ("shapley-zero-samples",
     lambda: attribution.shapley_values(KERNEL, key=KEY, num_samples=0), V,
     "num_samples must be >= 1"),
    ("banzhaf-zero-batch",
     lambda: attribution.banzhaf_values(KERNEL, key=KEY, batch_size=0), V,
     "batch_size must be >= 1"),
    ("shapley-int-key", lambda: attribution.shapley_values(KERNEL, key=0), E,
     "key must be a JAX PRNG key"),
    ("fixed-size-effects-full",
     lambda: attribution.fixed_size_effects(KERNEL, key=KEY, size=K), V,
     "size must be < num_tasks"),
    ("fixed-size-interactions-one",
     lambda: attribution.fixed_size_interactions(KERNEL, key=KEY, size=1), V,
     "size must be >= 2"),
    ("fixed-size-from-scores-mixed",
     lambda: attribution.fixed_size_effects_from_scores(MASKS, SCORES), V,
     "masks must all hold the same number of tasks"),
    ("fixed-size-from-scores-nan",
     lambda: attribution.fixed_size_effects_from_scores(SIZE_TWO,
                                                        _nan(SCORES[:4])), V,
     "scores must be finite"),
    ("fixed-size-from-scores-task-everywhere",
     lambda: attribution.fixed_size_effects_from_scores(SIZE_TWO[:2], SCORES[:2]),
     V, r"tasks \[1, 3\] are in every subset or in none"),
    # -- selection ------------------------------------------------------------
    ("select-subset-task-mismatch", lambda: selection.select_subset(LINEAR, 5), V,
     "surrogate over 4 tasks, but num_tasks=5"),
    ("select-subset-required-range",
     lambda: selection.select_subset(LINEAR, K, required=(9,)), V,
     "required holds task index 9"),
    ("select-subset-required-duplicated",
     lambda: selection.select_subset(LINEAR, K, required=(1, 1)), V,
     r"required holds duplicated task indices \[1\]"),
    ("select-subset-required-excluded",
     lambda: selection.select_subset(LINEAR, K, required=(1,), excluded=(1,)), V,
     "required and excluded share task indices"),
    ("select-subset-min-above-max",
     lambda: selection.select_subset(LINEAR, K, min_size=3, max_size=2), V,
     "min_size=3 is larger than max_size=2"),
    ("select-subset-method", lambda: selection.select_subset(LINEAR, K,
                                                             method="random"), V,
     "method must be one of"),
    ("select-subset-not-callable", lambda: selection.select_subset("best", K), E,
     "objective must be a fitted LinearSurrogate"),
    ("select-subset-exhaustive-too-many",
     lambda: selection.select_subset(LINEAR, K, method="exhaustive",
                                     max_exhaustive=3), V,
     "more than max_exhaustive=3"),
    ("objective-negative-weights",
     lambda: selection.surrogate_objective(LINEAR, target_weights=[1.0, -1.0]), V,
     "target_weights must be finite and non-negative"),
    # -- uncertainty ----------------------------------------------------------
    ("posterior-of-linear",
     lambda: uncertainty.fit_posterior(LINEAR, MASKS, SCORES), E,
     "surrogate must be a KernelSurrogate"),
    ("posterior-other-masks",
     lambda: uncertainty.fit_posterior(KERNEL, 1 - MASKS, SCORES), V,
     "masks .* are not the surrogate's train_masks"),
    ("posterior-negative-signal-variance",
     lambda: uncertainty.fit_posterior(KERNEL, MASKS, SCORES, signal_variance=-1.0),
     V, "signal_variance must be positive and finite"),
    ("lcb-negative-kappa",
     lambda: uncertainty.lcb_objective(POSTERIOR, kappa=-1.0), V,
     "kappa must be non-negative"),
    ("trust-region-negative-distance",
     lambda: uncertainty.trust_region_objective(KERNEL, max_distance=-1), V,
     "max_distance must be non-negative"),
    ("trust-region-linear-without-masks",
     lambda: uncertainty.trust_region_objective(LINEAR, max_distance=1), V,
     "masks is required with a LinearSurrogate"),
    ("calibrate-coverage-above-one",
     lambda: uncertainty.calibrate_kappa(MASKS, SCORES, gamma=0.2, ridge=0.1,
                                         coverage=1.5), V,
     r"coverage must be a number in \(0, 1\)"),
    ("calibrate-negative-kappa-grid",
     lambda: uncertainty.calibrate_kappa(MASKS, SCORES, gamma=0.2, ridge=0.1,
                                         kappa_grid=[-1.0, 1.0]), V,
     "kappa_grid must be non-negative"),
    ("calibrate-duplicate-masks",
     lambda: _strict(uncertainty.calibrate_kappa, DUPLICATED, DUPLICATED_SCORES,
                     gamma=0.2, ridge=0.1), D,
     "masks holds 2 duplicate rows"),
    ("sequential-gamma-without-ridge",
     lambda: uncertainty.sequential_selection(
         np.sum, MASKS, SCORES, K, rounds=1, per_round=1, key=KEY,
         fit=uncertainty.SurrogateFit(gamma=0.1)), V,
     "gamma and ridge must be given together"),
    ("sequential-task-mismatch",
     lambda: uncertainty.sequential_selection(np.sum, MASKS, SCORES, 5, rounds=1,
                                              per_round=1, key=KEY), V,
     "masks has 4 task columns, expected 5"),
    # -- data -----------------------------------------------------------------
    ("task-data-float-ids",
     lambda: data.make_task_data(INPUTS, LABELS, TASK_IDS.astype(float)), E,
     "task_ids must be integers"),
    ("task-data-ids-range",
     lambda: data.make_task_data(INPUTS, LABELS, TASK_IDS, num_tasks=2), V,
     r"task_ids must lie in \[0, 2\)"),
    ("task-data-labels-range",
     lambda: data.make_task_data(INPUTS, LABELS + 1, TASK_IDS, num_classes=2), V,
     r"labels must lie in \[0, 2\)"),
    ("task-data-names-repeated",
     lambda: data.make_task_data(INPUTS, LABELS, TASK_IDS,
                                 task_names=["a", "b", "a", "c"]), V,
     "task_names must be distinct"),
    ("task-data-nan-regression-labels",
     lambda: data.make_task_data(INPUTS, _nan(LABELS[:, None])[:, 0], TASK_IDS), V,
     "labels must be finite"),
    ("task-data-nan-inputs",
     lambda: data.make_task_data(_nan(INPUTS), LABELS, TASK_IDS), V,
     "inputs must be finite"),
    ("task-data-string-inputs",
     lambda: data.make_task_data(np.array(["a"] * 8), LABELS, TASK_IDS), E,
     "inputs must be a numeric array"),
    ("task-data-complex-inputs",
     lambda: data.make_task_data(INPUTS + 1j, LABELS, TASK_IDS), E,
     "inputs must have a real or integer dtype"),
    ("target-data-nan-labels",
     lambda: data.make_target_data(np.zeros((2, 3)), np.array([0.5, np.nan])), V,
     "target labels must be finite"),
    ("mask-to-weights-not-binary",
     lambda: data.mask_to_weights(np.array([2.0, 0, 1, 1]), TASK_IDS), V,
     "masks must hold only 0 and 1"),
    ("mask-to-weights-ids-range",
     lambda: data.mask_to_weights(np.ones(2), TASK_IDS), V,
     r"task_ids must lie in \[0, 2\)"),
    # -- retraining -----------------------------------------------------------
    ("retrain-empty-mask", lambda: _retrain(np.zeros((1, K))), V,
     r"masks rows \[0\] keep no training examples"),
    ("retrain-task-mismatch", lambda: _retrain(MASKS[:, :3]), V,
     "masks has 3 task columns, expected 4"),
    ("retrain-nan-masks", lambda: _retrain(_nan(MASKS)), V,
     "masks must hold only 0 and 1"),
    ("retrain-not-a-spec", lambda: _retrain(spec=SETTINGS), E,
     "spec must be a TrainSpec"),
    ("retrain-init-fn-and-params", lambda: _retrain(init_params=PARAMS), V,
     "give exactly one of init_fn"),
    ("retrain-store-config-not-mapping", _retrain_with_store_config_list, E,
     "store_config must be a mapping"),
    ("retrain-int-key", lambda: _retrain(key=3), E, "key must be a JAX PRNG key"),
    ("retrain-store-of-another-program", _retrain_into_store_of_another_program, T,
     "holds results of a different configuration"),
    ("train-spec-optimizer-name",
     lambda: retraining.make_train_spec(apply_fn=apply_fn, optimizer="adam",
                                        num_steps=1), E,
     "optimizer must be an optax.GradientTransformation"),
    # -- workloads ------------------------------------------------------------
    ("workload-apply-not-callable", lambda: _workload(apply_fn="mlp"), E,
     "apply_fn must be callable"),
    ("workload-precision", lambda: _workload(precision="float16"), V,
     "precision must be one of"),
    ("workload-zero-steps",
     lambda: _workload(train=TrainSettings(optax.sgd(0.1), 0)), V,
     "train.num_steps must be >= 1"),
    ("workload-train-not-settings", lambda: _workload(train={"steps": 1}), E,
     "train must be a TrainSettings"),
    ("workload-task-without-examples",
     lambda: _workload(data=data.make_task_data(INPUTS, LABELS, TASK_IDS,
                                                num_tasks=5, num_classes=2)), V,
     "data has tasks without examples"),
    ("workload-description-not-json",
     lambda: _workload(description={"model": object()}), E,
     "description must be a JSON-serialisable"),
    # -- estimation settings --------------------------------------------------
    ("estimation-method", lambda: EstimationSettings(method="exact"), V,
     "method must be one of"),
    ("estimation-zero-proj-dim", lambda: EstimationSettings(proj_dim=0), V,
     "proj_dim must be >= 1"),
    ("estimation-negative-ridge",
     lambda: EstimationSettings(method="solve", ridge=-1.0), V,
     "ridge must be >= 0"),
    ("estimation-negative-ridge-unused-by-finetune",
     lambda: EstimationSettings(method="finetune", ridge=-1.0), V,
     "ridge must be >= 0"),
    ("estimation-zero-batch-orders", lambda: EstimationSettings(batch_orders=0), V,
     "batch_orders must be >= 1"),
    ("estimation-adam-without-projection",
     lambda: EstimationSettings(proj_dim=None, preconditioner="adam"), V,
     r"needs a projection \(proj_dim\)"),
    # -- baselines ------------------------------------------------------------
    ("influence-negative-damping",
     lambda: baselines.influence_scores(apply_fn, PARAMS, DATA, TARGET,
                                        damping=-1.0), V,
     "damping must be finite and >= 0"),
    ("influence-hessian",
     lambda: baselines.influence_scores(apply_fn, PARAMS, DATA, TARGET,
                                        hessian="fisher"), V,
     "hessian must be one of"),
    ("influence-zero-cg-tol",
     lambda: baselines.influence_scores(apply_fn, PARAMS, DATA, TARGET, cg_tol=0.0),
     V, "cg_tol must be a positive number"),
    ("trak-zero-proj-dim",
     lambda: baselines.trak_scores(apply_fn, PARAMS, DATA, TARGET, key=KEY,
                                   proj_dim=0), V,
     "proj_dim must be >= 1"),
    ("trak-no-key",
     lambda: baselines.trak_scores(apply_fn, PARAMS, DATA, TARGET, proj_dim=2), V,
     "key is required"),
    ("trak-nan-damping",
     lambda: baselines.trak_scores(apply_fn, PARAMS, DATA, TARGET, key=KEY,
                                   damping=np.nan), V,
     "damping must be finite and >= 0"),
    ("trak-int-params",
     lambda: baselines.trak_scores(apply_fn, {"w": jnp.zeros((3, 2), int)}, DATA,
                                   TARGET, key=KEY), E,
     "params must be a non-empty pytree of floating arrays"),
    ("trak-projection-kind",
     lambda: baselines.trak_scores(apply_fn, PARAMS, DATA, TARGET, key=KEY,
                                   proj_dim=2, projection_kind="sparse"), V,
     "projection_kind must be one of"),
    # -- reliability ----------------------------------------------------------
    ("subset-reliability-2d",
     lambda: reliability.subset_reliability(SCORES), V,
     "replicate_scores must be 3-D"),
    ("subset-reliability-nan",
     lambda: reliability.subset_reliability(np.stack([_nan(SCORES), SCORES])), V,
     "replicate_scores must be finite"),
    ("loo-reliability-two-rows",
     lambda: reliability.loo_reliability(np.stack([SCORES[:2], SCORES[:2]])), V,
     r"replicate_scores must have at least 3 rows \(num_tasks \+ 1\)"),
    ("spearman-brown-nan-factor",
     lambda: reliability.spearman_brown(0.5, np.nan), V, "factor must be"),
    ("bootstrap-level", lambda: reliability.bootstrap_interval(
        np.mean, (SCORES[:, 0],), level=1.0), V, r"level must be a number in \(0, 1\)"),
    ("interval-over-targets-inf",
     lambda: reliability.interval_over_targets([0.5, np.inf, 0.2]), V,
     "per_target_values must not hold infinite values"),
    ("loo-interval-shapes",
     lambda: reliability.loo_spearman_interval(SCORES, SCORES[:, 0]), V,
     "predicted_effects and true_effects must have the same shape"),
    ("loo-interval-nan",
     lambda: reliability.loo_spearman_interval(_nan(SCORES), SCORES), V,
     "predicted_effects must be finite"),
    # -- pipeline configuration -----------------------------------------------
    ("config-unknown-workload",
     lambda: pipeline.make_workload(pipeline.PipelineConfig(workload="mnist")), V,
     "workload must be one of"),
    ("config-baselines-string", lambda: _config(baselines="influence"), E,
     "baselines must be a tuple of names"),
    ("config-shots-for-loo", lambda: _config(shots=3), V,
     "shots does not apply to workload 'digits' \\(loo protocol\\)"),
    ("config-one-replicate", lambda: _config(replicates=1), V,
     "replicates must be >= 2"),
    ("config-float-replicates", lambda: _config(replicates=2.5), E,
     "replicates must be an int"),
    ("config-string-seed", lambda: _config(seed="0"), E, "seed must be an int"),
    ("config-few-subsets", lambda: _config(num_subsets=2), V,
     "num_subsets must be >= 4"),
    ("config-confidence-level", lambda: _config(confidence_level=1.5), V,
     r"confidence_level must be in \(0, 1\)"),
    ("config-estimation-method", lambda: _config(estimation_method="exact"), V,
     "estimation_method"),
    ("config-cv-criterion", lambda: _config(cv_criterion="r2"), V,
     "cv_criterion must be"),
    ("config-cv-method", lambda: _config(cv_method="holdout"), V,
     "cv_method must be"),
    ("config-negative-damping", lambda: _config(influence_damping=-1.0), V,
     "influence_damping must be"),
    # -- stores ---------------------------------------------------------------
    ("store-of-another-program", _store_of_another_program, T,
     r"holds results of a different configuration .*differing keys: \['program'\]"),
    ("store-unreadable-manifest", _unreadable_manifest, V,
     "holds an unreadable manifest.json"),
    ("store-config-not-json",
     lambda: _store({"model": object()}), E,
     "config must be JSON-serialisable"),
]


def test_case_ids_are_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
    assert all(isinstance(case[2], type) and issubclass(case[2], Exception)
               for case in CASES)


@pytest.mark.parametrize("call, error, pattern", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_raises_a_clear_error_naming_it(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
