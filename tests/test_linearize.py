import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax.estimate import linearize as lin
from tasksurrogate_jax.estimate import projection as proj

# float32 by default (the conftest); module data in the default dtype.
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(11, 4)))
Y = jnp.asarray(RNG.integers(0, 3, 11))
PARAMS = {"w1": jnp.asarray(RNG.normal(size=(4, 6))), "b1": jnp.zeros(6),
          "w2": jnp.asarray(RNG.normal(size=(6, 3))), "b2": jnp.asarray(RNG.normal(
              size=3))}


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss(params, x, y):
    return -jax.nn.log_softmax(mlp(params, x[None])[0])[y]


def explicit_matrix(projection, tree):
    flat, unravel = ravel_pytree(tree)
    return np.asarray(jax.vmap(lambda e: proj.project(projection, unravel(e)))(
        jnp.eye(flat.size)))


class LinearizeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_per_example_grads_equal_a_python_loop(self):
        grads = self.variant(lambda p, x, y: lin.per_example_grads(
            loss, p, x, y, batch_size=4))(PARAMS, X, Y)
        for i in range(X.shape[0]):
            chex.assert_trees_all_close(
                jax.tree_util.tree_map(lambda g, i=i: g[i], grads),
                # float32: a few ulps of gradients of size ~1 (vmap vs one by one)
                jax.grad(loss)(PARAMS, X[i], Y[i]), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_projected_jacobians_equal_jacfwd_times_explicit_p(self):
        projection = proj.make_projection(jax.random.key(1), 5)
        matrix = explicit_matrix(projection, PARAMS)
        for mode in ("reverse", "forward", "auto"):
            ours = self.variant(lambda p, x, mode=mode: lin.projected_jacobians(
                mlp, p, x, projection=projection, mode=mode, batch_size=3))(PARAMS, X)
            assert ours.shape == (11, 3, 5)
            for i in range(X.shape[0]):
                jac = jax.jacfwd(lambda p, i=i: mlp(p, X[i:i + 1])[0])(PARAMS)
                flat_jac = jnp.concatenate(
                    [jac[k].reshape(3, -1) for k in sorted(PARAMS)], axis=1)
                # float32: sums of 45 products of size ~1 (eps x 45 ~ 5e-6)
                np.testing.assert_allclose(ours[i], flat_jac @ matrix, rtol=1e-5,
                                           atol=1e-5, err_msg=mode)


@pytest.mark.slow
def test_projected_grads_do_not_depend_on_chunking():
    projection = proj.make_projection(jax.random.key(2), 8, kind="gaussian")
    results = [lin.per_example_grads(loss, PARAMS, X, Y, projection=projection,
                                     batch_size=b) for b in (None, 1, 4, 11)]
    for r in results[1:]:
        # float32: chunks reorder sums over 45 parameters (8e-7 at values ~5)
        np.testing.assert_allclose(r, results[0], rtol=1e-5, atol=1e-5)


def test_linearize_is_exact_for_a_model_linear_in_its_parameters():
    def linear_model(params, x):
        return x @ params["w"] + params["b"]

    params = {"w": jnp.asarray(RNG.normal(size=(4, 3))), "b": jnp.zeros(3)}
    delta = {"w": jnp.asarray(RNG.normal(size=(4, 3))), "b": jnp.ones(3)}
    f_lin = lin.linearize(linear_model, params)
    shifted = jax.tree_util.tree_map(jnp.add, params, delta)
    # float32: exact up to rounding, x @ (w + dw) vs x @ w + x @ dw (~5e-7)
    np.testing.assert_allclose(f_lin(delta, X), linear_model(shifted, X), rtol=1e-5,
                               atol=1e-5)


def test_linearize_matches_jvp_and_first_order_for_a_nonlinear_model():
    # float32: a step of 1e-3, not 1e-4: the second-order term (1.7e-5) must
    # stand above the rounding of outputs ~3 (4e-7); |dy| ~ 1e-2.
    delta = jax.tree_util.tree_map(lambda p: 1e-3 * jnp.ones_like(p), PARAMS)
    f_lin = lin.linearize(mlp, PARAMS)
    y0, dy = jax.jvp(lambda p: mlp(p, X), (PARAMS,), (delta,))
    # the same jvp: equal up to a few float32 ulps
    np.testing.assert_allclose(f_lin(delta, X), y0 + dy, rtol=1e-6, atol=1e-6)
    shifted = jax.tree_util.tree_map(jnp.add, PARAMS, delta)
    np.testing.assert_allclose(f_lin(delta, X), mlp(shifted, X), atol=5e-5)


def test_per_task_sums_equal_a_loop_and_drop_padding():
    values = jnp.asarray(RNG.normal(size=(11, 5)))
    task_ids = jnp.asarray([0, 1, 2, 0, 1, 2, 0, 1, -1, 3, -1])  # padding
    sums = lin.per_task_sums(values, task_ids, 3)
    for k in range(3):
        # float32: three-term sums, in any order (a few ulps)
        np.testing.assert_allclose(sums[k], values[task_ids == k].sum(0), rtol=1e-6,
                                   atol=1e-6)


def test_bad_arguments():
    projection = proj.make_projection(jax.random.key(0), 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        lin.projected_jacobians(mlp, PARAMS, X, projection=projection, mode="both")
    with pytest.raises(ValueError, match=r"must return \[batch, num_outputs\]"):
        lin.projected_jacobians(lambda p, x: mlp(p, x)[:, 0], PARAMS, X,
                                projection=projection)
