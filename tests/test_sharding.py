"""Tests for tasksurrogate_jax.truth.sharding: the subset axis on several devices.

The test process has one CPU device; the multi-device checks run in
subprocesses: one with 8 simulated CPU devices
(``--xla_force_host_platform_device_count=8``), and two processes joined by
``jax.distributed.initialize`` on localhost (CPU collectives: gloo). Each
compares the sharded results with the same call on one device.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from tasksurrogate_jax.data import make_target_data, make_task_data
from tasksurrogate_jax.downstream.selection import select_subset
from tasksurrogate_jax.estimate.convex import estimate_scores
from tasksurrogate_jax.truth import sharding
from tasksurrogate_jax.truth.retraining import (
    choose_chunk_size,
    make_train_spec,
    retrain,
)

REPO = str(Path(__file__).resolve().parents[1])
TOL = 1e-10  # float64: the sharded rows agree with one device to rounding

# A tiny problem shared by the subprocesses (float64, 5 tasks).
PROBLEM = textwrap.dedent(
    """
    import json, sys, time
    import jax
    jax.config.update("jax_enable_x64", True)
    # START (before any JAX computation)
    import jax.numpy as jnp, numpy as np, optax
    from tasksurrogate_jax.truth import sharding
    from tasksurrogate_jax.data import make_target_data, make_task_data
    from tasksurrogate_jax.truth.retraining import make_train_spec, retrain

    K = 5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    data = make_task_data(x, rng.integers(0, 3, 40), np.arange(40) % K,
                          num_classes=3)
    target = make_target_data(rng.normal(size=(6, 3)), rng.integers(0, 3, 6),
                              num_classes=3)

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (3, 4), jnp.float64),
                "w2": jax.random.normal(k2, (4, 3), jnp.float64)}

    def apply(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    spec = make_train_spec(apply_fn=apply, optimizer=optax.adam(0.05),
                           num_steps=10, batch_size=8)
    MASKS = (rng.random((11, K)) < 0.6).astype(np.float64)  # 11: not a multiple
    MASKS[:, 0] = 1.0                                        # of the devices
    MASKS[-1] = 1.0
    KW = dict(data=data, target=target, spec=spec, key=jax.random.key(4),
              progress=False)
    ONE = sharding.subset_mesh(jax.local_devices()[:1])
    DIFFS = {}

    def diff(name, a, b):
        a = jax.tree.leaves(a)
        b = jax.tree.leaves(b)
        assert len(a) == len(b), name
        DIFFS[name] = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                          for u, v in zip(a, b))
    """
)

EIGHT_DEVICES = textwrap.dedent(
    """
    from tasksurrogate_jax.estimate.convex import estimate_scores
    from tasksurrogate_jax.estimate.finetune import linearized_finetune_scores
    from tasksurrogate_jax.truth.retraining import retrain_chunk
    from tasksurrogate_jax.downstream.selection import select_subset
    from tasksurrogate_jax.core.surrogates import fit_linear_surrogate

    assert len(jax.devices()) == 8
    EIGHT = sharding.subset_mesh()
    out_dir = sys.argv[1]
    timings = {}

    def both(name, fn):
        t = time.perf_counter()
        sharded, single = fn(EIGHT), fn(ONE)
        timings[name] = time.perf_counter() - t
        diff(name, sharded, single)
        return sharded

    # Retraining: shared seeds (auto chunk: a multiple of 8), independent seeds
    # with replicates (chunk of 3 rows padded to 8), fine-tuning.
    scratch = both("retrain_shared", lambda m: retrain(
        MASKS, **KW, init_fn=init, return_params=True, mesh=m))
    both("retrain_replicates", lambda m: retrain(
        MASKS, **KW, init_fn=init, seeds="independent", replicates=2,
        chunk_size=3, mesh=m)[:2])
    theta = jax.tree.map(lambda a: a[-1], scratch.params)  # trained on all tasks
    both("retrain_finetune", lambda m: retrain(
        MASKS, **KW, init_params=theta, replicates=2, chunk_size=3, mesh=m)[:2])

    # The compiled chunk has no cross-device communication.
    masks8 = jax.device_put(jnp.asarray(MASKS[:8]), sharding.subset_sharding(EIGHT))
    hlo = retrain_chunk.lower(masks8, sharding.replicate(theta, EIGHT),
                              sharding.replicate(jax.random.key(0), EIGHT),
                              sharding.replicate(data, EIGHT),
                              sharding.replicate(target, EIGHT),
                              spec=spec, mesh=EIGHT).compile().as_text()
    collectives = [op for op in ("all-reduce", "all-gather", "all-to-all",
                                 "collective-permute", "reduce-scatter")
                   if op in hlo]

    # A store written on 8 devices (chunks of 3 rows) resumes on one device.
    stored = retrain(MASKS, **KW, init_fn=init, chunk_size=3, mesh=EIGHT,
                     store_dir=out_dir, store_config={"t": 1})
    import pathlib
    pathlib.Path(out_dir, "chunk_00001.npz").unlink()
    resumed = retrain(MASKS, **KW, init_fn=init, chunk_size=3, mesh=ONE,
                      store_dir=out_dir, store_config={"t": 1})
    diff("store_resume_on_one_device", resumed.losses, stored.losses)

    # Estimation: linearized fine-tuning, the convex solve (projected and full
    # space).
    est = dict(finetune=spec, key=jax.random.key(1), batch_key=jax.random.key(2))
    both("linearized_finetune", lambda m: linearized_finetune_scores(
        apply, theta, data, target, MASKS, proj_dim=16, chunk_size=4, mesh=m,
        **est).scores)
    both("convex_solve", lambda m: estimate_scores(
        apply, theta, data, target, MASKS, key=jax.random.key(1), proj_dim=16,
        ridge=1e-1, chunk_size=4, mesh=m)[:4])
    both("convex_solve_full_space", lambda m: estimate_scores(
        apply, theta, data, target, MASKS[:3], proj_dim=None, ridge=1e-1,
        chunk_size=2, mesh=m)[:4])

    # Selection on a surrogate fitted to the scores (exhaustive: 31 subsets in
    # chunks of 5 padded to 8) and on a callable (beam).
    surrogate = fit_linear_surrogate(MASKS, scratch.losses, ridge=1e-3)

    def quadratic(m):
        return (m - 0.4) @ jnp.arange(1.0, K + 1) + 0.3 * jnp.sum(m, 1) ** 2

    for name, objective, kw in (
            ("select_exhaustive", surrogate, dict(method="exhaustive",
                                                  batch_size=5)),
            ("select_beam", quadratic, dict(method="beam", beam_width=2,
                                            batch_size=3))):
        t = time.perf_counter()
        a = select_subset(objective, K, mesh=EIGHT, **kw)
        b = select_subset(objective, K, mesh=ONE, **kw)
        timings[name] = time.perf_counter() - t
        assert a.indices == b.indices and a.num_evaluated == b.num_evaluated, (a, b)
        DIFFS[name] = abs(a.predicted - b.predicted)

    print(json.dumps({"diffs": DIFFS, "collectives": collectives,
                      "timings": timings}))
    """
)


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="true", **extra)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess with 8 simulated devices that compiles ~30 programs
def test_eight_devices_equal_one_device(tmp_path):
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", PROBLEM + EIGHT_DEVICES, str(tmp_path / "store")],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _last_json(proc.stdout)
    print(report)
    assert report["collectives"] == []
    for name, value in report["diffs"].items():
        assert value <= TOL, (name, value)


JOIN = textwrap.dedent(
    """
    process_id, port, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=2, process_id=process_id)
    """
)

TWO_PROCESSES = textwrap.dedent(
    """
    from tasksurrogate_jax.estimate.convex import estimate_scores
    from tasksurrogate_jax.downstream.selection import select_subset
    from tasksurrogate_jax.core.surrogates import fit_linear_surrogate

    assert jax.process_count() == 2 and len(jax.devices()) == 4
    GLOBAL = sharding.subset_mesh()  # both processes' devices
    assert sharding.is_multiprocess(GLOBAL)
    t = time.perf_counter()
    # every process makes the same call; each computes its devices' rows
    # (chunk size by memory: one row per device, so chunks of 4)
    spread = retrain(MASKS, **KW, init_fn=init, seeds="independent",
                     replicates=2, memory_budget=1, return_params=True,
                     store_dir=out_dir, store_config={"t": 2})
    alone = retrain(MASKS, **KW, init_fn=init, seeds="independent",
                    replicates=2, chunk_size=3, return_params=True, mesh=ONE)
    diff("retrain", spread, alone)
    # a second call reads every chunk back from process 0's store
    again = retrain(MASKS, **KW, init_fn=init, seeds="independent",
                    replicates=2, return_params=True,
                    store_dir=out_dir, store_config={"t": 2})
    diff("store_resume", again, spread)
    theta = jax.tree.map(lambda a: a[0, -1], spread.params)
    # the convex solve (GSPMD: its loop flag is reduced across the processes)
    solve = dict(key=jax.random.key(1), proj_dim=16, ridge=1e-1, chunk_size=4)
    diff("convex_solve",
         estimate_scores(apply, theta, data, target, MASKS, **solve)[:4],
         estimate_scores(apply, theta, data, target, MASKS, mesh=ONE, **solve)[:4])
    # the gathered scores fit the surrogate; the search runs on both processes
    surrogate = fit_linear_surrogate(MASKS, spread.losses.mean(0), ridge=1e-3)
    a = select_subset(surrogate, K, method="exhaustive", batch_size=5)
    b = select_subset(surrogate, K, method="exhaustive", batch_size=5, mesh=ONE)
    assert a.indices == b.indices, (a, b)
    DIFFS["select"] = abs(a.predicted - b.predicted)
    print(json.dumps({"process": process_id, "diffs": DIFFS,
                      "losses": np.asarray(spread.losses).ravel()[:5].tolist(),
                      "seconds": time.perf_counter() - t}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes that start JAX, connect and compile
def test_two_processes_on_localhost(tmp_path):
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = str(_free_port())
    script = PROBLEM.replace("# START (before any JAX computation)\n",
                             JOIN) + TWO_PROCESSES
    procs = [subprocess.Popen(
        [sys.executable, "-c", script, str(i), port, str(tmp_path / "store")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-3000:]
            outputs.append(_last_json(stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(outputs)
    assert [o["process"] for o in outputs] == [0, 1]
    assert outputs[0]["losses"] == outputs[1]["losses"]  # both hold every row
    for o in outputs:
        for name, value in o["diffs"].items():
            assert value <= TOL, (o["process"], name, value)
    assert sorted(p.name for p in (tmp_path / "store").glob("chunk_*.npz")) == [
        f"chunk_{c:05d}.npz" for c in range(6)]  # 22 rows in chunks of 4


# ---------------------------------------------------------------------------
# In this process (one device).


def test_subset_mesh_and_rounding():
    mesh = sharding.subset_mesh()
    assert mesh.axis_names == ("subsets",) and mesh.size == len(jax.devices())
    assert sharding.check_mesh(None).axis_names == ("subsets",)
    assert not sharding.is_multiprocess(mesh)
    two_axes = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("model", "subsets"))
    assert sharding.check_mesh(two_axes) is two_axes
    assert sharding.round_up(5, two_axes) == 5
    x = sharding.shard_subsets(np.arange(6.0), mesh)
    assert x.sharding == sharding.subset_sharding(mesh)
    np.testing.assert_array_equal(sharding.to_host({"x": x, "n": None})["x"],
                                  np.arange(6.0))
    key = sharding.replicate(jax.random.key(0), mesh)
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    assert sharding.replicate({"scalar": 1.5}, mesh) == {"scalar": 1.5}


def test_choose_chunk_size_per_device():
    # 8 devices, 100 rows: 13 per device fit; chunks of 8 * 13
    assert choose_chunk_size(100, 10, memory_budget=1000, num_devices=8) == 104
    # 4 per device fit: 13 rows per device in 4 even chunks of 4, 3, 3, 3 -> 4
    assert choose_chunk_size(100, 10, memory_budget=40, num_devices=8) == 32
    assert choose_chunk_size(3, 10, memory_budget=10**6, num_devices=8) == 8
    assert choose_chunk_size(100, 10, memory_budget=300) == 25  # one device


def test_bad_mesh():
    rng = np.random.default_rng(0)
    data = make_task_data(rng.normal(size=(8, 2)), rng.integers(0, 2, 8),
                          np.arange(8) % 2, num_classes=2)
    target = make_target_data(rng.normal(size=(2, 2)), np.array([0, 1]),
                              num_classes=2)

    def apply(p, x):
        return x @ p

    spec = make_train_spec(apply_fn=apply, optimizer=optax.sgd(0.1), num_steps=1)
    masks = np.ones((1, 2))
    wrong_axis = Mesh(np.asarray(jax.devices()[:1]), ("batch",))
    for mesh, error in (("cpu", TypeError), (jax.devices(), TypeError),
                        (wrong_axis, ValueError)):
        with pytest.raises(error, match="mesh must"):
            retrain(masks, data=data, target=target, spec=spec,
                    key=jax.random.key(0), init_params=jnp.zeros((2, 2)),
                    progress=False, mesh=mesh)
        with pytest.raises(error, match="mesh must"):
            estimate_scores(apply, jnp.zeros((2, 2)), data, target, masks,
                            key=jax.random.key(0), proj_dim=2, mesh=mesh)
        with pytest.raises(error, match="mesh must"):
            select_subset(lambda m: m.sum(1), 3, mesh=mesh)
