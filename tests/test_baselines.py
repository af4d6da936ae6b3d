"""Tests for tasksurrogate_jax.estimate.baselines (float64: see pytestmark below).

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

from tasksurrogate_jax.data import (
    filter_task_data,
    make_target_data,
    make_task_data,
    mask_to_weights,
    pad_task_data,
)
from tasksurrogate_jax.estimate import baselines as bl
from tasksurrogate_jax.estimate import projection as proj
from tasksurrogate_jax.losses import softmax_cross_entropy, squared_error

RNG = np.random.default_rng(0)
NUM_FEATURES, NUM_CLASSES, NUM_TASKS = 3, 3, 4
RIDGE_BATCH = 7  # chunks (the last one padded) for the regression problem


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


# Most tests here compare with exact float64 NumPy derivatives and solves at
# 1e-7 to 1e-13, so the module runs with 64-bit JAX (tests/conftest.py), and
# its module-level arrays, made at import (outside the per-test fixture), are
# built in float64 too.
pytestmark = pytest.mark.float64
with jax.enable_x64(True):
    ONES = jnp.ones(NUM_TASKS)
    DATA, TARGET, LINEAR, DEEP = classification_problem()
    FEW_TARGETS = make_target_data(TARGET.inputs[:2], TARGET.labels[:2],
                                   num_classes=NUM_CLASSES)
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
    with pytest.raises(ValueError, match="damping must be a number or 'auto'"):
        infl(damping="big")
    with pytest.raises(TypeError, match="damping must be a number or 'auto'"):
        infl(damping=[1.0])
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


# ---------------------------------------------------------------------------
# Defaults: damping="auto", proj_dim="auto", CG that does not converge.


def _numpy_gauss_newton(params):
    """``Σ_n ω_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n / W`` of the MLP on DATA, from
    per-example Jacobians and the closed-form softmax cross-entropy Hessian."""
    flat, unravel = ravel_pytree(params)
    jacobian = jax.jit(jax.jacobian(lambda f, x: mlp(unravel(f), x[None])[0]))
    ids = np.asarray(DATA.task_ids)
    matrix = np.zeros((flat.size, flat.size))
    for n in np.nonzero(ids >= 0)[0]:
        jac = np.asarray(jacobian(flat, DATA.inputs[n]))  # [C, p]
        probs = np.asarray(jax.nn.softmax(mlp(params, DATA.inputs[n][None])[0]))
        matrix += jac.T @ (np.diag(probs) - np.outer(probs, probs)) @ jac
    return matrix / np.sum(ids >= 0)


def test_auto_damping_is_a_fraction_of_the_largest_curvature_eigenvalue():
    gauss_newton = _numpy_gauss_newton(DEEP)
    expected = bl.DAMPING_FRACTION * np.linalg.eigvalsh(gauss_newton)[-1]
    lam = bl.influence_damping(mlp, DEEP, DATA)
    np.testing.assert_allclose(lam, expected, rtol=1e-4)
    scores, info = bl.influence_scores(mlp, DEEP, DATA, TARGET, return_info=True)
    assert info.damping_rule == "auto" and info.hessian == "gauss_newton"
    np.testing.assert_allclose(info.damping, lam, rtol=1e-12)
    np.testing.assert_allclose(info.top_eigenvalue, lam / bl.DAMPING_FRACTION,
                               rtol=1e-12)
    assert info.cg_residual <= 1e-6
    # The same scores as that λ given; the dense solve with the numpy matrix.
    given, given_info = bl.influence_scores(mlp, DEEP, DATA, TARGET, damping=lam,
                                            return_info=True)
    np.testing.assert_allclose(scores, given, rtol=1e-12)
    assert given_info.damping_rule == "given" and given_info.top_eigenvalue is None
    dense = bl.influence_scores(mlp, DEEP, DATA, TARGET, solver="dense")
    np.testing.assert_allclose(scores, dense, rtol=1e-4, atol=1e-8)  # cg_tol 1e-6
    # The exact Hessian: its eigenvalue largest in magnitude. For a model linear
    # in its parameters under squared error it is the Gauss-Newton matrix,
    # X̃ᵀ diag(ω) X̃ / W per output (X̃ the inputs with a column of ones).
    params = RIDGE.fit(ONES)
    ids = np.asarray(RIDGE.data.task_ids)
    xa = np.concatenate([np.asarray(RIDGE.data.inputs),
                         np.ones((ids.size, 1))], 1)[ids >= 0]
    top = np.linalg.eigvalsh(xa.T @ xa / xa.shape[0])[-1]
    for hessian in bl.HESSIANS:
        lam = bl.influence_damping(linear_model, params, RIDGE.data,
                                   loss_fn=squared_error, hessian=hessian,
                                   batch_size=RIDGE_BATCH)
        np.testing.assert_allclose(lam, bl.DAMPING_FRACTION * top, rtol=1e-4)


def test_top_eigenvalue_by_power_iteration():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(20, 20)))[0]
    values = np.concatenate([[-5.0, 3.0], rng.uniform(0, 1, 18)])
    a = jnp.asarray(basis @ np.diag(values) @ basis.T)
    top = bl.top_eigenvalue(lambda v: a @ v, 20, jnp.float64)
    np.testing.assert_allclose(top, -5.0, rtol=1e-4)  # largest in magnitude
    zero = bl.top_eigenvalue(lambda v: 0 * v, 4, jnp.float64)
    assert float(zero) == 0.0


def test_conjugate_gradients_that_do_not_converge_raise():
    kwargs = dict(hessian="exact", damping=0.0, cg_max_iter=1)
    with pytest.raises(RuntimeError, match=r"relative residual of .* "
                       r"\(> cg_max_residual=0.01\).*Increase the damping"):
        bl.influence_scores(mlp, DEEP, DATA, TARGET, **kwargs)
    scores, info = bl.influence_scores(mlp, DEEP, DATA, TARGET, return_info=True,
                                       cg_max_residual=np.inf, **kwargs)
    assert scores.shape == (NUM_TASKS, TARGET.num_targets)
    assert info.cg_residual > 1e-2
    with pytest.raises(ValueError, match="cg_max_residual must be a positive"):
        bl.influence_scores(mlp, DEEP, DATA, TARGET, cg_max_residual=0.0)
    with pytest.raises(ValueError, match="damping must be a number or 'auto'"):
        bl.trak_scores(mlp, DEEP, DATA, TARGET, damping="big")
    with pytest.raises(ValueError, match="proj_dim must be a positive int, None"):
        bl.trak_scores(mlp, DEEP, DATA, TARGET, proj_dim="full")


def test_trak_auto_projection_dimension_rule(monkeypatch):
    # p = 3·40 + 40 + 40·3 + 3 = 283 parameters.
    wide = {"w1": jnp.asarray(RNG.normal(size=(NUM_FEATURES, 40))),
            "b1": jnp.zeros(40), "w2": jnp.asarray(RNG.normal(size=(40, 3))),
            "b2": jnp.zeros(3)}
    few = make_task_data(DATA.inputs[:5], DATA.labels[:5], np.arange(5) % 4,
                         num_tasks=NUM_TASKS, num_classes=NUM_CLASSES)
    few = pad_task_data(few, 7)  # padding rows are not examples
    assert bl.trak_proj_dim(mlp, wide, few) == 8 * 5  # 8 n, n = 5
    assert bl.trak_proj_dim(mlp, wide, few, features="outputs") == 8 * 5 * 3
    assert bl.trak_proj_dim(mlp, wide, DATA) == 240  # 8 · 30 examples
    assert bl.trak_proj_dim(mlp, DEEP, few) is None  # p = 31 <= 40
    monkeypatch.setattr(bl.trak, "PROJ_DIM_MAX", 16)  # read there
    assert bl.trak_proj_dim(mlp, wide, few) == 16
    monkeypatch.undo()
    _, info = bl.trak_scores(mlp, wide, few, TARGET, key=jax.random.key(0),
                             return_info=True)
    assert (info.proj_dim, info.proj_dim_rule, info.num_features) == (40, "auto", 5)
    with pytest.raises(ValueError, match="key is required for the projection to "
                       "d=40"):
        bl.trak_scores(mlp, wide, few, TARGET)
    # No projection needs no key.
    _, info = bl.trak_scores(mlp, DEEP, DATA, TARGET, return_info=True)
    assert info.proj_dim is None and info.num_features == 30


def test_trak_auto_damping_is_a_fraction_of_the_largest_kernel_eigenvalue():
    # Unprojected margin features: Φ_n = ∇m_n, ψ_n = −σ(−m_n) ∇m_n.
    ids = np.asarray(DATA.task_ids)
    margins, grads = values_and_grads(_margin, DEEP, DATA.inputs, DATA.labels)
    kernel = grads[ids >= 0].T @ grads[ids >= 0]
    expected = bl.DAMPING_FRACTION * np.linalg.eigvalsh(kernel)[-1]
    scores, info = bl.trak_scores(mlp, DEEP, DATA, TARGET, proj_dim=None,
                                  return_info=True)
    np.testing.assert_allclose(info.damping, expected, rtol=1e-4)
    assert info.damping_rule == "auto"
    margins_t, grads_t = values_and_grads(_margin, DEEP, TARGET.inputs,
                                          TARGET.labels)
    reference = _trak_numpy(grads[:, None], -1 / (1 + np.exp(margins))[:, None],
                            grads_t[:, None], -1 / (1 + np.exp(margins_t))[:, None],
                            ids, info.damping)
    np.testing.assert_allclose(scores, reference, rtol=1e-8, atol=1e-12)


def _logistic_problem():
    """Softmax regression with an L2 penalty, 6 tasks of 16 examples from one
    linear rule: tasks 0-1 with flipped labels, task 2 with noisy inputs, the
    others clean; 24 clean targets."""
    rng = np.random.default_rng(7)
    rule = 1.5 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES))
    x = rng.normal(size=(96 + 24, NUM_FEATURES))
    y = np.argmax(x @ rule + 0.3 * rng.gumbel(size=(120, NUM_CLASSES)), 1)
    ids = np.repeat(np.arange(6), 16)
    y[:32] = (y[:32] + 1) % NUM_CLASSES
    x[32:48] += 2.0 * rng.normal(size=(16, NUM_FEATURES))
    data = make_task_data(x[:96], y[:96], ids, num_tasks=6, num_classes=NUM_CLASSES)
    target = make_target_data(x[96:], y[96:], num_classes=NUM_CLASSES)
    return data, target


def _numpy_softmax_regression(x, y, weights, ridge, steps=12):
    """argmin_θ Σ ω_n CE_n / Σ ω_n + ridge/2 ||θ||² by Newton's method (NumPy);
    θ = (w [F, C], b [C])."""
    xa = np.concatenate([x, np.ones((x.shape[0], 1))], 1)
    onehot = np.eye(NUM_CLASSES)[y]
    theta = np.zeros((xa.shape[1], NUM_CLASSES))
    total = weights.sum()
    for _ in range(steps):
        logits = xa @ theta
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        grad = xa.T @ (weights[:, None] * (probs - onehot)) / total + ridge * theta
        hess = ridge * np.eye(theta.size)
        for n in np.nonzero(weights)[0]:
            block = np.diag(probs[n]) - np.outer(probs[n], probs[n])
            hess += weights[n] * np.kron(np.outer(xa[n], xa[n]), block) / total
        theta -= np.linalg.solve(hess, grad.ravel()).reshape(theta.shape)
    return theta[:-1], theta[-1]


@functools.cache
def _logistic_truth(ridge=0.01):
    """θ* and the exact leave-one-out effects ``[K, T]`` (NumPy Newton refits)."""
    data, target = _logistic_problem()
    x, y = np.asarray(data.inputs), np.asarray(data.labels)
    ids = np.asarray(data.task_ids)
    xt, yt = np.asarray(target.inputs), np.asarray(target.labels)

    def refit(keep):
        return _numpy_softmax_regression(x, y, keep.astype(float), ridge)

    def scores(w, b):
        logits = xt @ w + b
        top = logits.max(1)
        log_norm = top + np.log(np.exp(logits - top[:, None]).sum(1))
        return log_norm - logits[np.arange(yt.size), yt]

    w, b = refit(ids >= 0)
    full = scores(w, b)
    effects = np.stack([scores(*refit(ids != i)) - full
                        for i in range(data.num_tasks)])
    return data, target, {"w": jnp.asarray(w), "b": jnp.asarray(b)}, effects


def test_baselines_at_their_defaults_track_exact_leave_one_out():
    # At their defaults (nothing tuned), influence and TRAK rank the tasks as
    # exact leave-one-out refits do: flipped labels hurt, clean data helps.
    from tasksurrogate_jax.core.metrics import loo_correlation

    data, target, theta, effects = _logistic_truth()
    assert np.all(effects[:2].mean(1) < 0) and np.all(effects[3:].mean(1) > 0)
    for name, scores in [
        ("influence", bl.influence_scores(linear_model, theta, data, target)),
        ("trak", bl.trak_scores(linear_model, theta, data, target)),
    ]:
        corr = loo_correlation(true_effects=effects, predicted_effects=scores)
        # Measured: influence 0.97 per target, 0.94 mean target; TRAK 0.86, 0.89.
        assert float(corr.mean) > 0.75, (name, corr)
        assert float(corr.mean_target) > 0.8, (name, corr)
