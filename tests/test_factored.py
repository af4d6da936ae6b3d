"""Kernel-factored projected Jacobians (tasksurrogate_jax.estimate.factored).

References: per-example Jacobians from ``jax.jacrev`` on the raveled
parameters, projected by an explicit dense ``P`` built from the factors with
``jnp.kron`` (never through the module's own ``factored_unproject``), in
the default dtype: float32 (tests/conftest.py), float64 with
``TASKSURROGATE_TEST_X64=1``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from tasksurrogate_jax.estimate import factored as fa
from tasksurrogate_jax.estimate.features import Linearized, linear_model
from tasksurrogate_jax.losses import margin
from tasksurrogate_jax.workloads.digits_data import DigitsDataConfig, DigitsMLP
from tasksurrogate_jax.workloads.supervised import nnx_model_functions

# float32: the features and their references each sum up to a few hundred
# products in their own order; errors seen up to 1e-6 of the largest entry
# (8 eps), so 1e-5 of it (a wrong layout or factor is off by O(1)).
REL = 1e-5


def assert_close(actual, expected):
    """Entries within ``REL`` times the largest ``|expected|``."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=0,
                               atol=REL * np.max(np.abs(expected)))


def _default_float(tree):
    """The tree in the default float dtype (float32 unless x64 is on)."""
    return jax.tree.map(lambda a: jnp.asarray(a, float), tree)


@functools.cache
def _digits_mlp():
    """DigitsMLP 64-12-12-10 through SupervisedWorkload's NNX adapter (built
    once per process)."""
    apply_fn, init_fn = nnx_model_functions(
        lambda rngs: DigitsMLP(DigitsDataConfig(hidden=12, depth=2), rngs=rngs))
    return apply_fn, _default_float(init_fn(jax.random.key(0)))


@functools.partial(jax.jit, static_argnums=0)
def _jacobians(apply_fn, params, inputs):
    """``[n, C, p]`` per-example Jacobians by jacrev on the raveled params."""
    flat, unravel = ravel_pytree(params)
    return jax.vmap(lambda x: jax.jacrev(
        lambda f: apply_fn(unravel(f), x[None])[0])(flat))(inputs)


@jax.jit
def _kron_matrix(projection, params):
    """Dense ``P [p, d]`` in ravel order: ``P_in ⊗ P_out`` per layer (jnp.kron)."""
    leaves = jax.tree.leaves(params)
    rows = [jnp.zeros((leaf.size, projection.proj_dim)) for leaf in leaves]
    factors = fa.projection_factors(projection, jnp.result_type(float))
    offset = 0
    for layer, (p_in, p_out) in zip(projection.structure.layers, factors,
                                    strict=True):
        size = p_in.shape[1] * p_out.shape[1]
        block = jnp.kron(p_in, p_out)  # [(a(+1)) o, d_in d_out], row (i, j)
        a, o = layer.fan_in, layer.fan_out
        kernel = block[:a * o]
        if layer.transposed:  # the leaf is stored [o, a]: rows (j, i)
            kernel = kernel.reshape(a, o, size).swapaxes(0, 1).reshape(a * o, size)
        rows[layer.kernel] = rows[layer.kernel].at[:, offset:offset + size].set(kernel)
        if layer.bias is not None:
            rows[layer.bias] = rows[layer.bias].at[:, offset:offset + size].set(
                block[a * o:])
        offset += size
    return jnp.concatenate(rows, axis=0)


def test_nnx_features_equal_dense_kronecker_projection():
    apply_fn, params = _digits_mlp()
    inputs = jax.random.normal(jax.random.key(1), (5, 64))
    # Mixed sides: projected, and kept whole (head output 10 <= 16, input 13 <= 13).
    projection = fa.make_factored_projection(
        jax.random.key(2), apply_fn, params, inputs, dims=((13, 16), (6, 3), (7, 2)))
    structure = projection.structure
    assert [layer.kernel_path for layer in structure.layers] == [
        "['head']['kernel'].value", "['layers'][0]['kernel'].value",
        "['layers'][1]['kernel'].value"]
    assert all(layer.bias is not None for layer in structure.layers)
    assert structure.num_params == ravel_pytree(params)[0].size
    assert projection.identity[0] == (True, True)
    assert projection.proj_dim == 13 * 10 + 6 * 3 + 7 * 2

    outputs, features = fa.factored_jacobians(apply_fn, params, inputs,
                                              projection=projection, batch_size=2)
    expected = _jacobians(apply_fn, params, inputs) @ _kron_matrix(projection, params)
    assert features.shape == (5, 10, projection.proj_dim)
    assert_close(features, expected)
    assert_close(outputs, apply_fn(params, inputs))
    # The module's own dense P agrees with the Kronecker one.
    assert_close(fa.factored_matrix(projection, params),
                 _kron_matrix(projection, params))


