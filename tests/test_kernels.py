import chex
import jax
import numpy as np
import pytest
from sklearn.metrics.pairwise import pairwise_kernels

from tasksurrogate_jax.core import kernels

RNG = np.random.default_rng(0)
X = RNG.integers(0, 2, (13, 7)).astype(float)
Y = RNG.integers(0, 2, (9, 7)).astype(float)
PARAMS = {"rbf": {"gamma": 0.3}, "laplacian": {"gamma": 0.2},
          "polynomial": {"gamma": 0.5, "degree": 3, "coef0": 1.0}, "linear": {}}


@pytest.mark.float64  # sklearn's float64 kernels at 1e-12
class GramTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_sklearn_for_every_kernel(self):
        for name in kernels.KERNELS:
            params = PARAMS[name]
            ours = self.variant(lambda x, y, n=name, p=params: kernels.gram(
                x, y, kernel=n, **p))(X, Y)
            ref = pairwise_kernels(X, Y, metric=name, **params)
            np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("name", kernels.KERNELS)
def test_blocked_equals_unblocked(name):
    x = RNG.random((23, 5))
    y = RNG.random((11, 5))
    full = kernels.gram(x, y, kernel=name)
    for block in (1, 4, 7, 50):
        np.testing.assert_allclose(kernels.gram(x, y, kernel=name, block_size=block),
                                   full, rtol=1e-6, atol=1e-6)  # float32 eps x a few


def test_default_gamma_is_one_over_num_features():
    np.testing.assert_allclose(kernels.gram(X, Y), kernels.gram(X, Y, gamma=1 / 7))


def test_rbf_equals_laplacian_on_binary_masks():
    np.testing.assert_allclose(kernels.gram(X, Y, kernel="rbf", gamma=0.4),
                               kernels.gram(X, Y, kernel="laplacian", gamma=0.4))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"kernel": "cosine"}, ValueError, "kernel must be one of"),
        ({"kernel": 3}, TypeError, "kernel must be a string"),
        ({"gamma": 0.0}, ValueError, "gamma must be positive"),
        ({"gamma": -1.0}, ValueError, "gamma must be positive"),
        ({"block_size": 0}, ValueError, "block_size must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        kernels.gram(X, Y, **kwargs)


def test_mismatched_feature_columns():
    with pytest.raises(ValueError, match="same number of columns"):
        kernels.gram(X, Y[:, :3])
    with pytest.raises(ValueError, match="same number of columns"):
        jax.jit(kernels.gram)(X, Y[:, :3])


@pytest.mark.parametrize("name", kernels.KERNELS)
def test_kernel_from_shared_terms_and_diagonal_equal_gram(name):
    """The gamma-free terms serve every width; the diagonal needs no matrix."""
    x, y = RNG.random((6, 5)), RNG.random((4, 5))
    p = {"degree": 3, "coef0": 1.0}
    terms = kernels.pairwise_terms(x, y, name)
    for gamma in (0.1, 0.7):
        np.testing.assert_allclose(
            kernels.kernel_from_terms(terms, name, gamma, p["degree"], p["coef0"]),
            # Another order of the same float32 operations (eps 1.2e-7, the
            # cubic polynomial of values ~ 3 amplifies it ~ 10x).
            kernels.gram(x, y, kernel=name, gamma=gamma, **p), rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(
            kernels.kernel_diagonal(x, name, gamma, p["degree"], p["coef0"]),
            np.diag(kernels.gram(x, x, kernel=name, gamma=gamma, **p)), rtol=2e-6,
            atol=1e-6)
