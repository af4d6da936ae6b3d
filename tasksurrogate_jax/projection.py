"""Random projections ``P in R^{p x d}`` of parameter pytrees, never built whole.

``P`` maps the p parameters of a pytree to d dimensions. Its rows are generated
block by block: leaf ``l`` (in ``jax.tree_util`` order) and block ``b`` of
``PROJECTION_BLOCK`` consecutive entries of that flattened leaf get the key
``fold_in(fold_in(key, l), b)``. So the matrix depends only on the key, the
kind, ``proj_dim`` and the parameter structure, never on how callers chunk
their examples, and memory stays at one ``[PROJECTION_BLOCK, d]`` block.

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

from tasksurrogate_jax._checks import check_key, check_positive_int

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
    key = check_key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
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


def _block(projection: Projection, leaf_index: int, block_index, dtype):
    """Rows ``[PROJECTION_BLOCK, proj_dim]`` of P for one block of one leaf."""
    key = jax.random.fold_in(jax.random.fold_in(projection.key, leaf_index),
                             block_index)
    shape = (PROJECTION_BLOCK, projection.proj_dim)
    scale = 1.0 / math.sqrt(projection.proj_dim)
    if projection.kind == "gaussian":
        return jax.random.normal(key, shape, dtype) * scale
    return jax.random.rademacher(key, shape, dtype) * scale


def _blocked(flat, size):
    """``[n, size]`` -> ``[num_blocks, n, PROJECTION_BLOCK]`` (zero padded)."""
    num_blocks = -(-size // PROJECTION_BLOCK)
    padded = jnp.pad(flat, ((0, 0), (0, num_blocks * PROJECTION_BLOCK - size)))
    return padded.reshape(flat.shape[0], num_blocks, PROJECTION_BLOCK).swapaxes(0, 1)


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
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("tree has no leaves to project.")
    n = leaves[0].shape[0] if batch_dims else 1
    dtype = jnp.result_type(*leaves)
    out = jnp.zeros((n, projection.proj_dim), dtype)
    for index, leaf in enumerate(leaves):
        flat = leaf.reshape(n, -1).astype(dtype)
        blocks = _blocked(flat, flat.shape[1])

        def step(acc, xs, index=index):
            block_index, block = xs
            return acc + block @ _block(projection, index, block_index, dtype), None

        out, _ = jax.lax.scan(step, out, (jnp.arange(blocks.shape[0]), blocks))
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
    batched = w.ndim == 2
    w2 = w if batched else w[None]
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out = []
    for index, leaf in enumerate(leaves):
        size = math.prod(leaf.shape)
        num_blocks = -(-size // PROJECTION_BLOCK)

        def block_rows(block_index, index=index, dtype=leaf.dtype):
            return w2.astype(dtype) @ _block(projection, index, block_index, dtype).T

        rows = jax.lax.map(block_rows, jnp.arange(num_blocks))  # [nb, n, B]
        flat = rows.swapaxes(0, 1).reshape(w2.shape[0], -1)[:, :size]
        shaped = flat.reshape((w2.shape[0],) + tuple(leaf.shape))
        out.append(shaped if batched else shaped[0])
    return jax.tree_util.tree_unflatten(treedef, out)
