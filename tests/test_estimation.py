import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from tasksurrogate_jax import estimation as est
from tasksurrogate_jax import losses, retraining
from tasksurrogate_jax import projection as proj
from tasksurrogate_jax.data import make_target_data, make_task_data, mask_to_weights

RNG = np.random.default_rng(0)
NUM_CLASSES, NUM_FEATURES, NUM_TASKS = 3, 4, 4


def softmax_regression(params, x):
    return x @ params["w"] + params["b"]


def make_problem(n=120, num_targets=7):
    """Overlapping classes (not separable): every subset has a finite optimum."""
    centers = RNG.normal(size=(NUM_CLASSES, NUM_FEATURES))
    labels = RNG.integers(0, NUM_CLASSES, n + num_targets)
    x = centers[labels] + 1.5 * RNG.normal(size=(n + num_targets, NUM_FEATURES))
    data = make_task_data(x[:n], labels[:n], np.arange(n) % NUM_TASKS,
                          num_classes=NUM_CLASSES)
    target = make_target_data(x[n:], labels[n:], num_classes=NUM_CLASSES)
    params = {"w": jnp.asarray(0.1 * RNG.normal(size=(NUM_FEATURES, NUM_CLASSES))),
              "b": jnp.zeros(NUM_CLASSES)}
    return data, target, params


DATA, TARGET, PARAMS = make_problem()
MASKS = jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]], float)


def test_full_space_estimate_equals_real_fine_tuning_for_a_linear_model():
    # Softmax regression is linear in its parameters: the linearization is exact,
    # so the full-space estimate is the converged fine-tuned model's target loss.
    settings = est.SolverSettings("lbfgs", max_iter=500, tol=1e-10)
    estimate = est.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                                   proj_dim=None, ridge=0.0, settings=settings)
    spec = retraining.make_train_spec(apply_fn=softmax_regression,
                                      optimizer=optax.sgd(0.5), num_steps=3000)
    check = est.check_estimation(estimate.scores, MASKS, params=PARAMS, data=DATA,
                                 target=TARGET, spec=spec, key=jax.random.key(0),
                                 progress=False)
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
    base_norm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in PARAMS.values()))
    np.testing.assert_allclose(check.param_shift, estimate.delta_norm / base_norm,
                               rtol=1e-4)


@pytest.mark.parametrize("output_mode", est.OUTPUT_MODES)
def test_projection_to_every_dimension_equals_the_full_space_solution(output_mode):
    # P is square and invertible, so both spaces hold the same minimisers; with
    # ridge 0 they are not unique (softmax is flat along shifts of all logits),
    # but the target losses are.
    num_params = proj.num_parameters(PARAMS)
    settings = est.SolverSettings("lbfgs", max_iter=500, tol=1e-10)
    projected = est.estimate_scores(
        softmax_regression, PARAMS, DATA, TARGET, MASKS, key=jax.random.key(3),
        proj_dim=num_params, ridge=0.0, output_mode=output_mode, settings=settings,
        projection_kind="gaussian")
    full = est.estimate_scores(
        softmax_regression, PARAMS, DATA, TARGET, MASKS, proj_dim=None, ridge=0.0,
        output_mode=output_mode, settings=settings)
    np.testing.assert_allclose(projected.scores, full.scores, rtol=1e-6)


def test_margin_mode_loss_at_theta_star_is_the_cross_entropy():
    logits = softmax_regression(PARAMS, TARGET.inputs)
    margins = jax.vmap(losses.margin)(logits, TARGET.labels)
    np.testing.assert_allclose(
        est.example_losses(margins, TARGET.labels, "margin"),
        optax.softmax_cross_entropy_with_integer_labels(logits, TARGET.labels),
        rtol=1e-12)


@pytest.mark.parametrize("solver", est.SOLVERS)
@pytest.mark.parametrize("output_mode", est.OUTPUT_MODES)
def test_solver_reaches_the_optimum_of_each_subset_problem(solver, output_mode):
    projection = proj.make_projection(jax.random.key(1), 6)
    train = est.linearized_examples(softmax_regression, PARAMS, DATA.inputs,
                                    DATA.labels, projection=projection,
                                    output_mode=output_mode)
    weights = mask_to_weights(MASKS, DATA.task_ids)
    settings = est.SolverSettings(solver, max_iter=200, tol=1e-9)
    solution = est.solve_subsets(train, weights, ridge=1e-2, output_mode=output_mode,
                                 settings=settings)
    for j in range(MASKS.shape[0]):
        def objective(w, j=j):
            return float(est.subset_objective(jnp.asarray(w), weights[j], train, 1e-2,
                                              output_mode))

        def gradient(w, j=j):
            return np.asarray(jax.grad(est.subset_objective)(
                jnp.asarray(w), weights[j], train, 1e-2, output_mode))

        ref = scipy.optimize.minimize(objective, np.zeros(6), jac=gradient,
                                      method="BFGS", options={"gtol": 1e-11})
        np.testing.assert_allclose(solution.w[j], ref.x, rtol=1e-5, atol=1e-7)
        assert objective(np.asarray(solution.w[j])) <= ref.fun + 1e-12


@pytest.mark.parametrize("output_mode", est.OUTPUT_MODES)
def test_closed_form_hessian_equals_jax_hessian(output_mode):
    projection = proj.make_projection(jax.random.key(4), 6)
    train = est.linearized_examples(softmax_regression, PARAMS, DATA.inputs,
                                    DATA.labels, projection=projection,
                                    output_mode=output_mode)
    weights = mask_to_weights(MASKS[2], DATA.task_ids)
    w = jnp.asarray(RNG.normal(size=6))
    ours = est.subset_hessian(w, weights, train, 0.3, output_mode)
    ref = jax.hessian(est.subset_objective)(w, weights, train, 0.3, output_mode)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="proj_dim must be >= 1"):
        est.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=0)
    with pytest.raises(ValueError, match=r"proj_dim must be <= the number of "
                                         r"parameters \(15\)"):
        est.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=16)
    with pytest.raises(ValueError, match="params do not match the model"):
        est.estimate_scores(softmax_regression, {"w": PARAMS["w"][:2]}, DATA, TARGET,
                            MASKS, key=jax.random.key(0), proj_dim=4)
    with pytest.raises(ValueError, match="task columns"):
        est.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS[:, :3],
                            key=jax.random.key(0), proj_dim=4)
    def broken_model(params, x):  # NaN gradients where x[:, 0] < 0
        return softmax_regression(params, x) * jnp.sqrt(x[:, :1])

    rows = np.nonzero(np.asarray(DATA.inputs)[:, 0] < 0)[0][:3].tolist()
    with pytest.raises(ValueError, match=r"non-finite training features .*examples "
                                         + str(rows)[:-1].replace("[", r"\[")):
        est.estimate_scores(broken_model, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=4)
    with pytest.raises(ValueError, match="newton solver needs ridge > 0"):
        est.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=4, ridge=0.0)
    with pytest.raises(ValueError, match="output_mode must be one of"):
        est.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            key=jax.random.key(0), proj_dim=4, output_mode="probs")
    with pytest.raises(ValueError, match="key is required"):
        est.estimate_scores(softmax_regression, PARAMS, DATA, TARGET, MASKS,
                            proj_dim=4)
