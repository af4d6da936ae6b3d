"""The chunked map over subsets: padding, the store, resuming, interruption."""

import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax.truth.chunking import map_chunks, open_store

TABLE = jnp.asarray(np.random.default_rng(0).normal(size=(11, 3)), jnp.float32)


class Counting:
    """``compute`` of rows -> their table rows and squares; records calls and
    can fail on a given call."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, rows):
        self.calls.append(rows.copy())
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt("stopped")
        values = TABLE[jnp.asarray(rows)]
        return {"values": values, "squares": (values ** 2).sum(1)}


def test_map_chunks_pads_the_last_chunk_and_cuts_it():
    compute = Counting()
    out = map_chunks(compute, 11, chunk_size=4)
    np.testing.assert_array_equal(out["values"], np.asarray(TABLE))
    np.testing.assert_allclose(out["squares"], (np.asarray(TABLE) ** 2).sum(1),
                               rtol=1e-6)
    # One compiled shape: every call gets 4 rows, the last padded with its last.
    assert [list(rows) for rows in compute.calls] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 10]]
    assert isinstance(out["values"], np.ndarray)


def test_a_stored_map_resumes_and_recomputes_only_missing_chunks(tmp_path):
    store = open_store(tmp_path, {"what": "table"})
    first = map_chunks(Counting(), 11, chunk_size=4, store=store)
    assert store.finished_chunks() == [0, 1, 2]
    again = Counting(fail_on=1)  # any call would fail: all read back
    reread = map_chunks(again, 11, chunk_size=4, store=store)
    assert again.calls == []
    for name in first:
        np.testing.assert_array_equal(reread[name], first[name])
    store.chunk_path(1).unlink()
    partial = Counting()
    map_chunks(partial, 11, chunk_size=4, store=store)
    assert [list(rows) for rows in partial.calls] == [[4, 5, 6, 7]]


def test_an_interrupted_map_keeps_every_chunk_computed_before(tmp_path):
    store = open_store(tmp_path, {"what": "table"})
    with pytest.raises(KeyboardInterrupt):
        map_chunks(Counting(fail_on=3), 11, chunk_size=4, store=store)
    # Chunk 1 was dispatched but not yet copied when chunk 2 failed: kept.
    assert store.finished_chunks() == [0, 1]
    resumed = Counting()
    out = map_chunks(resumed, 11, chunk_size=4, store=store)
    assert [list(rows) for rows in resumed.calls] == [[8, 9, 10, 10]]
    np.testing.assert_array_equal(out["values"], np.asarray(TABLE))


def test_maps_share_a_store_through_their_first_chunk(tmp_path):
    store = open_store(tmp_path, {"what": "two maps"})
    a = map_chunks(Counting(), 11, chunk_size=4, store=store, first_chunk=0)
    b = map_chunks(lambda rows: {"values": -TABLE[jnp.asarray(rows)]}, 11,
                   chunk_size=4, store=store, first_chunk=3)
    assert store.finished_chunks() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(b["values"], -a["values"])
    reread = map_chunks(Counting(fail_on=1), 11, chunk_size=4, store=store,
                        first_chunk=3)
    np.testing.assert_array_equal(reread["values"], b["values"])
