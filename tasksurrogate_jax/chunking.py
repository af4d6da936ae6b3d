"""Chunks of the subset (or example) axis: one compiled shape for every chunk.

Work over many rows runs as a loop over fixed-size chunks; the last chunk is
padded with copies of its last row so that one compiled program serves all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax import sharding
from tasksurrogate_jax._checks import check_positive_int


def chunked_vmap(fn, xs, batch_size):
    """``vmap(fn)`` over the leading axis of ``xs`` in chunks of ``batch_size``."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if batch_size is None or batch_size >= n:
        return jax.vmap(fn)(xs)
    batch_size = check_positive_int(batch_size, "batch_size")
    return jax.lax.map(fn, xs, batch_size=batch_size)


def pad_rows(rows, size: int):
    """``rows`` ``[n, ...]`` (NumPy or JAX) padded to ``size`` rows with copies
    of its last row, so that every chunk of a loop has one compiled shape."""
    missing = size - rows.shape[0]
    if missing <= 0:
        return rows
    xp = np if isinstance(rows, np.ndarray) else jnp
    return xp.concatenate([rows, xp.repeat(rows[-1:], missing, axis=0)])


def map_padded_chunks(fn, rows, chunk_size: int | None, *, mesh=None):
    """``fn`` over chunks of ``chunk_size`` rows (the last one padded).

    Args:
      fn: ``[chunk_size, ...] -> pytree`` of arrays with a leading chunk axis.
      rows: ``[n, ...]``.
      chunk_size: rows per call; ``None`` = all ``n`` at once.
      mesh: a ``jax.sharding.Mesh`` with a ``"subsets"`` axis, or ``None``. With
        a mesh, chunks are rounded up to a multiple of its ``"subsets"`` length,
        each chunk is split over it (:func:`sharding.shard_subsets`) before
        ``fn`` and its outputs are gathered (:func:`sharding.to_host`; every
        process must call this when the mesh spans several).

    Returns:
      The outputs concatenated along the leading axis and cut to ``n`` rows.
    """
    n = rows.shape[0]
    size = n if chunk_size is None else min(
        check_positive_int(chunk_size, "chunk_size"), n)
    if mesh is None:
        outs = [fn(pad_rows(rows[start:start + size], size))
                for start in range(0, n, size)]
    else:
        size = sharding.round_up(size, mesh)
        outs = [sharding.to_host(fn(sharding.shard_subsets(
                    pad_rows(rows[start:start + size], size), mesh)))
                for start in range(0, n, size)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[:n], *outs)


__all__ = ["chunked_vmap", "map_padded_chunks", "pad_rows"]
