import jax
import numpy as np
import pytest

from tasksurrogate_jax.core import subsets


def test_bernoulli_masks_are_binary_reproducible_and_have_rate_p():
    key = jax.random.key(0)
    a = subsets.bernoulli_masks(key, 4000, 10, p=0.3)
    b = subsets.bernoulli_masks(key, 4000, 10, p=0.3)
    c = subsets.bernoulli_masks(jax.random.key(1), 4000, 10, p=0.3)
    assert a.shape == (4000, 10)
    assert set(np.unique(np.asarray(a))) <= {0.0, 1.0}
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(float(a.mean()) - 0.3) < 0.02


def test_fixed_size_masks_have_exact_size_and_cover_tasks_uniformly():
    masks = np.asarray(subsets.fixed_size_masks(jax.random.key(3), 5000, 25,
                                                subset_size=22))
    np.testing.assert_array_equal(masks.sum(axis=1), 22)
    dropped = (1 - masks).mean(axis=0)
    np.testing.assert_allclose(dropped, 3 / 25, atol=0.02)


@pytest.mark.parametrize("sampler", ["bernoulli", "fixed"])
def test_unique_sampling_returns_distinct_rows(sampler):
    key = jax.random.key(5)
    if sampler == "bernoulli":
        masks = subsets.bernoulli_masks(key, 60, 6, unique=True)
    else:
        masks = subsets.fixed_size_masks(key, 20, 6, subset_size=3, unique=True)
    rows = {tuple(r) for r in np.asarray(masks).tolist()}
    assert len(rows) == masks.shape[0]
    again = masks if sampler == "fixed" else subsets.bernoulli_masks(key, 60, 6,
                                                                      unique=True)
    np.testing.assert_array_equal(masks, again)


def test_unique_sampling_refuses_more_subsets_than_exist():
    with pytest.raises(ValueError, match="only 20 exist"):
        subsets.fixed_size_masks(jax.random.key(0), 21, 6, subset_size=3, unique=True)


def test_leave_one_out_masks():
    masks = np.asarray(subsets.leave_one_out_masks(4))
    np.testing.assert_array_equal(masks[0], np.ones(4))
    np.testing.assert_array_equal(masks[1:], 1 - np.eye(4))


def test_all_masks_lists_every_subset_once():
    masks = np.asarray(subsets.all_masks(5, include_empty=True))
    assert masks.shape == (32, 5)
    assert len({tuple(r) for r in masks.tolist()}) == 32
    np.testing.assert_array_equal(masks[6], [0, 1, 1, 0, 0])
    # By default without the empty set, which retraining refuses.
    default = np.asarray(subsets.all_masks(5))
    assert default.shape == (31, 5) and default.sum(1).min() == 1
    np.testing.assert_array_equal(default, masks[1:])
    with pytest.raises(ValueError, match="num_tasks must be <= 20"):
        subsets.all_masks(21)


def test_unique_masks_keeps_first_occurrences_in_order():
    masks = np.array([[1, 0], [0, 1], [1, 0], [1, 1], [0, 1]], float)
    out, index = subsets.unique_masks(masks, return_index=True)
    np.testing.assert_array_equal(index, [0, 1, 3])
    np.testing.assert_array_equal(out, masks[[0, 1, 3]])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: subsets.bernoulli_masks(jax.random.key(0), 5, 3, p=0.0), ValueError,
         "p must be in"),
        (lambda: subsets.bernoulli_masks(0, 5, 3), TypeError, "key must be a JAX"),
        (lambda: subsets.bernoulli_masks(jax.random.key(0), 0, 3), ValueError,
         "num_subsets must be >= 1"),
        (lambda: subsets.fixed_size_masks(jax.random.key(0), 5, 3, subset_size=4),
         ValueError, "subset_size must be <= num_tasks"),
        (lambda: subsets.unique_masks([[0, 2]]), ValueError, "only 0 and 1"),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("draw", [
    lambda key: subsets.bernoulli_masks(key, 64, 9, p=0.7),
    lambda key: subsets.fixed_size_masks(key, 64, 9, subset_size=4),
    lambda key: subsets.size_range_masks(key, 64, 9, min_size=2, max_size=7)])
def test_a_key_gives_the_same_masks_with_64_bit_jax_on_or_off(draw):
    key = jax.random.key(3)
    single = np.asarray(draw(key))
    with jax.enable_x64(True):
        double = np.asarray(draw(key))
    assert 0 < single.mean() < 1
    np.testing.assert_array_equal(single, double)
