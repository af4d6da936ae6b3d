"""The baselines in float32, what accelerators run, against the same calls in
float64.

``test_baselines.py`` checks every baseline in float64 against independent
references (closed-form derivatives, explicit matrices); here each one runs in
float32 on a small MLP and must agree with its float64 run, so float32 adds no
error beyond rounding. Tolerances are relative to each score matrix's scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax.data import make_target_data, make_task_data
from tasksurrogate_jax.estimate import baselines as bl

NUM_TASKS, NUM_CLASSES, NUM_FEATURES, HIDDEN = 5, 3, 6, 8


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def problem(n=60, num_targets=7):
    """The same draw each call, in JAX's default float type at the call."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(n + num_targets, NUM_FEATURES))
    y = rng.integers(0, NUM_CLASSES, n + num_targets)
    data = make_task_data(x[:n], y[:n], np.arange(n) % NUM_TASKS,
                          num_classes=NUM_CLASSES)
    target = make_target_data(x[n:], y[n:], num_classes=NUM_CLASSES)
    params = {"w1": jnp.asarray(rng.normal(size=(NUM_FEATURES, HIDDEN)) / 2),
              "b1": jnp.asarray(0.1 * rng.normal(size=HIDDEN)),
              "w2": jnp.asarray(rng.normal(size=(HIDDEN, NUM_CLASSES)) / 2),
              "b2": jnp.zeros(NUM_CLASSES)}
    return data, target, params


DAMPING = 0.05  # fixed: the solves see the same system in both precisions


def baseline_scores():
    """``{name: [K, T] scores or damping}`` of every baseline: influence with a
    fixed damping (CG, dense, exact Hessian), the ``"auto"`` damping's value,
    TracIn over two checkpoints, TRAK projected from one key."""
    data, target, params = problem()
    earlier = jax.tree.map(lambda leaf: 0.9 * leaf, params)
    _, info = bl.influence_scores(mlp, params, data, target, return_info=True)
    return {
        "influence, cg": bl.influence_scores(mlp, params, data, target,
                                             damping=DAMPING),
        "influence, dense": bl.influence_scores(mlp, params, data, target,
                                                damping=DAMPING, solver="dense"),
        "influence, exact Hessian": bl.influence_scores(
            mlp, params, data, target, damping=DAMPING, hessian="exact",
            solver="dense"),
        "influence, auto damping": jnp.asarray(info.damping),
        "tracin": bl.tracin_scores(mlp, [earlier, params], data, target,
                                   learning_rates=[0.5, 0.25]),
        "trak, projected": bl.trak_scores(mlp, params, data, target,
                                          key=jax.random.key(0), proj_dim=32),
    }


@pytest.fixture(scope="module")
def float32_scores():
    # Module-scoped fixtures run outside the per-test x64 fixture: 64-bit off.
    return {name: np.asarray(s) for name, s in baseline_scores().items()}


@pytest.fixture(scope="module")
def float64_scores():
    with jax.enable_x64(True):
        return {name: np.asarray(s) for name, s in baseline_scores().items()}


@pytest.mark.parametrize("name, tolerance", [
    # Rounding alone (float32 eps 1.2e-7) through damped solves.
    ("influence, cg", 2e-5), ("influence, dense", 2e-5),
    ("influence, exact Hessian", 1e-4), ("tracin", 1e-5),
    # The same projection from the same key in both precisions.
    ("trak, projected", 1e-4),
    # Power iteration in float32 stops at a slightly other Rayleigh quotient
    # (measured: 4e-4 relative; the scores then move by 2e-4 of their scale).
    ("influence, auto damping", 2e-3)])
def test_float32_baseline_equals_its_float64_run(name, tolerance, float32_scores,
                                                 float64_scores):
    single = float32_scores[name]
    double = float64_scores[name]
    assert single.dtype == np.float32
    assert double.dtype == np.float64
    scale = float(np.abs(double).max())
    assert scale > 1e-3  # the scores are not all zero
    np.testing.assert_allclose(single, double, atol=tolerance * scale, rtol=0)