def _plain_model():
    """Plain JAX: positions, a transposed kernel, a kernel used twice, jit."""
    keys = jax.random.split(jax.random.key(3), 5)
    params = {
        "w1": jax.random.normal(keys[0], (4, 6)) / 2,
        "b1": jax.random.normal(keys[1], (6,)) / 2,
        "shared": jax.random.normal(keys[2], (6, 6)) / 3,
        "head_t": jax.random.normal(keys[3], (3, 6)) / 2,  # stored [o, a]
        "head_b": jax.random.normal(keys[4], (3,)),
    }

    @jax.jit
    def block(h, w):
        return jnp.tanh(h @ w)

    def apply_fn(p, x):  # x [b, T, 4]
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = block(block(h, p["shared"]), p["shared"])
        return h.mean(axis=1) @ p["head_t"].T + p["head_b"]

    return apply_fn, _default_float(params)


def test_plain_jax_positions_transposed_and_shared_kernels():
    apply_fn, params = _plain_model()
    inputs = jax.random.normal(jax.random.key(4), (3, 5, 4))
    projection = fa.make_factored_projection(jax.random.key(5), apply_fn, params,
                                             inputs, dims=3, kind="gaussian")
    layers = {layer.kernel_path: layer for layer in projection.structure.layers}
    assert layers["['head_t']"].transposed and layers["['head_t']"].bias is not None
    assert len(layers["['shared']"].taps) == 2 and layers["['shared']"].bias is None
    _, features = fa.factored_jacobians(apply_fn, params, inputs,
                                        projection=projection)
    jac = _jacobians(apply_fn, params, inputs)
    assert_close(features, jac @ _kron_matrix(projection, params))
    # The unprojected factors give the exact kernel J J^T without J.
    _, factors = fa.layer_factors(apply_fn, params, inputs,
                                  structure=projection.structure)
    paths = [layer.kernel_path for layer in projection.structure.layers]
    shared = factors[paths.index("['shared']")]
    assert shared[0].shape == (3, 10, 6)  # two taps x 5 positions
    jac = jac.reshape(-1, jac.shape[-1])
    assert_close(sum(fa.exact_kernels(factors)), jac @ jac.T)


def test_linen_dense_under_checkpoint():
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jax.checkpoint(lambda h: nn.relu(h))(nn.Dense(7)(x))
            x = nn.Dense(5, use_bias=False)(x)
            return nn.Dense(3)(jnp.tanh(x))

    model = Model()
    inputs = jax.random.normal(jax.random.key(30), (3, 6))
    params = _default_float(model.init(jax.random.key(31), inputs))
    apply_fn = model.apply
    projection = fa.make_factored_projection(jax.random.key(32), apply_fn, params,
                                             inputs, dims=3)
    assert [layer.bias is not None for layer in projection.structure.layers] == [
        True, False, True]
    _, features = fa.factored_jacobians(apply_fn, params, inputs,
                                        projection=projection)
    expected = _jacobians(apply_fn, params, inputs) @ _kron_matrix(projection, params)
    assert_close(features, expected)


def test_unproject_maps_w_to_the_parameter_update():
    apply_fn, params = _digits_mlp()
    inputs = jax.random.normal(jax.random.key(6), (4, 64))
    projection = fa.make_factored_projection(jax.random.key(7), apply_fn, params,
                                             inputs, dims=5)
    _, features = fa.factored_jacobians(apply_fn, params, inputs,
                                        projection=projection)
    w = jax.random.normal(jax.random.key(8), (3, projection.proj_dim))
    delta = fa.factored_unproject(projection, w, params)
    flat_delta = jax.vmap(lambda tree: ravel_pytree(tree)[0])(delta)
    assert_close(flat_delta, w @ _kron_matrix(projection, params).T)
    # J Δθ = Φ w, and the Gram-matrix norms are ||Δθ||.
    jac = _jacobians(apply_fn, params, inputs)
    assert_close(jnp.einsum("ncp,mp->mnc", jac, flat_delta),
                 jnp.einsum("ncd,md->mnc", features, w))
    # float32: norms of ~1000 entries, two ways (seen 1.3e-7 apart)
    np.testing.assert_allclose(fa.factored_update_norms(projection, w),
                               jnp.linalg.norm(flat_delta, axis=1), rtol=1e-5)
    np.testing.assert_allclose(fa.factored_update_norms(projection, w[0]),
                               jnp.linalg.norm(flat_delta[0]), rtol=1e-5)
    with pytest.raises(ValueError, match="proj_dim"):
        fa.factored_unproject(projection, w[:, :-1], params)


