"""Tests for tasksurrogate_jax.data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax.data import (
    TaskData,
    check_nonempty_masks,
    check_target_matches,
    filter_task_data,
    make_target_data,
    make_task_data,
    mask_to_weights,
    pad_task_data,
)


def _data(n=12, num_tasks=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = rng.integers(0, 4, size=n)
    ids = np.arange(n) % num_tasks
    return make_task_data(x, y, ids, num_classes=4)


def test_mask_to_weights_matches_loop():
    data = _data()
    masks = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    w = np.asarray(mask_to_weights(masks, data.task_ids))
    ids = np.asarray(data.task_ids)
    ref = np.array([[m[t] for t in ids] for m in masks])
    np.testing.assert_array_equal(w, ref)
    np.testing.assert_array_equal(
        np.asarray(mask_to_weights(masks[0], data.task_ids)), ref[0]
    )


def test_padding_rows_get_zero_weight_and_are_filtered():
    data = pad_task_data(_data(), 16)
    assert data.num_examples == 16
    assert np.asarray(data.task_ids)[-4:].tolist() == [-1] * 4
    w = np.asarray(mask_to_weights(jnp.ones(3), data.task_ids))
    assert w[:12].sum() == 12 and w[12:].sum() == 0
    np.testing.assert_array_equal(data.task_sizes(), [4, 4, 4])
    kept = filter_task_data(data, [1, 0, 1])
    assert kept.num_examples == 8
    assert set(np.asarray(kept.task_ids).tolist()) == {0, 2}


def test_task_data_is_a_pytree_through_jit():
    data = _data()

    @jax.jit
    def total(d: TaskData):
        return jnp.sum(d.inputs) + d.num_tasks

    np.testing.assert_allclose(total(data), np.sum(np.asarray(data.inputs)) + 3,
                               rtol=1e-5)
    leaves = jax.tree.leaves(data)
    assert len(leaves) == 3  # inputs, labels, task_ids; counts and names are static


def test_default_names_and_counts():
    data = _data()
    assert data.num_tasks == 3
    assert data.task_names == ("task_0", "task_1", "task_2")
    assert data.labels.dtype == jnp.int32


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*found 4"):
        make_task_data(np.zeros((3, 1)), [0, 4, 1], [0, 1, 2], num_classes=4)
    with pytest.raises(ValueError, match="found -1"):
        make_target_data(np.zeros((2, 1)), [-1, 0], num_classes=4)
    with pytest.raises(TypeError, match="integer class labels"):
        make_task_data(np.zeros((3, 1)), [0.5, 1.0, 1.0], [0, 1, 2], num_classes=4)


def test_bad_task_ids_and_names():
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\).*found 5"):
        make_task_data(np.zeros((3, 1)), [0, 1, 1], [0, 1, 5], num_tasks=2)
    with pytest.raises(ValueError, match=r"task_ids must have shape \(3,\)"):
        make_task_data(np.zeros((3, 1)), [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="task_names must have num_tasks=3"):
        make_task_data(np.zeros((3, 1)), [0, 1, 1], [0, 1, 2], task_names=["a"],
                       num_tasks=3)
    with pytest.raises(ValueError, match=r"labels must have one row per input \(3\)"):
        make_task_data(np.zeros((3, 1)), [0, 1], [0, 1, 2])


def test_empty_masks_are_refused():
    data = make_task_data(np.zeros((4, 1)), [0, 1, 0, 1], [0, 0, 1, 1], num_tasks=3)
    check_nonempty_masks(np.array([[1, 0, 0], [0, 1, 1]]), data)
    with pytest.raises(ValueError, match=r"rows \[1, 2\] keep no training examples"):
        # row 1 is all zero; row 2 keeps only task 2, which has no examples
        check_nonempty_masks(np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]]), data)


def test_target_mismatch():
    data = _data()
    check_target_matches(data, make_target_data(np.zeros((5, 2)), np.zeros(5, int)))
    with pytest.raises(ValueError, match=r"per-example shape \(3,\), expected \(2,\)"):
        check_target_matches(data, make_target_data(np.zeros((5, 3)), np.zeros(5, int)))
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 4\)"):
        check_target_matches(
            data, make_target_data(np.zeros((2, 2)), np.array([0, 9]))
        )
    with pytest.raises(TypeError, match="target must be a TargetData"):
        check_target_matches(data, (np.zeros((5, 2)), np.zeros(5)))
