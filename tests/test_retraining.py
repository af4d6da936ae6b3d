"""Tests for tasksurrogate_jax.truth.retraining, in float32 (tests/conftest.py)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasksurrogate_jax.truth.retraining as rt
from tasksurrogate_jax.core.subsets import bernoulli_masks, leave_one_out_masks
from tasksurrogate_jax.data import make_target_data, make_task_data
from tasksurrogate_jax.truth.retraining import (
    choose_chunk_size,
    evaluate_targets,
    make_train_spec,
    retrain,
    retrain_one,
)

N, D, H, C, K = 48, 3, 8, 3, 4
FLOAT = jnp.float32  # what users run (tests/conftest.py)


def _problem(dtype=FLOAT):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, D)).astype(dtype)
    y = rng.integers(0, C, size=N)
    ids = rng.integers(0, K, size=N)  # unequal task sizes
    data = make_task_data(x, y, ids, num_classes=C)
    xt = rng.normal(size=(7, D)).astype(dtype)
    target = make_target_data(xt, rng.integers(0, C, size=7), num_classes=C)
    return data, target


def _init(key, dtype=FLOAT):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (D, H), dtype) / np.sqrt(D),
        "b1": jnp.zeros(H, dtype),
        "w2": jax.random.normal(k2, (H, C), dtype) / np.sqrt(H),
        "b2": jnp.zeros(C, dtype),
    }


def _apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _ce(p, x, y):
    logits = _apply(p, x)
    picked = jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
    return jax.nn.logsumexp(logits, -1) - picked


# Module-level specs: equal specs share one compiled program across tests.
SPEC_ADAM = make_train_spec(apply_fn=_apply, optimizer=optax.adam(0.05),
                            num_steps=20, batch_size=8)
SPEC_SGD = make_train_spec(apply_fn=_apply, optimizer=optax.sgd(0.5), num_steps=15)


def _reference_gd(params, x, y, *, lr, steps):
    """Plain gradient descent on the mean loss of the given (filtered) data."""
    grad = jax.jit(jax.grad(lambda p: jnp.mean(_ce(p, x, y))))
    for _ in range(steps):
        g = grad(params)
        params = jax.tree.map(lambda a, b: a - lr * b, params, g)
    return params


@pytest.mark.slow
def test_weighted_full_batch_equals_training_on_filtered_data():
    data, target = _problem()
    spec = SPEC_SGD
    masks = jnp.asarray([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 1]],
                        FLOAT)
    key = jax.random.key(3)
    res = retrain(masks, data=data, target=target, spec=spec, key=key,
                  init_fn=_init, return_params=True, chunk_size=4, progress=False)
    init_key, _ = jax.random.split(key)
    p0 = _init(init_key)
    ids = np.asarray(data.task_ids)
    for j, m in enumerate(np.asarray(masks)):
        keep = m[ids] > 0
        ref = _reference_gd(p0, data.inputs[keep], data.labels[keep], lr=0.5,
                            steps=15)
        got = jax.tree.map(lambda a, j=j: a[j], res.params)
        # Weighted full batch against the filtered one: float32 sums in another
        # order (eps 1.2e-7), over 15 gradient steps.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                             atol=1e-6), got, ref)
        ref_losses = _ce(ref, target.inputs, target.labels)
        np.testing.assert_allclose(res.losses[j], ref_losses, rtol=1e-5)
    # fine-tuning from given parameters: same reference, other starting point
    theta = jax.tree.map(lambda a: a + 0.1, p0)
    ft = retrain(masks[1:2], data=data, target=target, spec=spec, key=key,
                 init_params=theta, return_params=True, chunk_size=1,
                 progress=False)
    keep = np.asarray(masks[1])[ids] > 0
    ref = _reference_gd(theta, data.inputs[keep], data.labels[keep], lr=0.5, steps=15)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5,
                                                         atol=1e-6), ft.params, ref)


@pytest.mark.slow
def test_vmapped_chunks_equal_one_at_a_time():
    data, target = _problem()
    spec = SPEC_ADAM
    masks = bernoulli_masks(jax.random.key(0), 5, K, p=0.7, dtype=FLOAT)
    masks = masks.at[:, 0].set(1.0)  # never empty
    key = jax.random.key(11)
    res = retrain(masks, data=data, target=target, spec=spec, key=key,
                  init_fn=_init, chunk_size=2, progress=False)  # last chunk padded
    init_key, batch_key = jax.random.split(key)
    p0 = _init(init_key)
    for j in range(masks.shape[0]):
        losses, acc, _ = retrain_one(masks[j], p0, batch_key, data, target, spec=spec)
        # The batched program against the single one (float32, see above).
        np.testing.assert_allclose(res.losses[j], losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(res.accuracy[j], acc)


@pytest.mark.slow
def test_keys_masks_and_seed_modes():
    data, target = _problem()
    spec = SPEC_ADAM
    masks = leave_one_out_masks(K, dtype=FLOAT)

    def run(**kw):
        kw.setdefault("key", jax.random.key(5))
        kw.setdefault("chunk_size", 5)
        return retrain(masks, data=data, target=target, spec=spec, init_fn=_init,
                       progress=False, **kw).losses

    a, b = run(), run()
    np.testing.assert_array_equal(a, b)  # same key, same result
    for i in range(K + 1):  # different masks, different results
        for j in range(i):
            assert not np.allclose(a[i], a[j]), (i, j)
    assert not np.allclose(run(key=jax.random.key(6)), a)
    ind = run(seeds="independent", chunk_size=2)
    assert not np.allclose(ind, a)
    # independent seeds depend on the row, not on the chunking
    np.testing.assert_allclose(run(seeds="independent", chunk_size=5), ind,
                               rtol=1e-9)


@pytest.mark.parametrize("regime", ["scratch", "finetune"])
@pytest.mark.parametrize("seeds", ["shared", "independent"])
def test_replicates_equal_separate_runs_with_their_keys(regime, seeds):
    data, target = _problem()
    masks = leave_one_out_masks(K, dtype=FLOAT)
    key = jax.random.key(3)
    init = ({"init_fn": _init} if regime == "scratch"
            else {"init_params": _init(jax.random.key(9))})
    kw = dict(data=data, target=target, spec=SPEC_ADAM, seeds=seeds, progress=False,
              **init)
    both = retrain(masks, key=key, replicates=3, chunk_size=4, return_params=True,
                   **kw)  # chunks straddle replicates
    assert both.losses.shape == (3, K + 1, 7)
    for r in range(3):
        alone = retrain(masks, key=rt.replicate_key(key, r), chunk_size=2, **kw)
        np.testing.assert_allclose(both.losses[r], alone.losses, rtol=1e-9,
                                   atol=1e-12)
    # replicates differ (initialisation or batch order), masks within one differ
    assert not np.allclose(both.losses[0], both.losses[1])
    assert both.params["w1"].shape == (3, K + 1, D, H)


def test_one_replicate_of_the_full_set_reproduces_the_paired_initialisation():
    data, target = _problem()
    key = jax.random.key(4)
    ones = jnp.ones((2, K), FLOAT)
    res = retrain(ones, data=data, target=target, spec=SPEC_ADAM, key=key,
                  init_fn=_init, replicates=1, progress=False, return_params=True)
    # paired: both rows of replicate 0 share initialisation and batch order
    jax.tree.map(lambda a: np.testing.assert_array_equal(a[0, 0], a[0, 1]),
                 res.params)
    init_key, batch_key = jax.random.split(rt.replicate_key(key, 0))
    losses, _, _ = retrain_one(ones[0], _init(init_key), batch_key, data, target,
                               spec=SPEC_ADAM)
    # The batched program against the single one: float32 roundings (eps
    # 1.2e-7) differ per step and grow over the 40 training steps.
    np.testing.assert_allclose(res.losses[0, 0], losses, rtol=1e-5, atol=1e-6)


def test_minibatches_come_from_kept_examples_only():
    data, target = _problem()
    spec = SPEC_ADAM
    masks = jnp.asarray([[1, 0, 1, 1], [1, 1, 1, 1]], FLOAT)
    key = jax.random.key(2)
    base = retrain(masks, data=data, target=target, spec=spec, key=key,
                   init_fn=_init, chunk_size=2, progress=False).losses
    # Corrupt every example of task 1 (dropped by row 0, kept by row 1).
    of_task1 = np.asarray(data.task_ids) == 1
    x = np.asarray(data.inputs).copy()
    x[of_task1] = 50.0
    y = np.asarray(data.labels).copy()
    y[of_task1] = (y[of_task1] + 1) % C
    corrupted = make_task_data(x, y, data.task_ids, num_classes=C)
    other = retrain(masks, data=corrupted, target=target, spec=spec, key=key,
                    init_fn=_init, chunk_size=2, progress=False).losses
    np.testing.assert_array_equal(other[0], base[0])
    assert not np.allclose(other[1], base[1])


def test_small_subset_fewer_examples_than_batch():
    data, target = _problem()
    spec_mb = make_train_spec(apply_fn=_apply, optimizer=optax.sgd(0.3),
                              num_steps=10, batch_size=N - 1)
    spec_fb = make_train_spec(apply_fn=_apply, optimizer=optax.sgd(0.3),
                              num_steps=10)
    mask = jnp.asarray([[0, 0, 1, 0]], FLOAT)  # fewer than N - 1 examples
    kw = dict(data=data, target=target, key=jax.random.key(0), init_fn=_init,
              chunk_size=1, progress=False)
    # every kept example is in every batch: equal to full batch
    np.testing.assert_allclose(retrain(mask, spec=spec_mb, **kw).losses,
                               retrain(mask, spec=spec_fb, **kw).losses,
                               rtol=1e-5)  # float32 sums in another order


def test_returned_params_reproduce_the_losses_and_auto_chunk():
    data, target = _problem()
    spec = make_train_spec(apply_fn=_apply, optimizer=optax.adam(0.05),
                           num_steps=5, batch_size=8)
    masks = leave_one_out_masks(K, dtype=FLOAT)
    res = retrain(masks, data=data, target=target, spec=spec, key=jax.random.key(0),
                  init_fn=_init, return_params=True, progress=False)  # auto chunk
    assert res.losses.shape == (K + 1, 7) and res.accuracy.shape == (K + 1, 7)
    for j in range(K + 1):
        p = jax.tree.map(lambda a, j=j: a[j], res.params)
        np.testing.assert_allclose(evaluate_targets(p, target, spec=spec)[0],
                                   res.losses[j], rtol=1e-6)  # float32 eps 1.2e-7


def test_choose_chunk_size():
    assert choose_chunk_size(100, 10, memory_budget=1000) == 100
    assert choose_chunk_size(100, 10, memory_budget=300) == 30 - 5  # 4 even chunks
    assert choose_chunk_size(10, 10**9, memory_budget=1) == 1
    assert choose_chunk_size(7, 1, memory_budget=10**9, max_chunk_size=4) == 4


def test_bad_input(tmp_path):
    data, target = _problem()
    spec = make_train_spec(apply_fn=_apply, optimizer=optax.sgd(0.1), num_steps=2)
    kw = dict(data=data, target=target, spec=spec, key=jax.random.key(0),
              init_fn=_init, chunk_size=2, progress=False)
    good = jnp.ones((2, K))
    with pytest.raises(ValueError, match=r"masks has 3 task columns.*num_tasks=4"):
        retrain(jnp.ones((2, 3)), **kw)
    with pytest.raises(ValueError, match=r"rows \[1\] keep no training examples"):
        retrain(jnp.asarray([[1, 1, 0, 0], [0, 0, 0, 0]]), **kw)
    with pytest.raises(ValueError, match="must hold only 0 and 1"):
        retrain(jnp.full((1, K), 0.5), **kw)
    bad_target = make_target_data(np.zeros((3, D + 1)), np.zeros(3, int))
    with pytest.raises(ValueError, match=r"target inputs have per-example shape"):
        retrain(good, **{**kw, "target": bad_target})
    wide = make_target_data(np.zeros((2, D)), np.array([0, C]))
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 3\)"):
        retrain(good, **{**kw, "target": wide})
    with pytest.raises(ValueError, match="exactly one of init_fn"):
        retrain(good, **{**kw, "init_params": _init(jax.random.key(0))})
    with pytest.raises(ValueError, match="seeds must be one of"):
        retrain(good, **kw, seeds="random")
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        retrain(good, **{**kw, "key": 0})
    with pytest.raises(TypeError, match="store_config must be a mapping"):
        retrain(good, **kw, store_dir=tmp_path, store_config="mlp")
    with pytest.raises(TypeError, match="spec must be a TrainSpec"):
        retrain(good, **{**kw, "spec": optax.sgd(0.1)})
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        make_train_spec(apply_fn=_apply, optimizer=optax.sgd(0.1), num_steps=0)
    with pytest.raises(TypeError, match="optimizer must be an optax"):
        make_train_spec(apply_fn=_apply, optimizer=0.1, num_steps=1)
    # a store folder of another configuration is refused
    retrain(good, **kw, store_dir=tmp_path, store_config={"model": "mlp"})
    with pytest.raises(ValueError, match=r"different configuration.*Refusing to mix"):
        retrain(good, **kw, store_dir=tmp_path, store_config={"model": "other"})
    with pytest.raises(ValueError, match=r"different configuration.*masks"):
        retrain(jnp.ones((3, K)), **kw, store_dir=tmp_path,
                store_config={"model": "mlp"})


# The resume problem, shared by the killed subprocess and this process.
RESUME_PROBLEM = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from tasksurrogate_jax.data import make_target_data, make_task_data
    from tasksurrogate_jax.truth.retraining import make_train_spec, retrain
    from tasksurrogate_jax.core.subsets import leave_one_out_masks

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    data = make_task_data(x, rng.integers(0, 3, 40), np.arange(40) % 5,
                          num_classes=3)
    target = make_target_data(x[:6], rng.integers(0, 3, 6), num_classes=3)

    def init(key):
        return {"w": jax.random.normal(key, (3, 3), jnp.float32),
                "b": jnp.zeros(3, jnp.float32)}

    def apply(p, x):
        return x @ p["w"] + p["b"]

    spec = make_train_spec(apply_fn=apply, optimizer=optax.adam(0.05),
                           num_steps=30, batch_size=8)
    KW = dict(data=data, target=target, spec=spec, key=jax.random.key(4),
              init_fn=init, chunk_size=1, return_params=True, progress=False)
    MASKS = leave_one_out_masks(5)
    """
)