def test_linearized_examples_logits_and_margin():
    apply_fn, params = _digits_mlp()
    inputs = jax.random.normal(jax.random.key(9), (6, 64))
    labels = jnp.arange(6) % 10
    projection = fa.make_factored_projection(jax.random.key(10), apply_fn, params,
                                             inputs, dims=4)
    dense = _kron_matrix(projection, params)
    logits = fa.factored_linearized_examples(apply_fn, params, inputs, labels,
                                             projection=projection)
    assert isinstance(logits, Linearized)
    assert logits.outputs.shape == (6, 10)
    assert logits.features.shape == (6, 10, projection.proj_dim)
    margins = fa.factored_linearized_examples(apply_fn, params, inputs, labels,
                                              projection=projection,
                                              output_mode="margin")
    flat, unravel = ravel_pytree(params)
    grads = jax.jit(jax.vmap(lambda x, y: jax.grad(
        lambda f: margin(apply_fn(unravel(f), x[None])[0], y))(flat)))(inputs, labels)
    assert_close(margins.features, grads @ dense)
    assert_close(
        margins.outputs, jax.vmap(margin)(apply_fn(params, inputs), labels))
    # The estimator's linear model reads the stacked inputs as it does for
    # features.linearized_examples.
    w = jnp.ones(projection.proj_dim) * 1e-3
    stacked = jnp.concatenate([logits.outputs[..., None], logits.features], -1)
    assert_close(linear_model(w, stacked), logits.outputs + logits.features @ w)


def test_whole_sides_give_the_exact_kernel():
    apply_fn, params = _digits_mlp()
    inputs = jax.random.normal(jax.random.key(11), (4, 64))
    projection = fa.make_factored_projection(jax.random.key(12), apply_fn, params,
                                             inputs, dims=100)
    assert all(pair == (True, True) for pair in projection.identity)
    assert projection.proj_dim == ravel_pytree(params)[0].size
    _, features = fa.factored_jacobians(apply_fn, params, inputs,
                                        projection=projection)
    jac = _jacobians(apply_fn, params, inputs).reshape(-1, projection.proj_dim)
    phi = features.reshape(-1, projection.proj_dim)
    assert_close(phi @ phi.T, jac @ jac.T)


class _NormedMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 7, rngs=rngs)
        self.norm = nnx.LayerNorm(7, rngs=rngs)
        self.out = nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.norm(jnp.tanh(self.hidden(x))))


def test_other_parameters_raise_or_freeze():
    apply_fn, init_fn = nnx_model_functions(_NormedMLP)
    params = _default_float(init_fn(jax.random.key(13)))
    inputs = jax.random.normal(jax.random.key(14), (3, 5))
    with pytest.raises(ValueError, match=r"\['norm'\]\['scale'\]"):
        fa.find_dense_layers(apply_fn, params, inputs)
    projection = fa.make_factored_projection(jax.random.key(15), apply_fn, params,
                                             inputs, dims=3, other="freeze")
    assert set(projection.structure.frozen) == {"['norm']['bias'].value",
                                                "['norm']['scale'].value"}
    _, features = fa.factored_jacobians(apply_fn, params, inputs,
                                        projection=projection)
    dense = _kron_matrix(projection, params)  # zero rows for the frozen leaves
    assert_close(features, _jacobians(apply_fn, params, inputs) @ dense)
    with pytest.raises(ValueError, match="other"):
        fa.find_dense_layers(apply_fn, params, inputs, other="ignore")


