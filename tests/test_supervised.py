"""SupervisedWorkload: regimes, paired replicates, stores, and your own model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasksurrogate_jax.truth.retraining as rt
from tasksurrogate_jax.core.subsets import leave_one_out_masks
from tasksurrogate_jax.data import make_task_data
from tasksurrogate_jax.estimate.estimation import EstimationSettings
from tasksurrogate_jax.estimate.finetune import Adam, linearized_finetune_scores
from tasksurrogate_jax.truth.store import StoreMismatchError
from tasksurrogate_jax.workloads import (
    SupervisedWorkload,
    TrainSettings,
    digits_workload,
)
from tasksurrogate_jax.workloads.digits import DigitsConfig, DigitsWorkload

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def tiny():
    return digits_workload("tiny")


def _linear_model(data):
    """A plain-JAX softmax regression (no flax): apply_fn and init_fn."""
    features = data.inputs.shape[1]

    def init_fn(key):
        return {"w": 0.01 * jax.random.normal(key, (features, 10)),
                "b": jnp.zeros(10)}

    def apply_fn(params, x):
        return x @ params["w"] + params["b"]

    return apply_fn, init_fn


@pytest.mark.slow
def test_digits_tiny_trains_to_its_stated_accuracy(tiny):
    theta = tiny.base_params(key=KEY)
    assert tiny.base_params(key=KEY) is theta  # trained once per key
    # tiny: 8 sources (4 corrupted), hidden 16, 100 Adam steps: above 80%.
    assert float(tiny.accuracy(theta)) > 0.8


@pytest.mark.slow
def test_scratch_full_set_of_replicate_zero_is_theta_stars_training(tiny):
    ones = np.ones((1, tiny.num_tasks), np.float32)
    res = tiny.retrain(ones, key=KEY, regime="scratch", replicates=2,
                       return_params=True, progress=False)
    theta = tiny.base_params(key=KEY)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0, 0], b),
                 res.params, theta)
    assert not np.allclose(res.losses[0, 0], res.losses[1, 0])  # replicate 1 differs


@pytest.mark.slow
def test_finetune_with_zero_steps_returns_theta_stars_scores(tiny):
    config = DigitsConfig(**{**tiny.description, "finetune_steps": 0})
    frozen = DigitsWorkload(config)
    masks = leave_one_out_masks(frozen.num_tasks)[:4]
    scores = frozen.replicate_scores(masks, key=KEY, regime="finetune",
                                     replicates=2, progress=False)
    theta = frozen.base_params(key=KEY)
    at_theta = frozen.loss_fn(frozen.apply_fn(theta, frozen.target.inputs),
                              frozen.target.labels)
    np.testing.assert_allclose(scores, np.broadcast_to(at_theta, scores.shape),
                               rtol=1e-5, atol=1e-6)  # float32: batched vs direct


@pytest.mark.slow
def test_finetune_replicates_share_theta_star_and_differ_in_batch_order(tiny):
    masks = leave_one_out_masks(tiny.num_tasks)[:3]
    scores = np.asarray(tiny.replicate_scores(masks, key=KEY, regime="finetune",
                                              replicates=3, progress=False))
    # replicate r is the fine-tuning from θ* with replicate_key(KEY, r)'s batches
    spec, theta = tiny.finetune_spec, tiny.base_params(key=KEY)
    for r in range(3):
        alone = rt.retrain(masks, data=tiny.data, target=tiny.target, spec=spec,
                           key=rt.replicate_key(KEY, r), init_params=theta,
                           progress=False)
        np.testing.assert_allclose(scores[r], alone.losses, rtol=1e-5, atol=1e-6)
    assert not np.allclose(scores[0], scores[1])
    np.testing.assert_allclose(
        tiny.exact_scores(masks, key=KEY, regime="finetune", replicates=3,
                          progress=False), scores.mean(0), rtol=1e-6)


def _count_chunk_calls(monkeypatch) -> list:
    """A list that gets one item per compiled retraining chunk from now on."""
    calls = []
    real_chunk = rt.retrain_chunk

    def counting(*args, **kwargs):
        calls.append(1)
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(rt, "retrain_chunk", counting)
    return calls


@pytest.mark.slow
def test_stored_replicates_resume_and_refuse_another_regime_or_count(tiny, tmp_path,
                                                                      monkeypatch):
    masks = leave_one_out_masks(tiny.num_tasks)
    store = tmp_path / "truth"
    kw = dict(key=KEY, regime="finetune", chunk_size=4, store_dir=store,
              progress=False)
    first = tiny.replicate_scores(masks, replicates=2, **kw)  # 18 rows, 5 chunks
    calls = _count_chunk_calls(monkeypatch)
    (store / "chunk_00002.npz").unlink()  # as if interrupted there
    again = tiny.replicate_scores(masks, replicates=2, **kw)
    assert len(calls) == 1  # only the missing chunk is recomputed
    np.testing.assert_array_equal(again, first)
    with pytest.raises(StoreMismatchError, match="replicates"):
        tiny.replicate_scores(masks, replicates=3, **kw)
    with pytest.raises(StoreMismatchError, match="regime"):
        tiny.replicate_scores(masks, replicates=2, **{**kw, "regime": "scratch"})


@pytest.mark.slow
def test_stored_estimation_resumes_and_refuses_another_projection(tiny, tmp_path,
                                                                  monkeypatch):
    masks = leave_one_out_masks(tiny.num_tasks)
    store = tmp_path / "estimates"
    settings = EstimationSettings(proj_dim=16)
    kw = dict(key=KEY, chunk_size=4, store_dir=store)
    first = tiny.estimate(masks, settings=settings, **kw)  # 10 rows, 3 chunks
    calls = _count_chunk_calls(monkeypatch)
    (store / "chunk_00001.npz").unlink()  # as if interrupted there
    again = tiny.estimate(masks, settings=settings, **kw)
    assert len(calls) == 1  # only the missing chunk is recomputed
    np.testing.assert_array_equal(again.scores, first.scores)
    np.testing.assert_array_equal(again.delta_norm, first.delta_norm)
    with pytest.raises(StoreMismatchError, match="proj_dim"):
        tiny.estimate(masks, settings=EstimationSettings(proj_dim=8), **kw)
    with pytest.raises(ValueError, match="store_dir needs settings.method"):
        tiny.estimate(masks, settings=EstimationSettings(method="solve"), **kw)


@pytest.mark.slow
def test_adam_preconditioned_estimate_is_the_library_program_and_is_stored(
        tiny, tmp_path):
    apply_fn, init_fn = _linear_model(tiny.data)
    own = SupervisedWorkload(apply_fn=apply_fn, init_fn=init_fn, data=tiny.data,
                             target=tiny.target,
                             train=TrainSettings(optax.adam(5e-2), 50, 64),
                             finetune=TrainSettings(Adam(1e-2, b2=0.99), 20, 64),
                             name="digits-linear-adam")
    masks = leave_one_out_masks(own.num_tasks)[:3]
    settings = EstimationSettings(proj_dim=16, preconditioner="adam", batch_orders=1)
    store = tmp_path / "estimates"
    estimate = own.estimate(masks, key=KEY, settings=settings, store_dir=store)
    direct = linearized_finetune_scores(
        apply_fn, own.base_params(key=KEY), own.data, own.target, masks,
        finetune=own.finetune_spec, key=jax.random.fold_in(KEY, 1), batch_key=KEY,
        proj_dim=16, preconditioner="adam")
    np.testing.assert_array_equal(estimate.scores, direct.scores)
    np.testing.assert_array_equal(estimate.delta_norm, direct.delta_norm)
    with pytest.raises(StoreMismatchError, match="preconditioner"):
        own.estimate(masks, key=KEY, store_dir=store, settings=dataclasses.replace(
            settings, preconditioner="none"))
    with pytest.raises(ValueError,
                       match=r"finetune\.optimizer.*estimate\.finetune\.Adam"):
        tiny.estimate(masks, key=KEY, settings=settings)  # it fine-tunes with SGD


def test_bad_regime_and_replicates(tiny):
    masks = leave_one_out_masks(tiny.num_tasks)[:2]
    with pytest.raises(ValueError, match=r"regime must be one of \('scratch', "):
        tiny.exact_scores(masks, key=KEY, regime="pretrain")
    with pytest.raises(ValueError, match="replicates must be >= 1, got 0"):
        tiny.exact_scores(masks, key=KEY, regime="scratch", replicates=0)
    apply_fn, init_fn = _linear_model(tiny.data)
    no_finetune = SupervisedWorkload(
        apply_fn=apply_fn, init_fn=init_fn, data=tiny.data, target=tiny.target,
        train=TrainSettings(optax.adam(1e-2), 10), finetune=None)
    with pytest.raises(ValueError, match="regime='finetune' needs fine-tuning"):
        no_finetune.exact_scores(masks, key=KEY, regime="finetune")


def test_your_own_plain_jax_model_and_its_bad_inputs(tiny):
    apply_fn, init_fn = _linear_model(tiny.data)
    settings = TrainSettings(optax.adam(5e-2), 100, 64)
    own = SupervisedWorkload(apply_fn=apply_fn, init_fn=init_fn, data=tiny.data,
                             target=tiny.target, train=settings,
                             finetune=TrainSettings(optax.sgd(0.1), 20, 64),
                             description={"model": "softmax regression"},
                             name="digits-linear")
    assert own.num_tasks == tiny.num_tasks and own.name == "digits-linear"
    assert float(own.accuracy(own.base_params(key=KEY))) > 0.6  # chance: 0.1
    scores = own.replicate_scores(leave_one_out_masks(own.num_tasks), key=KEY,
                                  regime="finetune", replicates=2, progress=False)
    assert scores.shape == (2, own.num_tasks + 1, own.num_targets)

    common = dict(data=tiny.data, target=tiny.target, train=settings, finetune=None)
    with pytest.raises(ValueError, match=r"outputs of shape \(2, 7\).*num_classes=10"):
        SupervisedWorkload(apply_fn=lambda p, x: apply_fn(p, x)[:, :7],
                           init_fn=init_fn, **common)
    with pytest.raises(TypeError, match="pytree of arrays.*got leaves of type"):
        SupervisedWorkload(apply_fn=apply_fn, init_fn=lambda key: {}, **common)
    with pytest.raises(TypeError, match=r"init_fn\(key\) failed.*not a valid JAX"):
        SupervisedWorkload(apply_fn=apply_fn, init_fn=lambda key: {"w": "weights"},
                           **common)
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        SupervisedWorkload(apply_fn=None, init_fn=init_fn, **common)
    with pytest.raises(TypeError, match="train must be a TrainSettings"):
        SupervisedWorkload(apply_fn=apply_fn, init_fn=init_fn,
                           **{**common, "train": optax.adam(1e-2)})
    ids = np.asarray(tiny.data.task_ids).copy()
    ids[ids == 2] = 3  # task 2 loses all its examples
    emptied = make_task_data(tiny.data.inputs, tiny.data.labels, ids,
                             num_tasks=tiny.num_tasks, num_classes=10)
    with pytest.raises(ValueError, match=r"tasks without examples: \['task_2'\]"):
        SupervisedWorkload(apply_fn=apply_fn, init_fn=init_fn,
                           **{**common, "data": emptied})


def test_missing_workload_member_is_a_clear_error():
    with pytest.raises(TypeError, match="module_factory must be callable"):
        SupervisedWorkload.from_nnx(None, data=None, target=None, train=None,
                                    finetune=None)


@pytest.mark.slow
@pytest.mark.float64  # precision='float64' workloads
def test_float64_results_do_not_depend_on_the_chunk_size(tiny):
    # conftest enables 64-bit JAX; float32 would round differently per chunking.
    config = DigitsConfig(**{**tiny.description, "precision": "float64"})
    wide = DigitsWorkload(config)
    assert wide.data.inputs.dtype == np.float64
    assert all(leaf.dtype == np.float64
               for leaf in jax.tree.leaves(wide.base_params(key=KEY)))
    masks = leave_one_out_masks(wide.num_tasks)
    kw = dict(key=KEY, regime="scratch", replicates=2, progress=False)
    a = wide.replicate_scores(masks, chunk_size=3, **kw)
    b = wide.replicate_scores(masks, chunk_size=18, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_float64_needs_64_bit_jax(tiny):
    config = DigitsConfig(**{**tiny.description, "precision": "float64"})
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="needs 64-bit JAX: set JAX_ENABLE_X64"):
            DigitsWorkload(config)
    finally:
        jax.config.update("jax_enable_x64", True)
    with pytest.raises(ValueError, match="precision must be one of"):
        DigitsWorkload(DigitsConfig(**{**tiny.description, "precision": "half"}))


@pytest.mark.slow
def test_linearized_finetuning_tracks_the_loo_effects_of_real_finetuning(tiny):
    # The default estimator: the fine-tuning program (20 SGD steps) on the
    # linearized model. Measured: Pearson 0.987 of the LOO effects against the
    # mean of 4 real fine-tunings, mean relative error of the scores 4.4%.
    masks = np.concatenate([np.ones((1, tiny.num_tasks), np.float32),
                            leave_one_out_masks(tiny.num_tasks)])
    real = np.asarray(tiny.exact_scores(masks, key=KEY, regime="finetune",
                                        replicates=4, progress=False)).mean(1)
    estimate = tiny.estimate(masks, key=KEY)
    scores = np.asarray(estimate.scores).mean(1)
    assert estimate.ridge is None and estimate.grad_norm is None
    effects_true, effects_est = real[1:] - real[0], scores[1:] - scores[0]
    assert np.corrcoef(effects_true, effects_est)[0, 1] > 0.9
    assert float(np.mean(np.abs(scores - real) / real)) < 0.08


@pytest.mark.slow
def test_difference_form_is_exact_on_all_tasks_and_auto_ridge_matches_the_run(tiny):
    masks = np.concatenate([np.ones((1, tiny.num_tasks), np.float32),
                            leave_one_out_masks(tiny.num_tasks)[:2]])
    settings = EstimationSettings(method="solve", proj_dim=64, ridge="auto",
                                  difference=True)
    estimate = tiny.estimate(masks, key=KEY, settings=settings)
    reference = tiny.retrain(masks[:1], key=KEY, regime="finetune",
                             return_params=True, progress=False)
    np.testing.assert_allclose(estimate.scores[0], reference.losses[0, 0],
                               rtol=1e-5, atol=1e-6)
    theta = tiny.base_params(key=KEY)
    tuned = jax.tree.map(lambda leaf: leaf[0, 0], reference.params)
    norm = float(optax.tree_utils.tree_norm(optax.tree_utils.tree_sub(tuned, theta)))
    np.testing.assert_allclose(estimate.delta_norm[0], norm, rtol=1e-3)
    plain = tiny.estimate(masks, key=KEY, settings=dataclasses.replace(
        settings, difference=False, ridge=estimate.ridge))
    np.testing.assert_allclose(  # the same solves, shifted by one vector
        estimate.scores - plain.scores,
        np.broadcast_to(reference.losses[0, 0] - plain.scores[0], plain.scores.shape),
        rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="settings must be an EstimationSettings"):
        tiny.estimate(masks, key=KEY, settings={"method": "solve"})
