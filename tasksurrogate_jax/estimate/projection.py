"""Random projections ``P in R^{p x d}`` of parameter pytrees, never built whole.

``P`` maps the p parameters of a pytree to d dimensions. The parameters are
ordered as ``jax.flatten_util.ravel_pytree`` orders them (leaves in
``jax.tree_util`` order, each raveled), and the rows of P are generated block
by block: block ``b`` of ``PROJECTION_BLOCK`` consecutive rows gets the key
``fold_in(key, b)``. So the matrix depends only on the key, the kind,
``proj_dim`` and the parameter structure, never on how callers chunk their
examples, and P itself never exists beyond one ``[PROJECTION_BLOCK, d]`` block.

Entries are ``N(0, 1/d)`` (``"gaussian"``) or ``±1/sqrt(d)`` (``"rademacher"``),
so ``E[P P^T] = I`` and inner products are preserved in expectation
(Johnson-Lindenstrauss).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from tasksurrogate_jax._checks import as_typed_key, check_positive_int

PROJECTION_BLOCK = 2048
KINDS = ("rademacher", "gaussian")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["key"],
                   meta_fields=["proj_dim", "kind"])
@dataclasses.dataclass(frozen=True)
class Projection:
    """A random projection to ``proj_dim`` dimensions (a pytree: passes ``jit``).

    Attributes:
      key: PRNG key the blocks are generated from.
      proj_dim: d (static).
      kind: ``"rademacher"`` or ``"gaussian"`` (static).
    """

    key: jax.Array
    proj_dim: int
    kind: str = "rademacher"


def make_projection(key, proj_dim: int, *, kind: str = "rademacher",
                    num_params: int | None = None) -> Projection:
    """Validated :class:`Projection`; ``num_params`` bounds ``proj_dim`` above."""
    key = as_typed_key(key)
    proj_dim = check_positive_int(proj_dim, "proj_dim")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if num_params is not None and proj_dim > num_params:
        raise ValueError(
            f"proj_dim must be <= the number of parameters ({num_params}), got "
            f"{proj_dim}; use the full-space mode instead."
        )
    return Projection(key, proj_dim, kind)


def num_parameters(params) -> int:
    """Total number of scalar entries of a parameter pytree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def random_entries(key, shape, kind: str, dtype) -> jax.Array:
    """Entries of a random projection: standard normal (``kind="gaussian"``)
    or ±1, ``shape``, cast to ``dtype``. Drawn in float32 whatever ``dtype``,
    so that one key gives the same projection with 64-bit JAX on or off (JAX
    draws other numbers for a float64 request)."""
    if kind == "gaussian":
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)
    # jax.random.rademacher draws with a float64 p under 64-bit JAX.
    heads = jax.random.bernoulli(key, jnp.float32(0.5), shape)
    return jnp.where(heads, 1.0, -1.0).astype(dtype)


def _block(projection: Projection, block_index, dtype):
    """Rows ``[PROJECTION_BLOCK, proj_dim]`` of P for one block of parameters."""
    key = jax.random.fold_in(projection.key, block_index)
    shape = (PROJECTION_BLOCK, projection.proj_dim)
    scale = 1.0 / math.sqrt(projection.proj_dim)
    return random_entries(key, shape, projection.kind, dtype) * scale


def ravel_rows(tree, batch_dims: int = 1) -> jax.Array:
    """Leaves raveled and concatenated in ``ravel_pytree`` order: ``[n, p]``
    for a leading ``n`` axis (``batch_dims=1``), ``[1, p]`` without one."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("tree has no leaves to project.")
    n = leaves[0].shape[0] if batch_dims else 1
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([leaf.reshape(n, -1).astype(dtype) for leaf in leaves],
                           axis=1)


@functools.partial(jax.jit, static_argnames="batch_dims")
def project(projection: Projection, tree, *, batch_dims: int = 0) -> jax.Array:
    """``v^T P`` for the parameter-shaped vectors ``v`` in ``tree``.

    Args:
      projection: the projection.
      tree: a pytree like the parameters, each leaf with ``batch_dims`` leading
        batch axes (e.g. per-example gradients with ``batch_dims=1``).
      batch_dims: 0 or 1.

    Returns:
      ``[proj_dim]`` (``batch_dims=0``) or ``[n, proj_dim]``.
    """
    if batch_dims not in (0, 1):
        raise ValueError(f"batch_dims must be 0 or 1, got {batch_dims}.")
    flat = ravel_rows(tree, batch_dims)
    n, size = flat.shape
    num_blocks = -(-size // PROJECTION_BLOCK)
    padded = jnp.pad(flat, ((0, 0), (0, num_blocks * PROJECTION_BLOCK - size)))
    blocks = padded.reshape(n, num_blocks, PROJECTION_BLOCK).swapaxes(0, 1)

    def step(acc, xs):
        block_index, block = xs
        return acc + block @ _block(projection, block_index, flat.dtype), None

    out = jnp.zeros((n, projection.proj_dim), flat.dtype)
    out, _ = jax.lax.scan(step, out, (jnp.arange(num_blocks), blocks))
    return out if batch_dims else out[0]


@jax.jit
def unproject(projection: Projection, w, like) -> object:
    """``P w`` as a pytree shaped like ``like``.

    Args:
      projection: the projection.
      w: ``[proj_dim]`` or ``[n, proj_dim]``.
      like: a parameter pytree (only shapes and dtypes are used).

    Returns:
      A pytree like ``like`` (with a leading ``n`` axis for 2-D ``w``).
    """
    w = jnp.asarray(w)
    if w.shape[-1] != projection.proj_dim or w.ndim not in (1, 2):
        raise ValueError(
            f"w must be [proj_dim] or [n, proj_dim] with proj_dim="
            f"{projection.proj_dim}, got shape {w.shape}."
        )
    w2 = w if w.ndim == 2 else w[None]
    leaves, treedef = jax.tree_util.tree_flatten(like)
    dtype = jnp.result_type(*leaves)
    size = sum(math.prod(leaf.shape) for leaf in leaves)
    num_blocks = -(-size // PROJECTION_BLOCK)
    rows = jax.lax.map(
        lambda b: w2.astype(dtype) @ _block(projection, b, dtype).T,
        jnp.arange(num_blocks))  # [num_blocks, n, PROJECTION_BLOCK]
    flat = rows.swapaxes(0, 1).reshape(w2.shape[0], -1)[:, :size]
    out, offset = [], 0
    for leaf in leaves:
        count = math.prod(leaf.shape)
        piece = flat[:, offset:offset + count].reshape((-1,) + tuple(leaf.shape))
        out.append((piece if w.ndim == 2 else piece[0]).astype(leaf.dtype))
        offset += count
    return jax.tree_util.tree_unflatten(treedef, out)
