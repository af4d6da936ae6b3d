"""Tests for tasksurrogate_jax.truth.store."""

import json

import numpy as np
import pytest

from tasksurrogate_jax.truth.store import ChunkStore, array_digest, config_hash


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        config_hash({"a": object()})
    with pytest.raises(TypeError, match="config must be a mapping"):
        config_hash([1, 2])


def test_array_digest_sees_values_dtype_and_shape():
    a = np.arange(6, dtype=np.float32)
    assert array_digest(a) == array_digest(a.copy())
    assert array_digest(a) != array_digest(a.astype(np.float64))
    assert array_digest(a) != array_digest(a.reshape(2, 3))
    b = a.copy()
    b[3] += 1
    assert array_digest(a) != array_digest(b)


def test_save_load_roundtrip_and_manifest(tmp_path):
    store = ChunkStore(tmp_path / "run", {"x": 1, "name": "t"})
    arrays = {"losses": np.random.default_rng(0).normal(size=(3, 4)),
              "rows": np.arange(3)}
    store.save_chunk(0, arrays)
    store.save_chunk(2, arrays)
    assert store.finished_chunks() == [0, 2]
    assert store.has_chunk(0) and not store.has_chunk(1)
    back = ChunkStore(tmp_path / "run", {"name": "t", "x": 1}).load_chunk(2)
    np.testing.assert_array_equal(back["losses"], arrays["losses"])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"] == {"x": 1, "name": "t"}
    assert manifest["config_hash"] == config_hash({"x": 1, "name": "t"})
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_refuses_a_different_configuration(tmp_path):
    ChunkStore(tmp_path, {"lr": 0.1, "steps": 10})
    with pytest.raises(ValueError, match=r"different configuration.*\['lr'\]"):
        ChunkStore(tmp_path, {"lr": 0.2, "steps": 10})


def test_refuses_unreadable_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable manifest.json"):
        ChunkStore(tmp_path, {"a": 1})


def test_no_pickle(tmp_path):
    store = ChunkStore(tmp_path, {"a": 1})
    with pytest.raises(TypeError, match="dtype object"):
        store.save_chunk(0, {"bad": np.array([{"a": 1}], dtype=object)})
    assert not store.has_chunk(0)


def test_stale_temporary_files_are_removed(tmp_path):
    ChunkStore(tmp_path, {"a": 1})
    stale = tmp_path / ".chunk_00001.npz.abc.tmp"
    stale.write_bytes(b"partial")
    store = ChunkStore(tmp_path, {"a": 1})
    assert not stale.exists()
    assert store.finished_chunks() == []
