"""No implicit host/device transfers in the hot paths: the retraining chunk
loop, estimation on a tiny workload and ``selection.select_subset``
(``predict`` and the Nyström solver: tests/test_surrogates.py and
tests/test_nystrom.py).

``jax.transfer_guard("disallow")`` refuses *implicit* transfers only: a NumPy
array or Python scalar passed to a JAX operation (an eager ``jnp.zeros``,
``x[0]``, ``x.mean()`` or ``fold_in(key, 1)`` uploads its constants), or a
JAX array printed. Explicit ones stay allowed: ``jax.device_put`` (how
``sharding.shard_subsets`` / ``replicate`` place each chunk) and
``jax.device_get`` / ``np.asarray`` of a finished array (how
``chunking.map_chunks`` and ``sharding.to_host`` fetch finished chunks: the
documented exceptions). Inputs are device-resident where the API allows
(masks, keys, parameters; ``make_task_data`` returns JAX arrays).

Every call here passes whole under the guard. The loops inside the calls are
also checked on their own, by running the module's loop function under the
guard (``_guard``), so that a failure names the loop.

On the CPU, a NumPy array that JAX can alias without a copy is not always
reported as a transfer; on a GPU it would be.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasksurrogate_jax.downstream.selection as sel
import tasksurrogate_jax.estimate.convex as convex
import tasksurrogate_jax.truth.retraining as rt
from tasksurrogate_jax.core import surrogates
from tasksurrogate_jax.core.subsets import leave_one_out_masks
from tasksurrogate_jax.data import make_target_data, make_task_data
from tasksurrogate_jax.estimate.estimation import EstimationSettings
from tasksurrogate_jax.workloads import SupervisedWorkload, TrainSettings

N, D, H, C, K = 48, 4, 8, 3, 4
DISALLOWED = jax.errors.JaxRuntimeError  # "Disallowed host-to-device transfer"


def _problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    data = make_task_data(x, rng.integers(0, C, N), np.arange(N) % K, num_classes=C)
    xt = rng.normal(size=(6, D)).astype(np.float32)
    target = make_target_data(xt, rng.integers(0, C, 6), num_classes=C)
    return data, target


def _init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (D, H)) / 2.0, "b1": jnp.zeros(H),
            "w2": jax.random.normal(k2, (H, C)) / 3.0, "b2": jnp.zeros(C)}


def _apply(params, inputs):
    return jnp.tanh(inputs @ params["w1"] + params["b1"]) @ params["w2"] + (
        params["b2"])


def _guard(monkeypatch, module, name):
    """Runs ``module.name`` (a loop the call goes through) under
    ``transfer_guard("disallow")``; returns the list of its calls."""
    inner = getattr(module, name)
    calls = []

    @functools.wraps(inner)
    def guarded(*args, **kwargs):
        calls.append(name)
        with jax.transfer_guard("disallow"):
            return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, guarded)
    return calls


def _device_inputs():
    masks = jax.device_put(leave_one_out_masks(K).astype(np.float32))
    key = jax.device_put(jax.random.key(0))
    return masks, key


def _same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# -- retraining ----------------------------------------------------------------

SPEC = rt.make_train_spec(apply_fn=_apply, optimizer=optax.adam(0.05), num_steps=6,
                          batch_size=8)
RETRAIN_CASES = {
    "scratch-shared": dict(init="fn"),
    "finetune": dict(init="params", return_params=True),
    "scratch-replicates": dict(init="fn", replicates=2),
    "scratch-independent": dict(init="fn", seeds="independent"),
}


def _retrain_kwargs(case):
    data, target = _problem()
    masks, key = _device_inputs()
    kw = dict(RETRAIN_CASES[case])
    if kw.pop("init") == "fn":
        kw["init_fn"] = _init
    else:
        kw["init_params"] = jax.jit(_init)(jax.device_put(jax.random.key(1)))
    # Chunks of 2 rows: several chunks, the last one padded.
    return dict(masks=masks, data=data, target=target, spec=SPEC, key=key,
                chunk_size=2, progress=False, **kw)


@pytest.mark.parametrize("case", RETRAIN_CASES)
def test_retraining_chunk_loop_makes_no_implicit_transfer(monkeypatch, case):
    """Every chunk's dispatch (row keys, initialisation, training, targets) and
    the explicit fetch of each finished chunk run with implicit transfers
    disallowed, for device-resident masks, key and parameters."""
    kwargs = _retrain_kwargs(case)
    expected = rt.retrain(**kwargs)
    calls = _guard(monkeypatch, rt, "map_chunks")
    guarded = rt.retrain(**kwargs)
    assert calls == ["map_chunks"]
    _same(guarded, expected)


def test_retrain_call_makes_no_implicit_transfer():
    kwargs = _retrain_kwargs("finetune")
    rt.retrain(**kwargs)  # compiled outside the guard
    with jax.transfer_guard("disallow"):
        rt.retrain(**kwargs)


# -- estimation ----------------------------------------------------------------


def _workload():
    data, target = _problem()
    return SupervisedWorkload(
        apply_fn=_apply, init_fn=_init, data=data, target=target,
        train=TrainSettings(optax.adam(0.05), 10, 16),
        finetune=TrainSettings(optax.sgd(0.1), 5, 16))


ESTIMATION_SETTINGS = {
    "finetune": EstimationSettings(),  # the default: linearized fine-tuning
    "solve": EstimationSettings(method="solve", proj_dim=16, batch_orders=2),
}


@pytest.mark.parametrize("method", ["finetune", "solve"])
def test_estimation_chunk_loops_make_no_implicit_transfer(monkeypatch, method):
    """The chunk loops estimation goes through (the retraining loop of
    linearized fine-tuning, the padded chunks of the solves) run with
    implicit transfers disallowed."""
    workload, (masks, key) = _workload(), _device_inputs()
    theta = workload.base_params(key=key)
    settings = ESTIMATION_SETTINGS[method]
    expected = workload.estimated_scores(masks, key=key, base_params=theta,
                                         settings=settings)
    loops = (_guard(monkeypatch, rt, "map_chunks"),
             _guard(monkeypatch, convex, "map_padded_chunks"))
    guarded = workload.estimated_scores(masks, key=key, base_params=theta,
                                        settings=settings)
    assert any(loops), "no chunk loop ran under the guard"
    np.testing.assert_array_equal(guarded, expected)


def test_estimated_scores_call_makes_no_implicit_transfer():
    workload, (masks, key) = _workload(), _device_inputs()
    theta = workload.base_params(key=key)
    workload.estimated_scores(masks, key=key, base_params=theta)  # compiled
    with jax.transfer_guard("disallow"):
        jax.block_until_ready(workload.estimated_scores(masks, key=key,
                                                        base_params=theta))


# -- selection -----------------------------------------------------------------


def _objectives():
    rng = np.random.default_rng(3)
    masks = rng.integers(0, 2, (30, 6)).astype(np.float32)
    scores = rng.normal(size=(30, 2)).astype(np.float32)
    weights = jax.device_put(rng.normal(size=6).astype(np.float32))
    return {
        # Objectives built outside the guard (fitting is not what is checked
        # here; the bare-surrogate test below builds one inside it).
        "linear": sel.surrogate_objective(
            surrogates.fit_linear_surrogate(masks, scores)),
        "kernel": sel.surrogate_objective(
            surrogates.fit_kernel_surrogate(masks, scores, gamma=0.2, ridge=0.1),
            target_weights=np.array([0.25, 0.75])),
        # A traceable callable closing over a device array (a static argument).
        "callable": lambda m: m @ weights,
    }


@pytest.mark.parametrize("method", ["beam", "greedy"])
def test_select_subset_search_makes_no_implicit_transfer(method):
    """Beam and greedy searches (one compiled scoring call per chunk of
    candidates, each fetched explicitly) with implicit transfers disallowed."""
    for name, objective in _objectives().items():
        kwargs = dict(size=3, required=(1,), excluded=(4,), method=method,
                      beam_width=2, batch_size=4)
        expected = sel.select_subset(objective, 6, **kwargs)  # compiled
        with jax.transfer_guard("disallow"):
            guarded = sel.select_subset(objective, 6, **kwargs)
        assert guarded.indices == expected.indices, name
        _same(tuple(guarded), tuple(expected))


def test_exhaustive_chunk_loop_makes_no_implicit_transfer(monkeypatch):
    """Each chunk of the exhaustive search (masks built on the device, scored
    and folded into the running best) with implicit transfers disallowed."""
    for name, objective in _objectives().items():
        kwargs = dict(min_size=1, max_size=4, required=(2,), batch_size=8)
        expected = sel.select_subset(objective, 6, **kwargs)
        with monkeypatch.context() as patch:
            calls = _guard(patch, sel, "_reduce_chunk")
            guarded = sel.select_subset(objective, 6, **kwargs)
        assert guarded.method == "exhaustive" and len(calls) > 1, name
        _same(tuple(guarded), tuple(expected))


def test_select_subset_exhaustive_call_makes_no_implicit_transfer():
    objective = _objectives()["linear"]
    sel.select_subset(objective, 6, size=3)  # compiled
    with jax.transfer_guard("disallow"):
        sel.select_subset(objective, 6, size=3)


def test_select_subset_of_a_bare_surrogate_makes_no_implicit_transfer():
    rng = np.random.default_rng(3)
    surrogate = surrogates.fit_linear_surrogate(
        rng.integers(0, 2, (30, 6)).astype(np.float32),
        rng.normal(size=(30, 2)).astype(np.float32))
    kwargs = dict(size=3, method="beam", beam_width=2)
    sel.select_subset(surrogate, 6, **kwargs)  # compiled
    with jax.transfer_guard("disallow"):
        sel.select_subset(surrogate, 6, **kwargs)
