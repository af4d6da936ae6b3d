import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax.estimate import projection as proj

# float32 by default (the conftest); module data in the default dtype.
TREE = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 1500))),
        "b": jnp.arange(7.0)}


def explicit_matrix(projection, tree):
    flat, unravel = ravel_pytree(tree)
    return np.asarray(jax.vmap(lambda e: proj.project(projection, unravel(e)))(
        jnp.eye(flat.size)))


def assert_product_close(ours, a, b):
    """``ours`` against ``a @ b`` computed in float64: each entry within
    8 eps (of ``ours``' dtype) times ``|a| @ |b|``, the rounding of a sum of
    products (measured: 0.3 to 0.8 of that in float32)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    eps = np.finfo(np.asarray(ours).dtype).eps
    error = np.abs(np.asarray(ours, np.float64) - a @ b)
    bound = 8 * eps * (np.abs(a) @ np.abs(b))
    assert np.all(error <= bound), np.max(error / bound)


@pytest.mark.parametrize("kind", proj.KINDS)
def test_project_and_unproject_are_v_p_and_p_w(kind):
    projection = proj.make_projection(jax.random.key(0), 32, kind=kind)
    matrix = explicit_matrix(projection, TREE)  # [p, d]
    flat, _ = ravel_pytree(TREE)
    assert_product_close(proj.project(projection, TREE), flat, matrix)
    w = np.random.default_rng(1).normal(size=32)
    back, _ = ravel_pytree(proj.unproject(projection, w, TREE))
    assert_product_close(back, matrix, np.asarray(jnp.asarray(w)))  # w as used
    if kind == "rademacher":
        np.testing.assert_allclose(np.abs(matrix), 1 / np.sqrt(32))


def test_same_key_same_matrix_different_key_different_matrix():
    a = explicit_matrix(proj.make_projection(jax.random.key(3), 8), TREE)
    b = explicit_matrix(proj.make_projection(jax.random.key(3), 8), TREE)
    c = explicit_matrix(proj.make_projection(jax.random.key(4), 8), TREE)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_batched_projection_equals_one_by_one_and_under_jit():
    projection = proj.make_projection(jax.random.key(0), 16, kind="gaussian")
    matrix = explicit_matrix(projection, TREE)
    batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x, -x]), TREE)
    together = jax.jit(lambda p, t: proj.project(p, t, batch_dims=1))(projection,
                                                                      batch)
    for i in range(3):
        row = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
        one = proj.project(projection, row)
        # both sum 4507 products in their own order (float32: not bitwise
        # equal): each within the rounding bound of the exact product.
        flat, _ = ravel_pytree(row)
        assert_product_close(together[i], flat, matrix)
        assert_product_close(one, flat, matrix)


def test_inner_products_are_preserved_within_jl_tolerance():
    rng = np.random.default_rng(2)
    u = {"a": jnp.asarray(rng.normal(size=3000))}
    v = {"a": u["a"] * 0.6 + 0.8 * jnp.asarray(rng.normal(size=3000))}
    for kind in proj.KINDS:
        estimates = []
        for seed in range(20):
            projection = proj.make_projection(jax.random.key(seed), 512, kind=kind)
            estimates.append(float(proj.project(projection, u) @
                                   proj.project(projection, v)))
        exact = float(u["a"] @ v["a"])
        scale = float(jnp.linalg.norm(u["a"]) * jnp.linalg.norm(v["a"]))
        # one draw: error ~ scale * sqrt(2 / d); the mean of 20 draws is unbiased.
        assert max(abs(e - exact) for e in estimates) < 4 * scale * np.sqrt(2 / 512)
        assert abs(np.mean(estimates) - exact) < 4 * scale * np.sqrt(2 / 512 / 20)


def test_bad_arguments():
    with pytest.raises(ValueError, match="proj_dim must be >= 1"):
        proj.make_projection(jax.random.key(0), 0)
    with pytest.raises(ValueError, match=r"proj_dim must be <= the number of "
                                         r"parameters \(4507\)"):
        proj.make_projection(jax.random.key(0), 5000,
                             num_params=proj.num_parameters(TREE))
    with pytest.raises(ValueError, match="kind must be one of"):
        proj.make_projection(jax.random.key(0), 4, kind="sparse")
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        proj.make_projection(0, 4)
    with pytest.raises(ValueError, match="w must be"):
        proj.unproject(proj.make_projection(jax.random.key(0), 4), jnp.ones(5), TREE)
