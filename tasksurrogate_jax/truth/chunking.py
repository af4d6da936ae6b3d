"""Chunks of the subset (or example) axis: one compiled shape for every chunk.

Work over many rows runs as a loop over fixed-size chunks; the last chunk is
padded with copies of its last row so that one compiled program serves all.

:func:`map_chunks` is the one loop of the expensive maps over subsets
(retraining, RL fine-tuning): it stores each finished chunk and resumes from
a store, splits chunks over a mesh, lets only process 0 write when the mesh
spans processes, shows progress, and dispatches the next chunk before it
copies the last one to the host, so the copy overlaps the computation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.truth import sharding
from tasksurrogate_jax.truth.store import ChunkStore


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
        ``fn``, and its outputs are gathered to the host
        (:func:`sharding.to_host`; every process must call this when the mesh
        spans several) after the next chunk is dispatched.

    Returns:
      The outputs concatenated along the leading axis and cut to ``n`` rows:
      device arrays without a mesh, NumPy arrays with one.
    """
    n = rows.shape[0]
    size = n if chunk_size is None else min(
        check_positive_int(chunk_size, "chunk_size"), n)
    if mesh is None:
        outs = [fn(pad_rows(rows[start:start + size], size))
                for start in range(0, n, size)]
        return jax.tree.map(lambda *xs: jnp.concatenate(xs)[:n], *outs)
    size = sharding.round_up(size, mesh)
    outs, in_flight = [], None
    for start in range(0, n, size):
        out = fn(sharding.shard_subsets(pad_rows(rows[start:start + size], size),
                                        mesh))
        if in_flight is not None:  # fetched while ``out`` computes
            outs.append(sharding.to_host(in_flight))
        in_flight = out
    outs.append(sharding.to_host(in_flight))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outs)


def map_chunks(compute: Callable[[np.ndarray], Mapping], num_rows: int, *,
               chunk_size: int, store: ChunkStore | None = None,
               first_chunk: int = 0, mesh=None,
               progress: str | None = None) -> dict[str, np.ndarray]:
    """``compute`` over chunks of ``chunk_size`` rows, stored and resumable.

    Chunk ``c`` holds rows ``c * chunk_size`` to ``(c + 1) * chunk_size - 1``
    (the last one fewer). Each finished chunk is saved to ``store`` as chunk
    ``first_chunk + c`` (its real rows only) and read back instead of
    computed when the store has it. Chunk ``c + 1`` is dispatched before
    chunk ``c`` is copied to the host (JAX dispatches asynchronously), so at
    most two chunks' outputs are alive at once; an interruption (an exception
    from ``compute`` included) loses at most the chunk in flight.

    Args:
      compute: ``compute(rows) -> {name: [len(rows), ...] array}`` for the
        ``int64`` row indices ``rows`` of one chunk, padded with copies of
        the last to ``chunk_size`` rounded up to the mesh's ``"subsets"``
        length (one compiled shape); it should dispatch without blocking.
        Outputs spanning processes are gathered (:func:`sharding.to_host`).
      num_rows: rows in all.
      chunk_size: rows per chunk.
      store: where chunks are kept (:func:`open_store`), or ``None``.
      first_chunk: the store index of chunk 0 (several maps in one store).
      mesh: the ``jax.sharding.Mesh`` ``compute`` splits chunks over, or
        ``None``. With several processes, every process calls this; process 0
        alone writes the store and shows progress.
      progress: a progress bar's description, or ``None`` for none.

    Returns:
      ``{name: [num_rows, ...] numpy array}``, allocated once.
    """
    num_rows = check_positive_int(num_rows, "num_rows")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    compiled_size = chunk_size if mesh is None else sharding.round_up(chunk_size, mesh)
    num_chunks = -(-num_rows // chunk_size)
    done = _finished_chunks(store, first_chunk + num_chunks, mesh)[first_chunk:]
    writer = not _multiprocess(mesh) or jax.process_index() == 0
    chunks = range(num_chunks)
    if progress and writer:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=progress, unit="chunk")
    collected = _Collected(num_rows)

    def finish(index, rows, outputs):
        host = sharding.to_host(dict(outputs))  # blocks until the chunk is done
        arrays = {"rows": rows, **{name: np.asarray(values)[:rows.size]
                                   for name, values in host.items()}}
        if store is not None and writer:
            store.save_chunk(first_chunk + index, arrays)
        collected.add(arrays)

    in_flight = None
    for c in chunks:
        if done[c]:
            collected.add(_load_chunk(store, first_chunk + c))
            continue
        rows = np.arange(c * chunk_size, min((c + 1) * chunk_size, num_rows))
        try:
            outputs = compute(pad_rows(rows, compiled_size))
        except BaseException:  # keep the chunk already computed, then stop
            if in_flight is not None:
                finish(*in_flight)
            raise
        if in_flight is not None:
            finish(*in_flight)
        in_flight = (c, rows, outputs)
    if in_flight is not None:
        finish(*in_flight)
    return collected.arrays


def open_store(store_dir, config: Mapping, *, mesh=None) -> ChunkStore:
    """The run's :class:`ChunkStore`. With several processes, process 0 opens
    (creates) it first; the others then open the same folder, which must be on
    a file system they share."""
    if not _multiprocess(mesh):
        return ChunkStore(store_dir, config)
    from jax.experimental import multihost_utils

    store, error = None, None
    if jax.process_index() == 0:
        try:
            store = ChunkStore(store_dir, config)
        except (TypeError, ValueError) as err:
            error = err
    opened = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if error is not None:
        raise error
    if not int(opened):
        raise ValueError(f"process 0 could not open the store folder "
                         f"{str(store_dir)!r}; see its error.")
    return store if store is not None else ChunkStore(store_dir, config)


def _finished_chunks(store, num_chunks, mesh) -> np.ndarray:
    """``[num_chunks]`` bool: the chunks to read back, as process 0 sees them."""
    done = np.zeros(num_chunks, bool)
    if store is None:
        return done
    done[[c for c in store.finished_chunks() if c < num_chunks]] = True
    if _multiprocess(mesh):
        from jax.experimental import multihost_utils

        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return done


def _load_chunk(store, index) -> dict:
    """Chunk ``index`` of ``store``, which process 0 found finished."""
    if not store.has_chunk(index):
        raise FileNotFoundError(
            f"chunk {index} of the store folder {str(store.folder)!r} is finished "
            "on process 0 but missing here: with several processes, store_dir "
            "must be on a file system every process shares.")
    return store.load_chunk(index)


def _multiprocess(mesh) -> bool:
    return mesh is not None and sharding.is_multiprocess(mesh)


class _Collected:
    """The rows of finished chunks, written into arrays allocated once: the
    results never sit in memory twice (no list of chunks to concatenate, and
    ``jnp.asarray`` of the host arrays does not copy on CPU)."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, chunk: dict) -> None:
        rows = chunk["rows"]
        for name, values in chunk.items():
            if name == "rows":
                continue
            if name not in self.arrays:
                self.arrays[name] = np.empty((self.num_rows,) + values.shape[1:],
                                             values.dtype)
            self.arrays[name][rows] = values


__all__ = ["chunked_vmap", "map_chunks", "map_padded_chunks", "open_store",
           "pad_rows"]
