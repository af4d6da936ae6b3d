"""Tests for the workload interface and the modular-arithmetic workload."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tasksurrogate_jax.core.subsets import leave_one_out_masks
from tasksurrogate_jax.estimate.estimation import EstimationSettings
from tasksurrogate_jax.workloads import Workload, modular_workload
from tasksurrogate_jax.workloads.modular import (
    PRESETS,
    block_task_ids,
    modular_examples,
)


def test_examples_and_labels():
    tokens, labels = modular_examples(7, "add")
    assert tokens.shape == (49, 3) and (tokens[:, 2] == 7).all()
    a, b = tokens[:, 0], tokens[:, 1]
    np.testing.assert_array_equal(labels, (a + b) % 7)
    _, quad = modular_examples(7, "quad")
    np.testing.assert_array_equal(quad, (a * a + a * b + b * b) % 7)
    with pytest.raises(ValueError, match="operation must be one of"):
        modular_examples(7, "mul")


def test_paper_tasks_are_the_5x5_grid_of_blocks_of_20():
    w = modular_workload("paper")
    assert w.num_tasks == 25 and isinstance(w, Workload)
    x = np.asarray(w.data.inputs)
    ids = np.asarray(w.data.task_ids)
    np.testing.assert_array_equal(ids, (x[:, 0] // 20) * 5 + x[:, 1] // 20)
    assert w.data.num_examples == round(0.9 * 97 * 97)
    assert w.num_targets == 97 * 97 - w.data.num_examples
    assert w.task_names[0] == "a[0,20)xb[0,20)"
    assert w.task_names[-1] == "a[80,97)xb[80,97)"
    # train and test are disjoint and cover all pairs
    pairs = {tuple(r) for r in x[:, :2]} | {
        tuple(r) for r in np.asarray(w.target.inputs)[:, :2]}
    assert len(pairs) == 97 * 97
    assert w.train_spec.batch_size == 512 and w.config.width == 128
    assert w.finetune_spec.num_steps == 5000 // 4


def test_cpu_preset_grid_and_target_subset():
    w = modular_workload("cpu", num_targets=50)
    c = w.config
    x = np.asarray(w.data.inputs)
    ids = np.asarray(w.data.task_ids)
    assert set(ids.tolist()) == set(range(25))
    np.testing.assert_array_equal(ids, block_task_ids(x, p=c.p, grid=5))
    i, j = ids // 5, ids % 5
    assert (x[:, 0] // c.block == i).all() and (x[:, 1] // c.block == j).all()
    assert w.num_targets == 50
    full = modular_workload("cpu")
    test_pairs = {tuple(r) for r in np.asarray(full.target.inputs)}
    assert {tuple(r) for r in np.asarray(w.target.inputs)} <= test_pairs
    assert "cross-entropy" in w.target_description


@pytest.mark.slow
def test_tiny_preset_trains_above_chance_and_masks_matter():
    w = modular_workload("tiny")
    masks = leave_one_out_masks(w.num_tasks)[:3]
    res = w.retrain(masks, key=jax.random.key(0), regime="scratch", chunk_size=3,
                    progress=False)
    chance = 1.0 / w.config.p
    acc = np.asarray(res.accuracy[0]).mean(1)
    assert (acc > 3 * chance).all(), acc
    assert not np.allclose(res.losses[0, 0], res.losses[0, 1])
    np.testing.assert_array_equal(  # same program, same key: same result
        w.exact_scores(masks, key=jax.random.key(0), regime="scratch", chunk_size=3,
                       progress=False),
        res.losses[0])


@pytest.mark.slow
def test_estimated_scores_linearize_around_the_full_data_model():
    w = modular_workload("tiny")
    key = jax.random.key(0)
    masks = leave_one_out_masks(w.num_tasks)[:4]
    theta = w.base_params(key=key)
    assert w.base_params(key=key) is theta  # trained once per key
    # A huge ridge pins the update to zero: the estimate is the loss at θ*.
    pinned = w.estimated_scores(masks, key=key, settings=EstimationSettings(
        method="solve", proj_dim=16, ridge=1e6))
    logits = w.apply_fn(theta, w.target.inputs)
    at_theta = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                               w.target.labels)
    np.testing.assert_allclose(pinned, np.broadcast_to(at_theta, pinned.shape),
                               rtol=1e-4, atol=1e-6)
    # θ* is the exact full-data model: the same program and key.
    exact_full = w.exact_scores(masks[:1], key=key, regime="scratch",
                                progress=False)
    np.testing.assert_allclose(exact_full[0], at_theta, rtol=1e-5, atol=1e-6)
    settings = EstimationSettings(method="solve", proj_dim=16, ridge=1e-2)
    result = w.estimate(masks, key=key, settings=settings)
    assert result.scores.shape == (4, w.num_targets)
    assert np.isfinite(result.scores).all() and (result.scores >= 0).all()
    assert float(result.grad_norm.max()) < 1e-6
    assert not np.allclose(result.scores[1], result.scores[2])  # masks matter
    again = w.estimated_scores(masks, key=key, settings=settings)
    np.testing.assert_array_equal(again, result.scores)


def test_bad_input():
    with pytest.raises(ValueError, match="preset must be one of"):
        modular_workload("huge")
    with pytest.raises(TypeError, match=r"unknown ModularConfig fields \['depht'\]"):
        modular_workload("tiny", depht=3)
    with pytest.raises(ValueError, match="operation must be one of"):
        modular_workload("tiny", operation="mul")
    with pytest.raises(ValueError, match="width must be divisible by heads"):
        modular_workload("tiny", width=10, heads=3)
    with pytest.raises(ValueError, match="num_targets must be <="):
        modular_workload("tiny", num_targets=10_000)
    w = modular_workload("tiny")
    with pytest.raises(ValueError, match=r"masks has 15 task columns.*num_tasks=16"):
        w.exact_scores(jnp.ones((2, 15)), key=jax.random.key(0), regime="scratch")
    with pytest.raises(ValueError, match="keep no training examples"):
        w.exact_scores(jnp.zeros((1, 16)), key=jax.random.key(0), regime="scratch")
    with pytest.raises(ValueError, match=r"grid=5 with p=11 leaves tasks \[4, 9,"):
        modular_workload("tiny", grid=5)


def test_presets_are_listed():
    assert {"cpu", "paper", "tiny"} <= set(PRESETS)
    assert PRESETS["paper"].p == 97 and PRESETS["paper"].block == 20
