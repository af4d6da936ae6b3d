"""Gram matrices between two sets of masks (or any real feature vectors).

Kernels, for rows ``x`` and ``y`` of ``[*, num_features]`` arrays:

- ``"rbf"``:        ``exp(-gamma * ||x - y||^2)``
- ``"laplacian"``:  ``exp(-gamma * ||x - y||_1)``
- ``"polynomial"``: ``(gamma * <x, y> + coef0) ** degree``
- ``"linear"``:     ``<x, y>``

``gamma=None`` means ``1 / num_features``, as in the paper's reference code and
scikit-learn. On 0/1 masks ``||x - y||^2 == ||x - y||_1`` (the Hamming distance),
so the RBF and Laplacian kernels coincide there; they differ on other inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import (
    as_float_array,
    check_finite_scalar,
    check_positive_int,
    is_concrete,
)

KERNELS = ("rbf", "laplacian", "polynomial", "linear")

# Elements of the [block, m, num_features] difference tensor for the L1 kernel.
_L1_BLOCK_ELEMENTS = 2**24


def check_kernel_name(kernel) -> str:
    """Returns ``kernel`` if it names a supported kernel, else raises."""
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a string, got {type(kernel).__name__}.")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    return kernel


def check_gamma(gamma, num_features: int, name: str = "gamma"):
    """Resolves ``gamma=None`` to ``1 / num_features`` and checks ``gamma > 0``."""
    if gamma is None:
        return 1.0 / num_features
    if isinstance(gamma, bool) or isinstance(gamma, str):
        raise TypeError(f"{name} must be a positive number, got {gamma!r}.")
    if is_concrete(gamma):
        values = np.asarray(gamma)
        if not np.issubdtype(values.dtype, np.number):
            raise TypeError(f"{name} must be a positive number, got {gamma!r}.")
        if not bool(np.all(np.isfinite(values) & (values > 0))):
            raise ValueError(f"{name} must be positive and finite, got {gamma!r}.")
    return gamma


def check_degree(degree, name: str = "degree") -> int:
    """Returns ``degree`` (the polynomial kernel's power) if it is an int >= 1."""
    return check_positive_int(degree, name)


def _check_finite_features(x, name):
    """Raises when concrete ``x`` holds NaN or inf: the kernel would be NaN."""
    if not is_concrete(x):
        return
    # NumPy, not jnp: inside a trace (lax.map over a closure) jnp would stage it.
    finite = np.isfinite(np.asarray(x))
    if not finite.all():
        raise ValueError(f"{name} must be finite, found {int((~finite).sum())} "
                         "NaN or infinite values.")


def gram(
    x, y, *, kernel: str = "rbf", gamma=None, degree: int = 3, coef0: float = 1.0,
    block_size: int | None = None,
) -> jax.Array:
    """Kernel matrix between the rows of ``x`` and ``y``.

    Args:
      x: ``[n, num_features]``.
      y: ``[m, num_features]``.
      kernel: one of ``KERNELS``.
      gamma: kernel width (rbf, laplacian) or scale (polynomial); positive.
        ``None`` means ``1 / num_features``.
      degree: polynomial degree.
      coef0: polynomial offset.
      block_size: rows of ``x`` per block; ``None`` picks blocks only where they
        save memory (the Laplacian kernel's ``[n, m, num_features]`` differences).

    Returns:
      ``[n, m]`` Gram matrix in the promoted dtype of ``x`` and ``y``.
    """
    kernel = check_kernel_name(kernel)
    x = as_float_array(x, "x")
    y = as_float_array(y, "y")
    degree = check_degree(degree)
    check_finite_scalar(coef0, "coef0")
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"x and y must be 2-D [rows, num_features], got shapes {x.shape} and "
            f"{y.shape}."
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must have the same number of columns, got {x.shape[1]} and "
            f"{y.shape[1]}."
        )
    _check_finite_features(x, "x")
    _check_finite_features(y, "y")
    dtype = jnp.result_type(x, y)
    x, y = x.astype(dtype), y.astype(dtype)
    gamma = jnp.asarray(check_gamma(gamma, x.shape[1]), dtype)
    if block_size is not None:
        block_size = check_positive_int(block_size, "block_size")

    def rows(x_block):
        terms = _pairwise_terms(x_block, y, kernel)
        return kernel_from_terms(terms, kernel, gamma, degree, coef0)

    return _map_row_blocks(rows, x, _block_size(kernel, y, block_size))


def pairwise_terms(x, y, kernel: str, block_size: int | None = None) -> jax.Array:
    """The part of the kernel between rows of ``x`` ``[n, d]`` and ``y``
    ``[m, d]`` that does not depend on ``gamma``, ``[n, m]``: squared
    Euclidean distances (rbf), L1 distances (laplacian) or inner products
    (polynomial, linear); computed once, they serve several widths through
    :func:`kernel_from_terms`. Blocks of rows as in :func:`gram`; no argument
    checks."""
    return _map_row_blocks(lambda rows: _pairwise_terms(rows, y, kernel), x,
                           _block_size(kernel, y, block_size))


def _block_size(kernel, y, block_size):
    """``block_size``, or where it is ``None`` the rows per block that save
    memory: the Laplacian kernel's ``[block, m, num_features]`` differences
    hold at most ``2**24`` elements (other kernels: unblocked)."""
    if block_size is None and kernel == "laplacian":
        return max(1, _L1_BLOCK_ELEMENTS // max(1, y.shape[0] * y.shape[1]))
    return block_size


def _map_row_blocks(fn, x, block_size):
    """``fn(x)`` for ``fn: [b, d] -> [b, *]``, in blocks of ``block_size``
    rows (``None``, or at least ``len(x)``: all at once)."""
    if block_size is None or block_size >= x.shape[0]:
        return fn(x)
    # lax.map over single rows, vmapped within blocks of `block_size` rows.
    return jax.lax.map(lambda row: fn(row[None])[0], x, batch_size=block_size)


def _pairwise_terms(x, y, kernel):
    if kernel == "rbf":
        sq = (
            jnp.sum(x * x, axis=1)[:, None]
            + jnp.sum(y * y, axis=1)[None, :]
            - 2.0 * x @ y.T
        )
        return jnp.maximum(sq, 0.0)
    if kernel == "laplacian":
        return jnp.sum(jnp.abs(x[:, None, :] - y[None, :, :]), axis=-1)
    return x @ y.T


def kernel_from_terms(terms, kernel: str, gamma, degree: int, coef0) -> jax.Array:
    """The kernel matrix from :func:`pairwise_terms` at width ``gamma``: the
    terms are computed once for several widths. No argument checks."""
    if kernel in ("rbf", "laplacian"):
        return jnp.exp(-gamma * terms)
    if kernel == "polynomial":
        return (gamma * terms + coef0) ** degree
    return terms


def kernel_diagonal(x, kernel: str, gamma, degree: int, coef0) -> jax.Array:
    """``k(x, x)`` for each row of ``x`` ``[n, d]``: ``[n]``, without the
    ``[n, n]`` matrix. No argument checks."""
    if kernel in ("rbf", "laplacian"):
        return jnp.ones(x.shape[0], x.dtype)
    return kernel_from_terms(jnp.sum(x * x, axis=1), kernel, gamma, degree, coef0)
