"""Tests for tasksurrogate_jax.baselines (float64 via tests/conftest.py).

References are independent: exact derivatives of closed-form refits, Python
loops over per-example gradients, NumPy with explicit projection matrices.
Problems share shapes and chunk sizes so that compiled programs are reused.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax import baselines as bl
from tasksurrogate_jax import projection as proj
from tasksurrogate_jax.data import (
    filter_task_data,
    make_target_data,
    make_task_data,
    mask_to_weights,
    pad_task_data,
)
from tasksurrogate_jax.losses import softmax_cross_entropy, squared_error

RNG = np.random.default_rng(0)
NUM_FEATURES, NUM_CLASSES, NUM_TASKS = 3, 3, 4
RIDGE_BATCH = 7  # chunks (the last one padded) for the regression problem
ONES = jnp.ones(NUM_TASKS)


def linear_model(params, x):
    return x @ params["w"] + params["b"]


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def classification_problem(n=30, num_targets=6):
    """Unequal task sizes and two padding rows."""
    x = RNG.normal(size=(n + num_targets, NUM_FEATURES))
    y = RNG.integers(0, NUM_CLASSES, n + num_targets)
    ids = np.concatenate([np.arange(NUM_TASKS), RNG.integers(0, NUM_TASKS, n - 4)])
    data = pad_task_data(make_task_data(x[:n], y[:n], ids, num_tasks=NUM_TASKS,
                                        num_classes=NUM_CLASSES), n + 2)
    target = make_target_data(x[n:], y[n:], num_classes=NUM_CLASSES)
    linear = {"w": jnp.asarray(RNG.normal(size=(NUM_FEATURES, NUM_CLASSES))),
              "b": jnp.asarray(RNG.normal(size=NUM_CLASSES))}
    hidden = 4
    deep = {"w1": jnp.asarray(RNG.normal(size=(NUM_FEATURES, hidden))),
            "b1": jnp.asarray(0.1 * RNG.normal(size=hidden)),
            "w2": jnp.asarray(RNG.normal(size=(hidden, NUM_CLASSES))),
            "b2": jnp.zeros(NUM_CLASSES)}
    return data, target, linear, deep


DATA, TARGET, LINEAR, DEEP = classification_problem()
FEW_TARGETS = make_target_data(TARGET.inputs[:2], TARGET.labels[:2],
                               num_classes=NUM_CLASSES)


class Ridge:
    """Weighted ridge regression ``L(θ; s) + λ/2 ||θ||²`` with 2 outputs, solved in
    closed form; unequal task sizes and three padding rows."""

    def __init__(self, ridge=0.3, n=40, num_targets=5, num_outputs=2):
        x = RNG.normal(size=(n, NUM_FEATURES))
        y = RNG.normal(size=(n, num_outputs))
        ids = np.concatenate([np.arange(NUM_TASKS),
                              RNG.integers(0, NUM_TASKS, n - NUM_TASKS)])
        self.data = pad_task_data(make_task_data(x, y, ids), n + 3)
        self.target = make_target_data(RNG.normal(size=(num_targets, NUM_FEATURES)),
                                       RNG.normal(size=(num_targets, num_outputs)))
        self.ridge = ridge

    def fit(self, s, data=None):
        data = self.data if data is None else data
        w = mask_to_weights(s, data.task_ids)
        xa = jnp.concatenate([data.inputs, jnp.ones((data.inputs.shape[0], 1))], 1)
        total = jnp.sum(w)
        a = xa.T @ (w[:, None] * xa) / total + self.ridge * jnp.eye(xa.shape[1])
        theta = jnp.linalg.solve(a, xa.T @ (w[:, None] * data.labels) / total)
        return {"w": theta[:-1], "b": theta[-1]}

    def scores(self, s, data=None):
        """``F(s)`` ``[T]``: per-target squared error of the refit."""
        return squared_error(linear_model(self.fit(s, data), self.target.inputs),
                             self.target.labels)


RIDGE = Ridge()


@functools.cache
def ridge_derivatives():
    """``(-dF/ds_i, ½ d²F/ds_i²)`` at ``s = 1``, each ``[K, T]`` (forward mode)."""

    @jax.jit
    def along(e):
        first = lambda s: jax.jvp(RIDGE.scores, (s,), (e,))[1]  # noqa: E731
        return jax.jvp(first, (ONES,), (e,))

    first, second = jax.vmap(along)(jnp.eye(NUM_TASKS))
    return -first, 0.5 * second


@functools.cache
def _jitted_value_and_grad(fn):
    def one(p, x, y):
        value, grad = jax.value_and_grad(fn)(p, x, y)
        return value, ravel_pytree(grad)[0]

    return jax.jit(one)


def values_and_grads(fn, params, inputs, labels):
    """``[n]`` values and ``[n, p]`` raveled gradients of ``fn(params, x, y)``, one
    example at a time."""
    one = _jitted_value_and_grad(fn)
    pairs = [one(params, inputs[n], labels[n]) for n in range(inputs.shape[0])]
    return (np.array([float(v) for v, _ in pairs]),
            np.stack([np.asarray(g) for _, g in pairs]))


def example_loss(apply_fn, loss_fn):
    return lambda p, x, y: loss_fn(apply_fn(p, x[None]), y[None])[0]


MLP_LOSS = example_loss(mlp, softmax_cross_entropy)
LINEAR_SQUARED = example_loss(linear_model, squared_error)


def explicit_matrix(projection, params):
    """P ``[p, d]`` built whole: the projection of every basis vector."""
    flat, unravel = ravel_pytree(params)
    basis = jax.vmap(unravel)(jnp.eye(flat.size))
    return np.asarray(proj.project(projection, basis, batch_dims=1))


# ---------------------------------------------------------------------------
# Influence functions.


@pytest.mark.parametrize("hessian", bl.HESSIANS)
@pytest.mark.parametrize("solver", bl.SOLVERS)
def test_influence_is_the_exact_weight_derivative_for_ridge_regression(hessian,
                                                                       solver):
    # θ*(s) is closed form, so -dF/ds_i at s = 1 is exact; the damping plays the
    # ridge (the centring term -N_i ∇L(θ*) = N_i λ θ* is not zero here). The model
    # is linear in its parameters, so Gauss-Newton is the exact Hessian.
    expected, _ = ridge_derivatives()
    ours = bl.influence_scores(
        linear_model, RIDGE.fit(ONES), RIDGE.data, RIDGE.target,
        loss_fn=squared_error, damping=RIDGE.ridge, hessian=hessian, solver=solver,
        cg_tol=1e-13, batch_size=RIDGE_BATCH)
    assert ours.shape == (NUM_TASKS, RIDGE.target.num_targets)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_leave_one_out_differs_from_influence_by_the_second_order_term():
    # F(1 - ε e_i) - F(1) = ε · influence_i + ½ ε² d²F/ds_i² + O(ε³).
    influence, half = ridge_derivatives()
    eye = jnp.eye(NUM_TASKS)
    scores = jax.jit(RIDGE.scores)

    def remainder(eps):
        change = jnp.stack([scores(ONES - eps * eye[i]) - scores(ONES)
                            for i in range(NUM_TASKS)])
        return change - eps * influence

    # Refitting without task 0's rows is the ε = 1 case.
    kept = filter_task_data(RIDGE.data, 1 - eye[0])
    np.testing.assert_allclose(RIDGE.scores(ONES, kept) - scores(ONES),
                               influence[0] + remainder(1.0)[0], rtol=1e-10)
    errors = [float(jnp.max(jnp.abs(remainder(eps)))) for eps in (0.1, 0.05, 0.025)]
    assert 3.6 < errors[0] / errors[1] < 4.4 and 3.6 < errors[1] / errors[2] < 4.4
    gaps = [float(jnp.max(jnp.abs(remainder(eps) / eps**2 - half)))
            for eps in (0.1, 0.05)]
    assert gaps[1] < 0.6 * gaps[0] and gaps[1] < 0.05 * float(jnp.max(jnp.abs(half)))


@pytest.mark.parametrize("case", ["exact-K<T", "gauss_newton-K>T"])
def test_conjugate_gradients_equal_the_dense_solve(case):
    # Exact Hessian on softmax regression (convex), Gauss-Newton on an MLP (PSD);
    # solving with the task-side (K <= T) and the target-side right-hand sides.
    apply_fn, params, hessian, target = {
        "exact-K<T": (linear_model, LINEAR, "exact", TARGET),
        "gauss_newton-K>T": (mlp, DEEP, "gauss_newton", FEW_TARGETS)}[case]
    kwargs = dict(damping=1e-2, hessian=hessian)
    dense = bl.influence_scores(apply_fn, params, DATA, target, solver="dense",
                                **kwargs)
    cg = bl.influence_scores(apply_fn, params, DATA, target, solver="cg",
                             cg_tol=1e-13, cg_max_iter=500, **kwargs)
    assert dense.shape == (NUM_TASKS, target.num_targets)
    np.testing.assert_allclose(cg, dense, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------
# TracIn and TRAK against explicit computations.


def _tracin_loop(checkpoints, rates, data, target):
    ids = np.asarray(data.task_ids)
    total = np.sum(ids >= 0)
    out = np.zeros((data.num_tasks, target.num_targets))
    for rate, params in zip(rates, checkpoints, strict=True):
        _, grads = values_and_grads(MLP_LOSS, params, data.inputs, data.labels)
        _, grads_t = values_and_grads(MLP_LOSS, params, target.inputs, target.labels)
        for t in range(target.num_targets):
            for n in np.nonzero(ids >= 0)[0]:
                out[ids[n], t] += rate * grads_t[t] @ grads[n] / total
    return out


def test_tracin_equals_gradient_dot_products_per_task():
    later = jax.tree_util.tree_map(lambda p: 0.5 * p, DEEP)
    ours = bl.tracin_scores(mlp, [DEEP, later], DATA, TARGET,
                            learning_rates=[0.1, 0.3], batch_size=6)
    np.testing.assert_allclose(
        ours, _tracin_loop([DEEP, later], [0.1, 0.3], DATA, TARGET),
        rtol=1e-10, atol=1e-13)
    single = bl.tracin_scores(mlp, (DEEP,), DATA, TARGET, batch_size=6)
    np.testing.assert_allclose(single, _tracin_loop([DEEP], [1.0], DATA, TARGET),
                               rtol=1e-10, atol=1e-13)


def _trak_numpy(phi, dloss, phi_t, dloss_t, ids, damping):
    """``ψ_tᵀ (Σ Φ_nᵀΦ_n + λI)^{-1} ψ_n`` summed per task; Φ ``[n, C, d]``."""
    keep = ids >= 0
    kernel = np.einsum("ncd,nce->de", phi[keep], phi[keep])
    kernel += damping * np.eye(phi.shape[2])
    psi = np.einsum("nc,ncd->nd", dloss, phi)
    psi_t = np.einsum("nc,ncd->nd", dloss_t, phi_t)
    per_example = psi_t @ np.linalg.solve(kernel, psi.T)  # [T, n]
    return np.stack([per_example[:, ids == k].sum(1) for k in range(NUM_TASKS)])


def _margin(p, x, y):
    logits = mlp(p, x[None])[0]
    others = jnp.delete(logits, y, assume_unique_indices=True)
    return logits[y] - jax.nn.logsumexp(others)


def test_trak_margin_equals_an_explicit_numpy_computation():
    projection = proj.make_projection(jax.random.key(3), 7)
    matrix = explicit_matrix(projection, DEEP)

    def rows(inputs, labels):
        margins, grads = values_and_grads(_margin, DEEP, inputs, labels)
        return (grads @ matrix)[:, None], -1 / (1 + np.exp(margins))[:, None]  # dℓ/dm

    ours = bl.trak_scores(mlp, DEEP, DATA, TARGET, key=jax.random.key(3), proj_dim=7,
                          damping=0.5)
    expected = _trak_numpy(*rows(DATA.inputs, DATA.labels),
                           *rows(TARGET.inputs, TARGET.labels),
                           np.asarray(DATA.task_ids), 0.5)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_trak_loss_features_equal_numpy_for_regression():
    params = RIDGE.fit(ONES)
    data, target = RIDGE.data, RIDGE.target
    _, grads = values_and_grads(LINEAR_SQUARED, params, data.inputs, data.labels)
    _, grads_t = values_and_grads(LINEAR_SQUARED, params, target.inputs,
                                  target.labels)
    ours = bl.trak_scores(linear_model, params, data, target, proj_dim=None,
                          features="loss", loss_fn=squared_error, damping=1e-3,
                          batch_size=RIDGE_BATCH)
    expected = _trak_numpy(grads[:, None], np.ones((data.num_examples, 1)),
                           grads_t[:, None], np.ones((target.num_targets, 1)),
                           np.asarray(data.task_ids), 1e-3)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_trak_on_outputs_is_influence_for_least_squares():
    # Squared error, linear model: Σ J_nᵀJ_n = W H, and ∇L(θ*) = 0 without ridge,
    # so TRAK on the unprojected outputs, undamped, is the exact influence.
    ols = Ridge(ridge=0.0)
    params = ols.fit(ONES)
    common = dict(loss_fn=squared_error, damping=0.0, batch_size=RIDGE_BATCH)
    influence = bl.influence_scores(linear_model, params, ols.data, ols.target,
                                    solver="dense", **common)
    trak = bl.trak_scores(linear_model, params, ols.data, ols.target, proj_dim=None,
                          features="outputs", **common)
    np.testing.assert_allclose(trak, influence, rtol=1e-9, atol=1e-12)


def test_every_baseline_credits_a_task_made_of_the_targets():
    # The targets follow a linear rule; task 0 is two copies of them and the other
    # tasks are noise. Removing task 0 hurts every target (positive), and on
    # average more than removing any other task does.
    ridge = Ridge(ridge=0.01)
    inputs = np.asarray(ridge.target.inputs)
    labels = inputs @ (2 * RNG.normal(size=(NUM_FEATURES, 2)))
    ridge.target = make_target_data(inputs, labels)
    n, copies = ridge.data.num_examples, 2 * ridge.target.num_targets
    x = np.concatenate([inputs, inputs, np.asarray(ridge.data.inputs)[copies:]])
    y = np.concatenate([labels, labels, np.asarray(ridge.data.labels)[copies:]])
    ids = np.concatenate([np.zeros(copies, int), 1 + RNG.integers(0, 3, n - copies)])
    ridge.data = make_task_data(x, y, ids, num_tasks=NUM_TASKS)
    params = ridge.fit(ONES)
    loo = np.stack([ridge.scores(1 - np.eye(NUM_TASKS)[i]) - ridge.scores(ONES)
                    for i in range(NUM_TASKS)])
    common = dict(loss_fn=squared_error, batch_size=RIDGE_BATCH)
    for name, scores in [
        ("exact leave-one-out", loo),
        ("influence", bl.influence_scores(linear_model, params, ridge.data,
                                          ridge.target, damping=ridge.ridge,
                                          solver="dense", **common)),
        ("tracin", bl.tracin_scores(linear_model, [params], ridge.data,
                                    ridge.target, **common)),
        ("trak", bl.trak_scores(linear_model, params, ridge.data, ridge.target,
                                proj_dim=None, features="outputs", damping=0.0,
                                **common)),
    ]:
        scores = np.asarray(scores)
        assert np.all(scores[0] > 0), (name, scores)
        assert np.all(scores[0].mean() > scores[1:].mean(1)), (name, scores)


# ---------------------------------------------------------------------------
# Bad input.


def test_bad_influence_arguments_raise_clear_errors():
    def infl(**kw):
        return bl.influence_scores(linear_model, LINEAR, DATA, TARGET, **kw)

    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        infl(damping=-1.0)
    with pytest.raises(ValueError, match="damping must be finite"):
        infl(damping=float("nan"))
    with pytest.raises(TypeError, match="damping must be a number"):
        infl(damping="big")
    with pytest.raises(ValueError, match="hessian must be one of"):
        infl(hessian="newton")
    with pytest.raises(ValueError, match="solver must be one of"):
        infl(solver="lu")
    with pytest.raises(ValueError, match="cg_max_iter must be >= 1"):
        infl(cg_max_iter=0)
    with pytest.raises(ValueError, match="cg_tol must be a positive number"):
        infl(cg_tol=0.0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        infl(batch_size=0)
    wide = make_target_data(np.zeros((2, NUM_FEATURES + 1)), [0, 1],
                            num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="target inputs have per-example shape"):
        bl.influence_scores(linear_model, LINEAR, DATA, wide)
    with pytest.raises(ValueError, match="params do not match the model"):
        bl.influence_scores(linear_model, {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)},
                            DATA, TARGET)
    with pytest.raises(ValueError, match=r"per-example losses \[batch\]"):
        infl(loss_fn=lambda o, y: jnp.mean(softmax_cross_entropy(o, y)))
    with pytest.raises(TypeError, match="data must be a TaskData"):
        bl.influence_scores(linear_model, LINEAR, TARGET, TARGET)
    padding_only = make_task_data(DATA.inputs[:3], DATA.labels[:3], [-1, -1, -1],
                                  num_tasks=2)
    with pytest.raises(ValueError, match="no training examples"):
        bl.influence_scores(linear_model, LINEAR, padding_only, TARGET)


def test_bad_tracin_and_trak_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match=r"for θ\* alone pass \[params\]"):
        bl.tracin_scores(mlp, DEEP, DATA, TARGET)
    with pytest.raises(ValueError, match="different pytree structure"):
        bl.tracin_scores(mlp, [DEEP, LINEAR], DATA, TARGET)
    with pytest.raises(ValueError, match=r"learning_rates must have shape \(2,\)"):
        bl.tracin_scores(mlp, [DEEP, DEEP], DATA, TARGET, learning_rates=[1.0])
    with pytest.raises(ValueError, match="learning_rates must be finite"):
        bl.tracin_scores(mlp, [DEEP], DATA, TARGET, learning_rates=[np.inf])

    with pytest.raises(ValueError, match="key is required"):
        bl.trak_scores(mlp, DEEP, DATA, TARGET, proj_dim=4)
    with pytest.raises(ValueError, match="features must be one of"):
        bl.trak_scores(mlp, DEEP, DATA, TARGET, proj_dim=None, features="grad")
    with pytest.raises(ValueError, match="proj_dim must be <="):
        bl.trak_scores(mlp, DEEP, DATA, TARGET, key=jax.random.key(0),
                       proj_dim=10_000)
    with pytest.raises(ValueError, match="features='margin' assumes"):
        bl.trak_scores(linear_model, RIDGE.fit(ONES), RIDGE.data, RIDGE.target,
                       proj_dim=None, loss_fn=squared_error)
    with pytest.raises(ValueError, match=r"to return \[batch, outputs\]"):
        bl.trak_scores(lambda p, x: linear_model(p, x)[:, 0], RIDGE.fit(ONES),
                       RIDGE.data, RIDGE.target, proj_dim=None, features="outputs",
                       loss_fn=squared_error)
    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        bl.trak_scores(mlp, DEEP, DATA, TARGET, proj_dim=None, damping=-0.1)


def test_non_finite_scores_are_reported():
    broken = {"w": LINEAR["w"].at[0, 0].set(jnp.nan), "b": LINEAR["b"]}
    with pytest.raises(ValueError, match="influence scores are not finite"):
        bl.influence_scores(linear_model, broken, DATA, TARGET, damping=1e-2,
                            solver="dense")


def test_conjugate_gradients_solves_spd_systems_and_survives_breakdown():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(12, 12))
    spd = a @ a.T + 0.5 * np.eye(12)
    b = rng.normal(size=12)
    x, residual = bl.conjugate_gradients(lambda v: jnp.asarray(spd) @ v,
                                                jnp.asarray(b), tol=1e-10, max_iter=100)
    np.testing.assert_allclose(x, np.linalg.solve(spd, b), rtol=1e-7, atol=1e-9)
    assert float(residual) < 1e-9
    # Indefinite: p^T A p <= 0 at some step; the best finite iterate comes back.
    indefinite = np.diag([1.0, -1.0, 2.0])
    x, residual = bl.conjugate_gradients(
        lambda v: jnp.asarray(indefinite) @ v, jnp.asarray([1.0, 1.0, 0.0]),
        tol=1e-12, max_iter=50)
    assert np.all(np.isfinite(np.asarray(x))) and 0 < float(residual) <= 1.0
