"""Tests for the digits data and model (tasksurrogate_jax.workloads.digits_data)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tasksurrogate_jax.workloads.digits_data import (
    DigitsDataConfig,
    DigitsMLP,
    digits_data,
)


def _clean(test_fraction=0.3, split_seed=0):
    """Independent reference: clean standardized train/test inputs and labels."""
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data / 16.0, digits.target, test_size=test_fraction,
        stratify=digits.target, random_state=split_seed,
    )
    mean, std = x_tr.mean(0), np.maximum(x_tr.std(0), 1e-2)
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def _np(data):
    return np.asarray(data.inputs), np.asarray(data.labels), np.asarray(data.task_ids)


@pytest.fixture(scope="module")
def clean():
    return _clean()


@pytest.fixture(scope="module")
def planted():
    return digits_data(DigitsDataConfig())


def test_split_is_stratified_and_deterministic(clean):
    config = DigitsDataConfig(sources="random")
    (d1, t1), (d2, t2) = digits_data(config), digits_data(config)
    for a, b in [(d1.inputs, d2.inputs), (d1.labels, d2.labels),
                 (d1.task_ids, d2.task_ids), (t1.inputs, t2.inputs),
                 (t1.labels, t2.labels)]:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    full = np.bincount(load_digits().target, minlength=10)
    test = np.bincount(np.asarray(t1.labels), minlength=10)
    assert np.all(np.abs(test - 0.3 * full) <= 1), (test, 0.3 * full)
    assert t1.num_targets == 540 and d1.num_examples == 1797 - 540
    _, y_tr, _, y_te = clean
    np.testing.assert_array_equal(np.asarray(d1.labels), y_tr)
    np.testing.assert_array_equal(np.asarray(t1.labels), y_te)
    assert t1.description == "per-example test cross-entropy of 540 held-out digits"
    other = digits_data(DigitsDataConfig(sources="random", split_seed=1))[1]
    assert not np.array_equal(np.asarray(other.labels), np.asarray(t1.labels))


def test_random_sources_partition_the_training_set(clean):
    data, _ = digits_data(DigitsDataConfig(sources="random", num_tasks=7))
    x, y, ids = _np(data)
    assert data.task_names == tuple(f"group{i:02d}" for i in range(7))
    assert ids.min() == 0 and ids.max() == 6  # one task per row: disjoint, covering
    sizes = data.task_sizes()
    assert sizes.sum() == y.size and sizes.max() - sizes.min() <= 1
    x_tr, y_tr, _, _ = clean
    np.testing.assert_array_equal(y, y_tr)
    np.testing.assert_allclose(x, x_tr, atol=1e-5)
    assert x.dtype == np.float32 and x.shape[1] == 64


def test_planted_sources(planted, clean):
    data, target = planted
    x, y, ids = _np(data)
    x_tr, y_tr, x_te, y_te = clean
    assert data.task_names[:4] == (
        "noisy-labels", "flipped-labels", "input-noise", "class-imbalance")
    assert data.task_names[4:] == tuple(f"clean-{i:02d}" for i in range(4, 10))
    sizes = data.task_sizes()
    assert ids.min() == 0 and sizes.sum() == y_tr.size
    assert sizes.max() - sizes.min() <= 2, sizes
    # noisy labels: about half changed, each to another class
    t0 = ids == 0
    changed = (y[t0] != y_tr[t0]).mean()
    assert abs(changed - 0.5) < 0.01, changed
    # flipped labels: every label permuted
    t1 = ids == 1
    np.testing.assert_array_equal(y[t1], (y_tr[t1] + 1) % 10)
    # input noise: labels kept, inputs off by noise of std 1
    t2 = ids == 2
    np.testing.assert_array_equal(y[t2], y_tr[t2])
    noise = x[t2] - x_tr[t2]
    assert abs(noise.std() - 1.0) < 0.1 and abs(noise.mean()) < 0.1
    # class imbalance: exactly 3 classes, otherwise clean
    t3 = ids == 3
    assert np.unique(y[t3]).size == 3
    assert np.unique(y_tr[ids != 3]).size == 10
    # inputs of all other tasks and labels of clean tasks untouched
    np.testing.assert_allclose(x[~t2], x_tr[~t2], atol=1e-5)
    np.testing.assert_array_equal(y[ids >= 3], y_tr[ids >= 3])
    # targets untouched
    np.testing.assert_allclose(np.asarray(target.inputs), x_te, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(target.labels), y_te)


def test_planted_corruptions_scale_with_config(clean):
    config = DigitsDataConfig(num_tasks=5, label_noise=0.2, input_noise=0.5)
    data, _ = digits_data(config)
    x, y, ids = _np(data)
    x_tr, y_tr, _, _ = clean
    assert data.task_names[-1] == "clean-04"
    assert abs((y[ids == 0] != y_tr[ids == 0]).mean() - 0.2) < 0.01
    assert abs((x[ids == 2] - x_tr[ids == 2]).std() - 0.5) < 0.05


def test_target_subset_is_fixed_and_from_the_test_split(clean):
    config = DigitsDataConfig(num_targets=50)
    t1, t2 = digits_data(config)[1], digits_data(config)[1]
    assert t1.num_targets == 50
    np.testing.assert_array_equal(np.asarray(t1.inputs), np.asarray(t2.inputs))
    x_te = clean[2].astype(np.float32)
    rows = [np.flatnonzero(np.abs(x_te - r).max(1) < 1e-5) for r in
            np.asarray(t1.inputs)]
    assert all(r.size >= 1 for r in rows)
    assert len({int(r[0]) for r in rows}) == 50


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_mlp_shapes_and_param_only_state(depth):
    model = DigitsMLP(DigitsDataConfig(hidden=16, depth=depth), rngs=nnx.Rngs(0))
    assert model(jnp.ones((5, 64), jnp.float32)).shape == (5, 10)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    assert len(jax.tree.leaves(params)) == 2 * (depth + 1)


def test_mlp_trains_to_90_percent_on_clean_sources():
    data, target = digits_data(DigitsDataConfig(sources="random"))
    model = DigitsMLP(DigitsDataConfig(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adam(1e-2)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss_fn)(p, data.inputs, data.labels)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    start, state = time.perf_counter(), opt.init(params)
    for _ in range(300):
        params, state = step(params, state)
    logits = nnx.merge(graphdef, params)(target.inputs)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == target.labels))
    print(f"digits MLP test accuracy {acc:.4f} in {time.perf_counter() - start:.1f}s")
    assert acc >= 0.9


@pytest.mark.parametrize(
    "overrides, error, field",
    [
        (dict(sources="cifar"), ValueError, "sources"),
        (dict(sources="random", num_tasks=1), ValueError, "num_tasks"),
        (dict(num_tasks=4), ValueError, "num_tasks"),
        (dict(num_tasks=10_000), ValueError, "num_tasks"),
        (dict(num_tasks=2.5), TypeError, "num_tasks"),
        (dict(test_fraction=0.0), ValueError, "test_fraction"),
        (dict(test_fraction=1.0), ValueError, "test_fraction"),
        (dict(test_fraction=0.001), ValueError, "test_fraction"),
        (dict(test_fraction="0.3"), TypeError, "test_fraction"),
        (dict(label_noise=-0.1), ValueError, "label_noise"),
        (dict(label_noise=1.5), ValueError, "label_noise"),
        (dict(input_noise=-1.0), ValueError, "input_noise"),
        (dict(num_targets=0), ValueError, "num_targets"),
        (dict(num_targets=541), ValueError, "num_targets"),
        (dict(hidden=0), ValueError, "hidden"),
        (dict(split_seed=-1), ValueError, "split_seed"),
    ],
)
def test_bad_configs_name_the_field(overrides, error, field):
    with pytest.raises(error, match=field):
        digits_data(DigitsDataConfig(**overrides))


def test_config_must_be_a_digits_config():
    with pytest.raises(TypeError, match="DigitsDataConfig"):
        digits_data({"sources": "random"})


# -- "interactions" sources -------------------------------------------------------


@pytest.fixture(scope="module")
def interactions():
    config = DigitsDataConfig(sources="interactions")
    return config, digits_data(config)


def test_interaction_sources(interactions, clean):
    config, (data, target) = interactions
    x, y, ids = _np(data)
    x_tr, y_tr, x_te, y_te = clean
    n = y_tr.size
    assert data.task_names == ("twin-a", "twin-b", "swapped", "blend-a", "blend-b",
                               "clean-05", "clean-06", "clean-07", "clean-08",
                               "clean-09")
    # The training split comes first, each image once: in twin-a or a clean task.
    np.testing.assert_array_equal(y[:n], y_tr)
    np.testing.assert_allclose(x[:n], x_tr, atol=1e-5)
    assert set(np.unique(ids[:n])) == {0, 5, 6, 7, 8, 9}
    conflict = np.isin(y_tr, config.conflict_classes)
    twins = ids[:n] == 0
    assert twins.sum() == round(config.conflict_fraction * conflict.sum())
    assert conflict[twins].all()
    clean_sizes = np.bincount(ids[:n][~twins], minlength=10)[5:]
    assert clean_sizes.max() - clean_sizes.min() <= 1
    # Twins: exact duplicates; swapped: the same images, the next conflict class.
    np.testing.assert_array_equal(x[ids == 0], x[ids == 1])
    np.testing.assert_array_equal(y[ids == 0], y[ids == 1])
    np.testing.assert_array_equal(x[ids == 0], x[ids == 2])
    order = list(config.conflict_classes)
    shifted = [order[(order.index(v) + 1) % len(order)] for v in y[ids == 0]]
    np.testing.assert_array_equal(y[ids == 2], shifted)
    # Blends: labelled a (b), each the midpoint of a training image of a and of b.
    a, b = config.blend_classes
    for task, label in ((3, a), (4, b)):
        assert (ids == task).sum() == config.blend_size
        assert (y[ids == task] == label).all()
        midpoints = (x_tr[y_tr == a][:, None] + x_tr[y_tr == b][None]) / 2
        midpoints = midpoints.reshape(-1, 64)
        for row in x[ids == task][:10]:
            assert np.abs(midpoints - row).max(1).min() < 1e-5
    # Targets untouched.
    np.testing.assert_allclose(np.asarray(target.inputs), x_te, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(target.labels), y_te)


def test_interaction_fields_leave_other_sources_and_fingerprints_alone():
    from tasksurrogate_jax.workloads.digits import digits_workload
    from tasksurrogate_jax.workloads.digits_data import (
        INTERACTION_FIELDS,
        planted_interactions,
    )

    changed = dict(conflict_classes=(0, 1), conflict_fraction=0.5,
                   blend_classes=(2, 3), blend_size=10, blend_weight=0.3)
    for sources in ("planted", "random"):
        base = digits_data(DigitsDataConfig(sources=sources))[0]
        other = digits_data(DigitsDataConfig(sources=sources, **changed))[0]
        for u, v in zip(_np(base), _np(other), strict=True):
            np.testing.assert_array_equal(u, v)
        assert planted_interactions(DigitsDataConfig(sources=sources)) == {}
    # The other presets' descriptions (part of their fingerprints and stores)
    # do not mention the fields only the "interactions" sources read.
    assert not set(INTERACTION_FIELDS) & set(digits_workload("cpu").description)
    workload = digits_workload("interactions")
    assert set(INTERACTION_FIELDS) <= set(workload.description)
    assert workload.planted_interactions == {(0, 1): 1, (0, 2): -1, (1, 2): -1,
                                             (3, 4): -1}


@pytest.mark.parametrize(
    "overrides, error, field",
    [
        (dict(num_tasks=5), ValueError, "num_tasks"),
        (dict(conflict_classes=(1,)), ValueError, "conflict_classes"),
        (dict(conflict_classes=(1, 1)), ValueError, "conflict_classes"),
        (dict(conflict_classes=(1, 10)), ValueError, "conflict_classes"),
        (dict(conflict_classes="12"), TypeError, "conflict_classes"),
        (dict(blend_classes=(3,)), ValueError, "blend_classes"),
        (dict(blend_classes=(3, 4)), ValueError, "blend_classes"),
        (dict(conflict_fraction=0.0), ValueError, "conflict_fraction"),
        (dict(conflict_fraction=1.5), ValueError, "conflict_fraction"),
        (dict(blend_size=0), ValueError, "blend_size"),
        (dict(blend_weight=-0.1), ValueError, "blend_weight"),
    ],
)
def test_bad_interaction_configs_name_the_field(overrides, error, field):
    with pytest.raises(error, match=field):
        digits_data(DigitsDataConfig(sources="interactions", **overrides))