def test_mismatched_inputs_and_params_raise():
    apply_fn, params = _digits_mlp()
    inputs = jnp.zeros((2, 64))
    projection = fa.make_factored_projection(jax.random.key(0), apply_fn, params,
                                             inputs, dims=2)
    with pytest.raises(ValueError, match="inputs must be"):
        fa.factored_jacobians(apply_fn, params, jnp.zeros((2, 63)),
                              projection=projection)
    other = jax.tree.map(lambda a: a[..., :-1], params)
    with pytest.raises(ValueError, match="params do not match"):
        fa.factored_jacobians(apply_fn, other, inputs, projection=projection)
    with pytest.raises(ValueError, match="pair per layer"):
        fa.make_factored_projection(jax.random.key(0), apply_fn, params, inputs,
                                    dims=((2, 2),))


# -- statistics of the projection: E[P P^T] = I ------------------------------------

_WIDTHS = (6, 9, 8, 4)  # a small tanh MLP, plain JAX, with its intermediates


def _stat_model():
    keys = jax.random.split(jax.random.key(20), 2 * (len(_WIDTHS) - 1))
    params = []
    for i, (a, o) in enumerate(zip(_WIDTHS[:-1], _WIDTHS[1:], strict=False)):
        params.append({"w": jax.random.normal(keys[2 * i], (a, o)) / np.sqrt(a),
                       "b": 0.3 * jax.random.normal(keys[2 * i + 1], (o,))})
    return _default_float(params)


def _stat_apply(params, x, shifts=None):
    h = x
    for i, layer in enumerate(params):
        z = h @ layer["w"] + layer["b"]
        if shifts is not None:
            z = z + shifts[i]
        h = jnp.tanh(z) if i < len(params) - 1 else z
    return h


@jax.jit
@functools.partial(jax.vmap, in_axes=(None, 0))
def _layer_factors(params, x):
    """Per layer: x̃ ``[n, a + 1]`` and ``g = ∂f/∂z`` ``[n, C, o]``, from
    this file's own forward pass and jacrev (vmapped over examples)."""
    inputs, h = [], x
    for i, layer in enumerate(params):
        inputs.append(jnp.concatenate([h, jnp.ones(1)]))
        z = h @ layer["w"] + layer["b"]
        h = jnp.tanh(z) if i < len(params) - 1 else z
    shifts = [jnp.zeros(layer["b"].shape) for layer in params]
    grads = jax.jacrev(lambda s: _stat_apply(params, x[None], [v[None] for v in s])[0]
                       )(shifts)
    return inputs, grads


