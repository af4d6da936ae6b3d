import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from tasksurrogate_jax import losses
from tasksurrogate_jax.data import make_target_data, make_task_data, mask_to_weights
from tasksurrogate_jax.estimate import (
    convex,
    estimation,
    estimation_check,
    features,
    finetune,
)
from tasksurrogate_jax.estimate import projection as proj
from tasksurrogate_jax.truth import retraining, sharding

RNG = np.random.default_rng(0)
NUM_CLASSES, NUM_FEATURES, NUM_TASKS = 3, 4, 4


def softmax_regression(params, x):
    return x @ params["w"] + params["b"]


def make_problem(n=120, num_targets=7):
    """Overlapping classes (not separable): every subset has a finite optimum.
    The same draw each call, in JAX's default float type at the call."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(NUM_CLASSES, NUM_FEATURES))
    labels = rng.integers(0, NUM_CLASSES, n + num_targets)
    x = centers[labels] + 1.5 * rng.normal(size=(n + num_targets, NUM_FEATURES))
    data = make_task_data(x[:n], labels[:n], np.arange(n) % NUM_TASKS,
                          num_classes=NUM_CLASSES)
    target = make_target_data(x[n:], labels[n:], num_classes=NUM_CLASSES)
    params = {"w": jnp.asarray(0.1 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES))),
              "b": jnp.zeros(NUM_CLASSES)}
    return data, target, params


MASK_ROWS = [[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]]
# float32, what users run (the conftest).
DATA, TARGET, PARAMS = make_problem()
MASKS = jnp.asarray(MASK_ROWS, float)
# The same problem in float64, for the tests marked float64: references at
# tight tolerances (SciPy's BFGS, L-BFGS to a gradient norm of 1e-8).
with jax.enable_x64(True):
    DATA64, TARGET64, PARAMS64 = make_problem()
    MASKS64 = jnp.asarray(MASK_ROWS, float)


@pytest.mark.float64  # L-BFGS to a gradient norm of 1e-8
@pytest.mark.slow
def test_full_space_estimate_equals_real_fine_tuning_for_a_linear_model():
    # Softmax regression is linear in its parameters: the linearization is exact,
    # so the full-space estimate is the converged fine-tuned model's target loss.
    settings = convex.SolverSettings("lbfgs", max_iter=500, tol=1e-10)
    estimate = convex.estimate_scores(softmax_regression, PARAMS64, DATA64, TARGET64,
                                   MASKS64, proj_dim=None, ridge=0.0,
                                   settings=settings)
    spec = retraining.make_train_spec(apply_fn=softmax_regression,
                                      optimizer=optax.sgd(0.5), num_steps=3000)
    check = estimation_check.check_estimation(
        estimate.scores, MASKS64, params=PARAMS64, data=DATA64, target=TARGET64,
        spec=spec, key=jax.random.key(0))
    np.testing.assert_allclose(estimate.scores, check.exact, rtol=1e-5)
    assert float(estimate.grad_norm.max()) < 1e-8
    assert float(check.relative_error.max()) < 1e-5
    assert float(check.column_relative_error.max()) < 1e-5
    np.testing.assert_allclose(check.spearman, 1.0)
    # Linear in its parameters: the first-order model at the fine-tuned update
    # is the fine-tuned model.
    np.testing.assert_allclose(check.first_order, check.exact, rtol=1e-9, atol=1e-12)
    # The fine-tuned update has the norm the estimator reports (one minimiser:
    # ridge 0 leaves the shift of all logits free, plain GD from θ* does not
    # move along it, and neither does L-BFGS from zero).
    base_norm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in PARAMS64.values()))
    np.testing.assert_allclose(check.param_shift, estimate.delta_norm / base_norm,
                               rtol=1e-4)


@pytest.mark.parametrize("optimizer, batch_size", [
    (optax.sgd(0.3), None), (optax.adam(0.05), 8),
    (optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.2, momentum=0.9)), 16)])
@pytest.mark.parametrize("points", [1, 3])
def test_linearized_finetuning_in_full_space_is_fine_tuning_for_a_linear_model(
        optimizer, batch_size, points):
    # Linear in its parameters: the linearized model is the model (at every
    # linearization point), so the same program (optimizer, weight decay on θ,
    # mini-batch draws) gives the same trajectory, whatever the optimizer.
    spec = retraining.make_train_spec(apply_fn=softmax_regression,
                                      optimizer=optimizer, num_steps=40,
                                      batch_size=batch_size)
    key = jax.random.key(5)
    estimate = finetune.linearized_finetune_scores(
        softmax_regression, PARAMS, DATA, TARGET, MASKS, finetune=spec, key=None,
        batch_key=key, proj_dim=None, batch_orders=2, linearization_points=points)
    tuned = retraining.retrain(MASKS, data=DATA, target=TARGET, spec=spec, key=key,
                               init_params=PARAMS, replicates=2, return_params=True,
                               progress=False)
    # float32: the same program, its operations in another order.
    np.testing.assert_allclose(estimate.scores, tuned.losses.mean(0), rtol=2e-5)
    shift = np.sqrt(sum(
        np.sum((np.asarray(v[0]) - np.asarray(PARAMS[k])).reshape(len(MASKS), -1) ** 2,
               axis=1) for k, v in tuned.params.items()))  # replicate 0
    np.testing.assert_allclose(estimate.delta_norm, shift, rtol=2e-5)
    assert float(np.min(shift)) > 1e-3  # the models did move


@pytest.mark.slow
@pytest.mark.parametrize("output_mode", features.OUTPUT_MODES)
def test_projected_linearized_finetuning_is_gradient_descent_on_the_features(
        output_mode):
    # Reference: full-batch gradient descent on w, written out in numpy with the
    # features from an explicit Jacobian and an explicit P.
    d, lr, steps = 5, 0.4, 25
    key = jax.random.key(6)
    projection = proj.make_projection(key, d, num_params=proj.num_parameters(PARAMS))
    columns = proj.unproject(projection, jnp.eye(d), PARAMS)  # P as d pytrees
    p_matrix = np.stack([np.concatenate([np.ravel(columns[k][j]) for k in ("b", "w")])
                         for j in range(d)], axis=1)  # [p, d], ravel_pytree order

    def flat_model(theta, x):
        return softmax_regression({"b": theta[:NUM_CLASSES],
                                   "w": theta[NUM_CLASSES:].reshape(NUM_FEATURES,
                                                                    NUM_CLASSES)}, x)

    theta0 = np.concatenate([np.ravel(PARAMS["b"]), np.ravel(PARAMS["w"])])

    def outputs_and_features(x, y):
        def out(theta):
            logits = flat_model(theta, x)
            if output_mode == "logits":
                return logits
            return jax.vmap(losses.margin)(logits, y)

        jac = np.asarray(jax.jacobian(out)(jnp.asarray(theta0)))  # [n, (C,) p]
        return np.asarray(out(jnp.asarray(theta0))), jac @ p_matrix

    f_train, phi_train = outputs_and_features(DATA.inputs, DATA.labels)
    f_target, phi_target = outputs_and_features(TARGET.inputs, TARGET.labels)
    onehot = np.eye(NUM_CLASSES)[np.asarray(DATA.labels)]

    def reference(mask):
        omega = np.asarray(mask)[np.asarray(DATA.task_ids)]
        omega = omega / omega.sum()
        w = np.zeros(d)
        for _ in range(steps):
            z = f_train + phi_train @ w
            if output_mode == "logits":
                probs = np.exp(z - z.max(1, keepdims=True))
                probs /= probs.sum(1, keepdims=True)
                grad = np.einsum("n,nc,ncd->d", omega, probs - onehot, phi_train)
            else:  # d softplus(-m) / dm = -sigmoid(-m)
                grad = phi_train.T @ (omega * -1 / (1 + np.exp(z)))
            w = w - lr * grad
        z = f_target + phi_target @ w
        if output_mode == "logits":
            return (np.log(np.exp(z).sum(1)) -
                    z[np.arange(len(z)), np.asarray(TARGET.labels)])
        return np.log1p(np.exp(-z))

    spec = retraining.make_train_spec(apply_fn=softmax_regression,
                                      optimizer=optax.sgd(lr), num_steps=steps)
    estimate = finetune.linearized_finetune_scores(
        softmax_regression, PARAMS, DATA, TARGET, MASKS, finetune=spec, key=key,
        batch_key=jax.random.key(0), proj_dim=d, output_mode=output_mode)
    expected = np.stack([reference(mask) for mask in MASKS])
    # float32 features and program against a float64 NumPy program on them.
    np.testing.assert_allclose(estimate.scores, expected, rtol=2e-5, atol=1e-6)
    # The program did move the scores away from θ*'s.
    at_theta = features.example_losses(jnp.asarray(f_target), TARGET.labels,
                                       output_mode)
    assert float(np.abs(expected - np.asarray(at_theta)).max()) > 1e-3


def test_difference_form_anchors_the_estimates():
    estimated = jnp.asarray([[1.0, 2.0], [1.5, 2.5], [0.5, 3.0]])
    anchored = estimation.difference_form(estimated, estimated[0],
                                          jnp.asarray([0.2, 0.4]))
    np.testing.assert_allclose(anchored[0], [0.2, 0.4])
    np.testing.assert_allclose(anchored[1:] - anchored[0], estimated[1:] - estimated[0])
    with pytest.raises(ValueError, match=r"measured_all must have shape \(2,\)"):
        estimation.difference_form(estimated, estimated[0], jnp.zeros(3))


@pytest.mark.slow
def test_auto_ridge_reproduces_the_reference_update_norm():
    key = jax.random.key(2)
    full = jnp.ones((1, NUM_TASKS))
    target_norm = 0.05
    estimate = convex.estimate_scores(
        softmax_regression, PARAMS, DATA, TARGET, jnp.concatenate([full, MASKS]),
        key=key, proj_dim=8, ridge="auto", reference_update_norm=target_norm)
    np.testing.assert_allclose(estimate.delta_norm[0], target_norm, rtol=1e-4)
    # The calibrated ridge gives the same solution as passing it explicitly.
    again = convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                                key=key, proj_dim=8, ridge=estimate.ridge)
    np.testing.assert_allclose(again.scores, estimate.scores[1:], rtol=1e-5)
    with pytest.raises(ValueError, match="reference_update_norm > 0"):
        convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=key, proj_dim=8, ridge="auto")
    with pytest.raises(ValueError, match="ridge must be a number >= 0 or 'auto'"):
        convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=key, proj_dim=8, ridge="large")


def test_estimation_settings_validate():
    with pytest.raises(ValueError, match="method must be one of"):
        estimation.EstimationSettings(method="exact")
    with pytest.raises(ValueError, match="output_mode must be one of"):
        estimation.EstimationSettings(output_mode="probs")
    with pytest.raises(ValueError, match="ridge='auto' needs a projection"):
        estimation.EstimationSettings(method="solve", proj_dim=None)
    full = estimation.EstimationSettings(method="finetune", proj_dim=None)
    assert full.proj_dim is None
    assert estimation.EstimationSettings(method="solve").needs_reference_run
    assert not estimation.EstimationSettings().needs_reference_run


def test_full_space_solve_compiles_once_per_model_and_shape():
    # The chunk program is built at module level with the model static: a second
    # call with new parameters and ridge reuses it instead of tracing again.
    settings = convex.SolverSettings("lbfgs", max_iter=20, tol=1e-6)
    first = convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                                proj_dim=None, ridge=0.1, settings=settings)
    compiled = convex._full_space_chunk._cache_size()
    shifted = jax.tree.map(lambda leaf: leaf + 0.01, PARAMS)
    second = convex.estimate_scores(softmax_regression, shifted, DATA, TARGET, MASKS,
                                 proj_dim=None, ridge=0.2, settings=settings)
    assert convex._full_space_chunk._cache_size() == compiled
    assert not np.allclose(first.scores, second.scores)


@pytest.mark.float64  # ridge 0: L-BFGS to 1e-10 in a flat direction
@pytest.mark.slow
@pytest.mark.parametrize("output_mode", features.OUTPUT_MODES)
def test_projection_to_every_dimension_equals_the_full_space_solution(output_mode):
    # P is square and invertible, so both spaces hold the same minimisers; with
    # ridge 0 they are not unique (softmax is flat along shifts of all logits),
    # but the target losses are.
    num_params = proj.num_parameters(PARAMS64)
    settings = convex.SolverSettings("lbfgs", max_iter=500, tol=1e-10)
    projected = convex.estimate_scores(
        softmax_regression, PARAMS64, DATA64, TARGET64, MASKS64, key=jax.random.key(3),
        proj_dim=num_params, ridge=0.0, output_mode=output_mode, settings=settings,
        projection_kind="gaussian")
    full = convex.estimate_scores(
        softmax_regression, PARAMS64, DATA64, TARGET64, MASKS64, proj_dim=None,
        ridge=0.0, output_mode=output_mode, settings=settings)
    np.testing.assert_allclose(projected.scores, full.scores, rtol=1e-6)


def test_margin_mode_loss_at_theta_star_is_the_cross_entropy():
    logits = softmax_regression(PARAMS, TARGET.inputs)
    margins = jax.vmap(losses.margin)(logits, TARGET.labels)
    np.testing.assert_allclose(
        features.example_losses(margins, TARGET.labels, "margin"),
        optax.softmax_cross_entropy_with_integer_labels(logits, TARGET.labels),
        rtol=1e-5, atol=1e-6)


@pytest.mark.float64  # SciPy's float64 BFGS at gtol 1e-11
@pytest.mark.slow
@pytest.mark.parametrize("solver", convex.SOLVERS)
@pytest.mark.parametrize("output_mode", features.OUTPUT_MODES)
def test_solver_reaches_the_optimum_of_each_subset_problem(solver, output_mode):
    projection = proj.make_projection(jax.random.key(1), 6)
    train = features.linearized_examples(softmax_regression, PARAMS64, DATA64.inputs,
                                    DATA64.labels, projection=projection,
                                    output_mode=output_mode)
    weights = mask_to_weights(MASKS64, DATA64.task_ids)
    settings = convex.SolverSettings(solver, max_iter=200, tol=1e-9)
    solution = convex.solve_subsets(train, weights, ridge=1e-2, output_mode=output_mode,
                                 settings=settings)
    for j in range(MASKS64.shape[0]):
        def objective(w, j=j):
            return float(convex.subset_objective(jnp.asarray(w), weights[j], train,
                                                 1e-2, output_mode))

        def gradient(w, j=j):
            return np.asarray(jax.grad(convex.subset_objective)(
                jnp.asarray(w), weights[j], train, 1e-2, output_mode))

        ref = scipy.optimize.minimize(objective, np.zeros(6), jac=gradient,
                                      method="BFGS", options={"gtol": 1e-11})
        np.testing.assert_allclose(solution.w[j], ref.x, rtol=1e-5, atol=1e-7)
        assert objective(np.asarray(solution.w[j])) <= ref.fun + 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("output_mode", features.OUTPUT_MODES)
def test_closed_form_hessian_equals_jax_hessian(output_mode):
    projection = proj.make_projection(jax.random.key(4), 6)
    train = features.linearized_examples(softmax_regression, PARAMS, DATA.inputs,
                                    DATA.labels, projection=projection,
                                    output_mode=output_mode)
    weights = mask_to_weights(MASKS[2], DATA.task_ids)
    w = jnp.asarray(RNG.normal(size=6))
    ours = convex.subset_hessian(w, weights, train, 0.3, output_mode)
    ref = jax.hessian(convex.subset_objective)(w, weights, train, 0.3, output_mode)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="proj_dim must be >= 1"):
        convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=0)
    with pytest.raises(ValueError, match=r"proj_dim must be <= the number of "
                                         r"parameters \(15\)"):
        convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=16)
    with pytest.raises(ValueError, match="params do not match the model"):
        convex.estimate_scores(softmax_regression, {"w": PARAMS["w"][:2]}, DATA, TARGET,
                            MASKS, key=jax.random.key(0), proj_dim=4)
    with pytest.raises(ValueError, match="task columns"):
        convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS[:, :3],
                            key=jax.random.key(0), proj_dim=4)
    def broken_model(params, x):  # NaN gradients where x[:, 0] < 0
        return softmax_regression(params, x) * jnp.sqrt(x[:, :1])

    rows = np.nonzero(np.asarray(DATA.inputs)[:, 0] < 0)[0][:3].tolist()
    with pytest.raises(ValueError, match=r"non-finite training features .*examples "
                                         + str(rows)[:-1].replace("[", r"\[")):
        convex.estimate_scores(broken_model, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=4)
    with pytest.raises(ValueError, match="newton solver needs ridge > 0"):
        convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=4, ridge=0.0)
    with pytest.raises(ValueError, match="output_mode must be one of"):
        convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=4, output_mode="probs")
    with pytest.raises(ValueError, match="key is required"):
        convex.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            proj_dim=4)


# ---------------------------------------------------------------------------
# Adam and the Adam preconditioner.

ADAM_B1, ADAM_LR = 0.8, 0.05


def _flat(tree) -> np.ndarray:
    """Softmax-regression parameters as one vector in ``ravel_pytree`` order
    (dict keys sorted: ``b``, then ``w``)."""
    return np.concatenate([np.ravel(tree[k]) for k in ("b", "w")])


def _rows(tree, i):
    """Row ``i`` of a pytree with a leading axis."""
    return jax.tree.map(lambda leaf: leaf[i], tree)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_updates_bitwise_as_optax_adam(weight_decay):
    reference = optax.adamw(0.05, b1=0.8, b2=0.95, eps=1e-6,
                            weight_decay=weight_decay)
    ours = finetune.Adam(0.05, b1=0.8, b2=0.95, eps=1e-6, weight_decay=weight_decay)
    params, states = [PARAMS, PARAMS], [reference.init(PARAMS), ours.init(PARAMS)]
    for _ in range(5):
        grads = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=p.shape)), PARAMS)
        for i, optimizer in enumerate((reference, ours)):
            updates, states[i] = optimizer.update(grads, states[i], params[i])
            params[i] = optax.apply_updates(params[i], updates)
    jax.tree.map(np.testing.assert_array_equal, params[0], params[1])
    assert ours.momentum() is finetune.Adam(0.05, b1=0.8).momentum()  # compiled once


def test_unit_preconditioner_is_the_plain_momentum_program(monkeypatch):
    # v ≡ 1 and ε = 0 give S = 1: the features are J P, and the program is
    # momentum descent (Adam's β1 and learning rate) on w.
    monkeypatch.setattr(finetune, "gradient_second_moment",
                        lambda apply_fn, params, *a, **k: jax.tree.map(
                            jnp.ones_like, params))
    kw = dict(key=jax.random.key(3), batch_key=jax.random.key(4), proj_dim=6)

    def spec(optimizer):
        return retraining.make_train_spec(apply_fn=softmax_regression,
                                          optimizer=optimizer, num_steps=20,
                                          batch_size=16)

    adam = finetune.Adam(ADAM_LR, b1=ADAM_B1, eps=0.0)
    preconditioned = finetune.linearized_finetune_scores(
        softmax_regression, PARAMS, DATA, TARGET, MASKS, finetune=spec(adam),
        preconditioner="adam", **kw)
    momentum = optax.chain(optax.ema(ADAM_B1, debias=True), optax.sgd(ADAM_LR))
    plain = finetune.linearized_finetune_scores(
        softmax_regression, PARAMS, DATA, TARGET, MASKS, finetune=spec(momentum),
        **kw)
    np.testing.assert_allclose(preconditioned.scores, plain.scores, rtol=1e-5)
    np.testing.assert_allclose(preconditioned.delta_norm, plain.delta_norm,
                               rtol=1e-5)
    assert float(np.min(plain.delta_norm)) > 1e-3  # the program did move


def _mlp(params, x):
    return jnp.tanh(x @ params["hidden"]) @ params["out"]


@pytest.mark.parametrize("output_mode", features.OUTPUT_MODES)
def test_scaled_features_are_jvps_along_scaled_projection_columns(output_mode):
    keys = jax.random.split(jax.random.key(7), 3)
    params = {"hidden": jax.random.normal(keys[0], (NUM_FEATURES, 5)),
              "out": jax.random.normal(keys[1], (5, NUM_CLASSES))}
    scale = jax.tree.map(lambda p: jnp.exp(jax.random.normal(keys[2], p.shape)),
                         params)
    d = 4
    projection = proj.make_projection(jax.random.key(8), d)
    phi = features.linearized_examples(
        _mlp, params, DATA.inputs, DATA.labels, projection=projection,
        output_mode=output_mode, scale=scale).features
    columns = proj.unproject(projection, jnp.eye(d), params)  # P e_j, [d, ...]

    def outputs(p):
        logits = _mlp(p, DATA.inputs)
        return logits if output_mode == "logits" else jax.vmap(losses.margin)(
            logits, DATA.labels)

    jvps = [jax.jvp(outputs, (params,), (jax.tree.map(
        jnp.multiply, scale, _rows(columns, j)),))[1] for j in range(d)]
    np.testing.assert_allclose(phi, np.stack(jvps, axis=-1), rtol=1e-5,
                               atol=1e-5)


def test_gradient_second_moment_is_that_of_a_mini_batch_without_replacement():
    # Six examples and two padding rows: every batch of 2 of the 6, averaged.
    x = RNG.normal(size=(8, NUM_FEATURES))
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    data = make_task_data(x, labels, np.array([0, 0, 1, 1, 2, 2, -1, -1]),
                          num_classes=NUM_CLASSES, num_tasks=3)
    per_example = jax.vmap(jax.grad(
        lambda p, xi, yi: losses.softmax_cross_entropy(
            softmax_regression(p, xi[None]), yi[None])[0]),
        in_axes=(None, 0, 0))(PARAMS, data.inputs[:6], data.labels[:6])
    grads = np.stack([_flat(_rows(per_example, i)) for i in range(6)])
    expected = np.mean([grads[list(batch)].mean(0) ** 2
                        for batch in itertools.combinations(range(6), 2)], axis=0)
    for chunk_size in (3, None):
        moment = finetune.gradient_second_moment(softmax_regression, PARAMS, data,
                                            batch_size=2, chunk_size=chunk_size)
        # float32: entries near 0 need an absolute tolerance on the scale.
        np.testing.assert_allclose(_flat(moment), expected, rtol=1e-5,
                                   atol=1e-6 * np.abs(expected).max())
    full = finetune.gradient_second_moment(softmax_regression, PARAMS, data,
                                      batch_size=None)
    np.testing.assert_allclose(_flat(full), grads.mean(0) ** 2, rtol=1e-5,
                               atol=1e-6 * np.abs(grads.mean(0) ** 2).max())


@pytest.mark.slow
def test_adam_preconditioner_is_momentum_descent_with_fixed_second_moment():
    # Softmax regression is linear in its parameters, so the linearized model is
    # the model: write the full-batch program out by hand in θ-space.
    d, steps, eps = 6, 30, 1e-3
    # Halved at steps 10 and 20: float32 rates (optax's), exact under jit too.
    schedule = optax.piecewise_constant_schedule(ADAM_LR, {10: 0.5, 20: 0.5})
    adam = finetune.Adam(schedule, b1=ADAM_B1, eps=eps)
    key = jax.random.key(9)
    projection = proj.make_projection(key, d, num_params=proj.num_parameters(PARAMS))
    columns = proj.unproject(projection, jnp.eye(d), PARAMS)  # P e_j, [d, ...]
    p_matrix = np.stack([_flat(_rows(columns, j)) for j in range(d)], axis=1)

    def unflat(theta):
        return {"b": theta[:NUM_CLASSES],
                "w": theta[NUM_CLASSES:].reshape(NUM_FEATURES, NUM_CLASSES)}

    def loss(theta, x, y, omega):
        per_example = losses.softmax_cross_entropy(softmax_regression(unflat(theta), x),
                                                   y)
        return jnp.sum(omega * per_example) / jnp.sum(omega)

    theta0 = jnp.asarray(_flat(PARAMS))
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, None))(
        theta0, DATA.inputs[:, None], DATA.labels[:, None], jnp.ones(1))
    scale = (np.sqrt(np.mean(np.asarray(per_example), 0) ** 2) + eps) ** -0.5

    def reference(mask):
        omega = jnp.asarray(np.asarray(mask)[np.asarray(DATA.task_ids)])
        w, m = np.zeros(d), np.zeros(d)
        for t in range(1, steps + 1):
            theta = theta0 + scale * (p_matrix @ w)
            grad_w = p_matrix.T @ (scale * np.asarray(jax.grad(loss)(
                theta, DATA.inputs, DATA.labels, omega)))
            m = ADAM_B1 * m + (1 - ADAM_B1) * grad_w
            rate = float(schedule(jnp.int32(t - 1)))  # optax's int32 step count
            w = w - rate * m / (1 - ADAM_B1 ** t)
        delta = scale * (p_matrix @ w)
        scores = losses.softmax_cross_entropy(
            softmax_regression(unflat(theta0 + delta), TARGET.inputs), TARGET.labels)
        return np.asarray(scores), np.linalg.norm(delta)

    spec = retraining.make_train_spec(apply_fn=softmax_regression, optimizer=adam,
                                      num_steps=steps)
    estimate = finetune.linearized_finetune_scores(
        softmax_regression, PARAMS, DATA, TARGET, MASKS, finetune=spec, key=key,
        batch_key=jax.random.key(0), proj_dim=d, preconditioner="adam")
    expected = [reference(mask) for mask in MASKS]
    np.testing.assert_allclose(estimate.scores, np.stack([e[0] for e in expected]),
                               rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(estimate.delta_norm, [e[1] for e in expected],
                               rtol=2e-5)
    assert min(e[1] for e in expected) > 1e-3  # the program did move


def test_bad_preconditioner_settings():
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        estimation.EstimationSettings(preconditioner="sgd")
    with pytest.raises(ValueError, match=r"preconditioner='adam' needs a "
                                         r"projection \(proj_dim\)"):
        estimation.EstimationSettings(preconditioner="adam", proj_dim=None)
    with pytest.raises(ValueError, match="preconditioner='adam' needs "
                                         "method='finetune'"):
        estimation.EstimationSettings(method="solve", preconditioner="adam")
    for kwargs, name in (({"learning_rate": -1.0}, "learning_rate"),
                         ({"learning_rate": "fast"}, "learning_rate"),
                         ({"b1": 1.0}, "b1"), ({"b2": -0.1}, "b2"),
                         ({"eps": -1e-8}, "eps"), ({"weight_decay": -1.0},
                                                   "weight_decay")):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            finetune.Adam(**{"learning_rate": 0.1, **kwargs})

    def run(optimizer):
        spec = retraining.make_train_spec(apply_fn=softmax_regression,
                                          optimizer=optimizer, num_steps=2)
        finetune.linearized_finetune_scores(
            softmax_regression, PARAMS, DATA, TARGET, MASKS, finetune=spec,
            key=jax.random.key(0), batch_key=jax.random.key(0), proj_dim=4,
            preconditioner="adam")

    with pytest.raises(ValueError, match=r"finetune\.optimizer.*got "
                                         "GradientTransformationExtraArgs"):
        run(optax.adam(0.1))
    with pytest.raises(ValueError, match=r"finetune\.optimizer has weight_decay"):
        run(finetune.Adam(0.1, weight_decay=0.1))
    with pytest.raises(ValueError, match="scale must be a pytree shaped like "
                                         "params"):
        features.linearized_examples(
            softmax_regression, PARAMS, DATA.inputs, DATA.labels,
            projection=proj.make_projection(jax.random.key(0), 4),
            output_mode="logits", scale={"w": PARAMS["w"]})


MLP_PARAMS = {"hidden": jnp.asarray(0.5 * RNG.normal(size=(NUM_FEATURES, 16)),
                                    jnp.float32),
              "out": jnp.asarray(0.5 * RNG.normal(size=(16, NUM_CLASSES)),
                                 jnp.float32)}
MLP_SPEC = retraining.make_train_spec(apply_fn=_mlp, optimizer=optax.sgd(0.5),
                                      num_steps=60, batch_size=16)


def test_one_linearization_point_is_the_theta_star_linearization():
    # The segmented program at one point (θ*) is the full-space linearized
    # fine-tuning: same batches, same model, same read-out.
    key = jax.random.key(4)
    plain = finetune.linearized_finetune_scores(
        _mlp, MLP_PARAMS, DATA, TARGET, MASKS, finetune=MLP_SPEC, key=None,
        batch_key=key, proj_dim=None, batch_orders=2)
    segmented = finetune._segmented_finetune_scores(
        _mlp, MLP_PARAMS, DATA, TARGET, MASKS, finetune=MLP_SPEC, batch_key=key,
        batch_orders=2, points=1, chunk_size=4, mesh=sharding.check_mesh(None))
    np.testing.assert_allclose(segmented.scores, plain.scores, rtol=2e-5)
    np.testing.assert_allclose(segmented.delta_norm, plain.delta_norm, rtol=2e-5)


def test_relinearization_along_the_path_tracks_a_nonlinear_fine_tuning():
    # The MLP moves far from θ* (SGD at 0.5): linearized at θ* only, the
    # estimate drifts from the real fine-tuning; re-linearized at 6 points of
    # the full set's path, the subsets near the full set (all tasks, one
    # dropped) stay close to it (relative errors 0.25 and 0.32 at θ*, 0.06
    # and 0.13 along the path). Half the data (the last row) moves away from
    # the path, and is not helped.
    key = jax.random.key(6)
    tuned = retraining.retrain(MASKS, data=DATA, target=TARGET, spec=MLP_SPEC,
                               key=key, init_params=MLP_PARAMS, replicates=1,
                               progress=False).losses[0]

    def error(points):
        estimate = finetune.linearized_finetune_scores(
            _mlp, MLP_PARAMS, DATA, TARGET, MASKS, finetune=MLP_SPEC, key=None,
            batch_key=key, proj_dim=None, batch_orders=1,
            linearization_points=points)
        return np.median(np.abs(np.asarray(estimate.scores) - tuned)
                         / np.asarray(tuned), axis=1)[:2]  # per subset

    at_theta_star, along_path = error(1), error(6)
    assert at_theta_star.min() > 0.2  # the linearization at θ* does not hold
    np.testing.assert_array_less(along_path, 0.5 * at_theta_star)


def test_bad_linearization_points():
    with pytest.raises(ValueError, match="linearization_points"):
        estimation.EstimationSettings(linearization_points=0)
    with pytest.raises(ValueError, match="full space"):
        estimation.EstimationSettings(linearization_points=2, proj_dim=64)
    with pytest.raises(ValueError, match="full space"):
        estimation.EstimationSettings(linearization_points=2, method="solve")
    with pytest.raises(ValueError, match="proj_dim=None"):
        finetune.linearized_finetune_scores(
            _mlp, MLP_PARAMS, DATA, TARGET, MASKS, finetune=MLP_SPEC,
            key=jax.random.key(0), batch_key=jax.random.key(0), proj_dim=8,
            linearization_points=2)