KILL_AFTER_TWO = textwrap.dedent(
    """
    import os, signal, sys
    real_replace = os.replace

    def replace(src, dst):  # SIGKILL while chunk 2 is written, before its rename
        if str(dst).endswith("chunk_00002.npz"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = replace
    retrain(MASKS, **KW, store_dir=sys.argv[1], store_config={"test": "resume"})
    """
)


@pytest.mark.slow  # a subprocess that imports JAX and compiles, then is killed
def test_resume_after_sigkill(tmp_path, monkeypatch):
    out = tmp_path / "store"
    env = dict(os.environ, JAX_ENABLE_X64=str(jax.config.jax_enable_x64).lower())
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", RESUME_PROBLEM + KILL_AFTER_TWO, str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("chunk_*.npz")) == [
        "chunk_00000.npz", "chunk_00001.npz"]
    assert list(out.glob(".chunk_00002.npz.*.tmp"))  # the interrupted write
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk_*.npz")}

    ns = {}
    exec(RESUME_PROBLEM, ns)
    calls = []
    real_chunk = rt.retrain_chunk

    def counting(masks, *args, **kwargs):
        calls.append(np.asarray(masks).copy())
        return real_chunk(masks, *args, **kwargs)

    monkeypatch.setattr(rt, "retrain_chunk", counting)
    resumed = ns["retrain"](ns["MASKS"], **ns["KW"], store_dir=out,
                            store_config={"test": "resume"})
    assert len(calls) == 6 - 2  # chunks 0 and 1 were read back, not recomputed
    np.testing.assert_array_equal(np.concatenate(calls), np.asarray(ns["MASKS"])[2:])
    assert {p.name: p.stat().st_mtime_ns
            for p in out.glob("chunk_*.npz") if p.name in before} == before
    assert not list(out.glob("*.tmp"))

    monkeypatch.setattr(rt, "retrain_chunk", real_chunk)
    fresh = ns["retrain"](ns["MASKS"], **ns["KW"])  # uninterrupted, no store
    np.testing.assert_array_equal(resumed.losses, fresh.losses)
    np.testing.assert_array_equal(resumed.accuracy, fresh.accuracy)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, fresh.params)
    # a third run reads everything back
    calls.clear()
    monkeypatch.setattr(rt, "retrain_chunk", counting)
    again = ns["retrain"](ns["MASKS"], **ns["KW"], store_dir=out,
                          store_config={"test": "resume"})
    assert not calls
    np.testing.assert_array_equal(again.losses, fresh.losses)