def _kernel_variance(params, inputs, k):
    """Exact ``E||Φ Φ^T − J J^T||_F²`` for Gaussian sides of dimension ``k``.

    For one layer and a pair of (example, class) rows, ``A = <x̃P_in, x̃'P_in>``
    has mean ``α = <x̃, x̃'>`` and variance ``(|x̃|²|x̃'|² + α²)/k``, ``B`` the
    same with ``g``; ``A``, ``B`` are independent, so ``Var(AB) = (α² + V_A)
    (β² + V_B) − α²β²``; layers are independent, so variances add.
    """
    total, kernel = 0.0, 0.0
    all_inputs, all_grads = _layer_factors(params, inputs)
    for layer in range(len(params)):
        xs, gs = all_inputs[layer], all_grads[layer]             # [n, a+1], [n, C, o]
        gs = gs.reshape(-1, gs.shape[-1])                        # [n C, o]
        xs = jnp.repeat(xs, gs.shape[0] // xs.shape[0], axis=0)  # [n C, a+1]
        alpha, beta = xs @ xs.T, gs @ gs.T
        xx = jnp.outer(jnp.sum(xs ** 2, 1), jnp.sum(xs ** 2, 1))
        gg = jnp.outer(jnp.sum(gs ** 2, 1), jnp.sum(gs ** 2, 1))
        var_a, var_b = (xx + alpha ** 2) / k, (gg + beta ** 2) / k
        total += jnp.sum((alpha ** 2 + var_a) * (beta ** 2 + var_b)
                         - alpha ** 2 * beta ** 2)
        kernel = kernel + alpha * beta
    return float(total), kernel


def _stat_kernels(params, inputs, k, keys):
    structure = fa.find_dense_layers(_stat_apply, params, inputs)

    def one(key):
        projection = fa.make_factored_projection(
            key, structure=structure, dims=k, kind="gaussian", keep_small_sides=False)
        _, phi = fa.factored_jacobians(_stat_apply, params, inputs,
                                       projection=projection)
        phi = phi.reshape(-1, projection.proj_dim)
        return phi @ phi.T

    return jax.lax.map(one, keys)


def test_kernel_is_unbiased_with_the_predicted_variance():
    """Over R = 400 independent projections with k = 6 per side: the mean
    kernel is ``J J^T`` within its standard error, and the mean squared error
    is the exact Gaussian variance (so entries are N(0, 1/k): E[P P^T] = I)."""
    params = _stat_model()
    inputs = jax.random.normal(jax.random.key(21), (4, _WIDTHS[0]))
    k, draws = 6, 400
    expected_sq, kernel = _kernel_variance(params, inputs, k)
    jac = _jacobians(_stat_apply, params, inputs)
    jac = jac.reshape(-1, jac.shape[-1])
    assert_close(kernel, jac @ jac.T)  # the reference
    kernels = _stat_kernels(params, inputs, k, jax.random.split(jax.random.key(22),
                                                                draws))
    sq_errors = jnp.sum((kernels - kernel) ** 2, axis=(1, 2))
    # Mean of R squared errors: its relative standard error, estimated from
    # the draws, is a few percent; allow 4 of them.
    ratio = float(jnp.mean(sq_errors)) / expected_sq
    rel_se = float(jnp.std(sq_errors) / jnp.mean(sq_errors)) / np.sqrt(draws)
    assert abs(ratio - 1) < 4 * rel_se, (ratio, rel_se)
    # E||mean − K||² = E_sq / R; a scale error c ≠ 1 adds (c − 1)²||K||².
    bias_sq = float(jnp.sum((kernels.mean(0) - kernel) ** 2))
    assert bias_sq < 4 * expected_sq / draws, (bias_sq, expected_sq / draws)


def test_large_d_kernel_approximates_jjt():
    """One projection with k = 256 per side (d = 3 · 65,536) on the small MLP:
    Frobenius error within 3 predicted standard deviations σ (``P(err > 3σ)
    ≤ 1/9`` by Markov, far less in practice: over seeds err/σ is 0.95-1.13),
    and σ is about 10% of ``||J J^T||``."""
    params = _stat_model()
    inputs = jax.random.normal(jax.random.key(23), (3, _WIDTHS[0]))
    k = 256
    expected_sq, kernel = _kernel_variance(params, inputs, k)
    (approx,) = _stat_kernels(params, inputs, k, jax.random.key(24)[None])
    error = float(jnp.linalg.norm(approx - kernel))
    sigma = np.sqrt(expected_sq)
    # The module's error model is this file's formula.
    structure = fa.find_dense_layers(_stat_apply, params, inputs)
    _, factors = fa.layer_factors(_stat_apply, params, inputs, structure=structure)
    dims = ((k, k),) * len(structure.layers)
    np.testing.assert_allclose(
        fa.predicted_kernel_error(structure, factors, dims, keep_small_sides=False),
        sigma / float(jnp.linalg.norm(kernel)), rtol=1e-5)  # float32 (seen 3e-7)
    norm = float(jnp.linalg.norm(kernel))
    assert sigma / norm < 0.12  # the predicted relative error at this d
    assert error < 3 * sigma, (error, sigma)


def test_allocated_dims_fit_the_budget_and_predict_less_error():
    params = _stat_model()
    inputs = jax.random.normal(jax.random.key(25), (6, _WIDTHS[0]))
    structure = fa.find_dense_layers(_stat_apply, params, inputs)
    _, factors = fa.layer_factors(_stat_apply, params, inputs, structure=structure)
    uniform = fa.make_factored_projection(jax.random.key(0), structure=structure,
                                          dims=3)
    dims = fa.allocate_dims(structure, factors, uniform.proj_dim)
    allocated = fa.make_factored_projection(jax.random.key(0), structure=structure,
                                            dims=dims)
    assert allocated.proj_dim <= uniform.proj_dim
    assert (fa.predicted_kernel_error(structure, factors, dims)
            <= fa.predicted_kernel_error(structure, factors, uniform.dims))
    # Enough dimensions for every side whole: the exact kernel, error 0.
    full = sum(layer.num_params for layer in structure.layers)
    dims = fa.allocate_dims(structure, factors, full)
    assert dims == tuple((layer.input_rows, layer.fan_out)
                         for layer in structure.layers)
    assert fa.predicted_kernel_error(structure, factors, dims) == 0.0
