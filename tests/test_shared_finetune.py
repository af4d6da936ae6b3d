"""Linearized fine-tuning on factored features, each step shared by a chunk.

The shared program (``finetune.shared_linearized_finetune``) must be the
fine-tuning program of ``retraining`` on the linearized model, batch for
batch; with every side of the factored projection kept whole its features
are the exact Jacobian, so it must then equal linearized fine-tuning in the
full parameter space.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tasksurrogate_jax.data import make_target_data, make_task_data, mask_to_weights
from tasksurrogate_jax.estimate import estimation, factored, features, finetune
from tasksurrogate_jax.estimate.projection import make_projection, num_parameters
from tasksurrogate_jax.truth import retraining
from tasksurrogate_jax.workloads.supervised import nnx_model_functions

ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(3)
NUM_CLASSES, NUM_FEATURES, NUM_TASKS, HIDDEN = 3, 5, 4, 6


class MLP(nnx.Module):
    def __init__(self, hidden, *, rngs):
        self.inner = nnx.Linear(NUM_FEATURES, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.inner(x)))


def make_problem(n=90, num_targets=11, hidden=HIDDEN):
    labels = RNG.integers(0, NUM_CLASSES, n + num_targets)
    x = RNG.normal(size=(n + num_targets, NUM_FEATURES)) + labels[:, None]
    data = make_task_data(x[:n], labels[:n], np.arange(n) % NUM_TASKS,
                          num_classes=NUM_CLASSES)
    target = make_target_data(x[n:], labels[n:], num_classes=NUM_CLASSES)
    apply_fn, init_fn = nnx_model_functions(lambda rngs: MLP(hidden, rngs=rngs))
    params = jax.tree.map(lambda leaf: jnp.asarray(leaf, float),
                          init_fn(jax.random.key(0)))  # the default dtype
    return data, target, apply_fn, params


DATA, TARGET, APPLY, PARAMS = make_problem()  # float32 (the conftest)
MASKS = jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1],
                     [1, 1, 0, 1]], jnp.float32)


def spec_of(optimizer, batch_size, num_steps=7):
    return retraining.make_train_spec(apply_fn=APPLY, optimizer=optimizer,
                                      num_steps=num_steps, batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [16, 40, None])
@pytest.mark.parametrize("optimizer", ["sgd", "adam schedule"])
def test_shared_program_is_the_retraining_program_on_the_features(batch_size,
                                                                  optimizer):
    # The old path runs retraining.retrain on the linearized model; the shared
    # program must draw the same batches and take the same steps (batch sizes
    # below, near and above the smallest subset's 22 examples, full batch).
    opt = optax.sgd(0.3) if optimizer == "sgd" else optax.adam(
        optax.linear_schedule(0.05, 0.01, 7))
    spec = spec_of(opt, batch_size)
    key = jax.random.key(4)
    old = finetune.linearized_finetune_scores(
        APPLY, PARAMS, DATA, TARGET, MASKS, finetune=spec, key=key,
        batch_key=jax.random.key(5), proj_dim=12, batch_orders=2, chunk_size=2)
    projection = make_projection(key, 12, num_params=num_parameters(PARAMS))
    train, target = features.linearize_data(APPLY, PARAMS, DATA, TARGET, projection,
                                        "logits", 256)
    losses, norms = finetune.shared_linearized_finetune(
        train, target, mask_to_weights(MASKS, DATA.task_ids), spec=spec,
        batch_key=jax.random.key(5), batch_orders=2, chunk_size=3,
        norm_fn=lambda w: features.update_norms(projection, w, PARAMS))
    assert losses.shape == (2, MASKS.shape[0], TARGET.num_targets)
    # float32: the two programs agree to 1-2 eps over the 7 steps (seen 5e-7
    # at losses ~2); another batch order or one step less moves them by ~0.4.
    np.testing.assert_allclose(losses.mean(0), old.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norms, old.delta_norm, rtol=1e-5)
    assert float(jnp.min(norms)) > 0


def test_factored_with_whole_sides_is_full_space_linearized_finetuning():
    # proj_dim = p: allocate_dims keeps every side whole, the features are the
    # exact Jacobian, and SGD on w = θ − θ* is full-space linearized SGD.
    spec = spec_of(optax.sgd(0.2), 16, num_steps=9)
    p = num_parameters(PARAMS)
    common = {"finetune": spec, "key": jax.random.key(1),
              "batch_key": jax.random.key(2), "batch_orders": 2}
    full = finetune.linearized_finetune_scores(APPLY, PARAMS, DATA, TARGET, MASKS,
                                          proj_dim=None, **common)
    fac = finetune.linearized_finetune_scores(APPLY, PARAMS, DATA, TARGET, MASKS,
                                         proj_dim=p, projection="factored",
                                         **common)
    # float32: features two ways, then 9 steps (seen 2e-7 relative)
    np.testing.assert_allclose(fac.scores, full.scores, rtol=1e-5)
    np.testing.assert_allclose(fac.delta_norm, full.delta_norm, rtol=1e-5)
    assert set(fac.seconds) == {"features", "subsets"}
    assert all(v > 0 for v in fac.seconds.values())
    assert full.seconds is None


def test_factored_estimates_approach_full_space_as_d_grows():
    # A wider model, so that sides are projected: the error against the
    # full-space estimate falls with d (one key each; generous margins).
    data, target, apply_fn, params = make_problem(hidden=64)
    spec = retraining.make_train_spec(apply_fn=apply_fn, optimizer=optax.sgd(0.2),
                                      num_steps=9, batch_size=16)
    common = {"finetune": spec, "key": jax.random.key(1),
              "batch_key": jax.random.key(2)}
    full = finetune.linearized_finetune_scores(apply_fn, params, data, target, MASKS,
                                          proj_dim=None, **common)
    shift = np.abs(np.asarray(full.scores) - np.asarray(features.example_losses(
        apply_fn(params, target.inputs), target.labels, "logits"))).mean()
    errors = []
    for d in (8, 64, 512):
        fac = finetune.linearized_finetune_scores(apply_fn, params, data, target, MASKS,
                                             proj_dim=d, projection="factored",
                                             **common)
        errors.append(float(np.abs(np.asarray(fac.scores - full.scores)).mean()))
    assert errors[2] < errors[0]
    assert errors[2] < 0.5 * shift  # most of the fine-tuning's effect is kept


def test_margin_mode_runs_on_factored_features():
    spec = spec_of(optax.sgd(0.2), 16)
    out = finetune.linearized_finetune_scores(
        APPLY, PARAMS, DATA, TARGET, MASKS, finetune=spec, key=jax.random.key(1),
        batch_key=jax.random.key(2), proj_dim=20, projection="factored",
        output_mode="margin")
    assert out.scores.shape == (MASKS.shape[0], TARGET.num_targets)
    assert np.all(np.isfinite(out.scores)) and np.all(np.asarray(out.scores) > 0)


def test_bad_arguments_name_what_is_wrong():
    spec = spec_of(finetune.Adam(1e-2), 16)
    common = {"finetune": spec, "key": jax.random.key(1),
              "batch_key": jax.random.key(2)}
    with pytest.raises(ValueError, match="projection must be"):
        finetune.linearized_finetune_scores(APPLY, PARAMS, DATA, TARGET, MASKS,
                                       proj_dim=8, projection="kron", **common)
    with pytest.raises(ValueError, match="preconditioner='adam'"):
        finetune.linearized_finetune_scores(APPLY, PARAMS, DATA, TARGET, MASKS,
                                       proj_dim=8, projection="factored",
                                       preconditioner="adam", **common)
    with pytest.raises(ValueError, match="needs a projection"):
        finetune.linearized_finetune_scores(APPLY, PARAMS, DATA, TARGET, MASKS,
                                       proj_dim=None, projection="factored",
                                       **common)
    with pytest.raises(ValueError, match="store_dir"):
        finetune.linearized_finetune_scores(APPLY, PARAMS, DATA, TARGET, MASKS,
                                       proj_dim=8, projection="factored",
                                       store_dir="/tmp/x", **common)
    train = features.Linearized(jnp.zeros((4, 3)), jnp.zeros((4, 3, 2)),
                                jnp.zeros(4, int))
    with pytest.raises(ValueError, match="weights must be"):
        finetune.shared_linearized_finetune(train, train, jnp.ones((2, 5)),
                                       spec=spec, batch_key=jax.random.key(0))
    with pytest.raises(TypeError, match="spec must be"):
        finetune.shared_linearized_finetune(train, train, jnp.ones((2, 4)),
                                       spec=None, batch_key=jax.random.key(0))
    with pytest.raises(ValueError, match="projection must be one of"):
        estimation.EstimationSettings(projection="kron")
    with pytest.raises(ValueError, match="method='finetune'"):
        estimation.EstimationSettings(projection="factored", method="solve")
    with pytest.raises(ValueError, match="is not Kronecker"):
        estimation.EstimationSettings(projection="factored", proj_dim=8,
                               preconditioner="adam")


def test_auto_projection_is_factored_only_for_large_dense_models():
    settings = estimation.EstimationSettings()
    assert settings.resolved_projection(APPLY, PARAMS, DATA.inputs) == "dense"
    assert settings.resolved_proj_dim(num_parameters(PARAMS)) is None
    data, _, apply_fn, params = make_problem(n=8, num_targets=1, hidden=11200)
    assert num_parameters(params) > estimation.AUTO_FULL_SPACE_MAX_PARAMS
    assert settings.resolved_projection(apply_fn, params, data.inputs) == "factored"
    # output_mode="auto": margins for factored features of a classifier (d is
    # then C times larger at the same cost), logits otherwise.
    assert settings.resolved_output_mode("factored") == "margin"
    assert settings.resolved_output_mode("factored", classification=False) == "logits"
    assert settings.resolved_output_mode("dense") == "logits"
    assert settings.resolved_proj_dim(num_parameters(params), "factored") \
        == estimation.DEFAULT_FACTORED_PROJ_DIM["margin"] == 32768
    assert settings.resolved_proj_dim(num_parameters(params), "factored",
                                      output_mode="logits") == 4096
    logits = dataclasses.replace(settings, output_mode="logits")
    assert logits.resolved_output_mode("factored") == "logits"
    assert logits.resolved_proj_dim(num_parameters(params), "factored") == 4096
    assert settings.resolved_proj_dim(num_parameters(params), "dense") \
        == estimation.DEFAULT_PROJ_DIM
    # A parameter outside a dense layer (a scale): dense.
    scaled = {"p": params, "scale": jnp.ones(())}

    def apply_scaled(p, x):
        return apply_fn(p["p"], x) * p["scale"]

    assert settings.resolved_projection(apply_scaled, scaled, data.inputs) == "dense"
    for other in (dataclasses.replace(settings, projection="dense"),
                  dataclasses.replace(settings, proj_dim="full"),
                  dataclasses.replace(settings, method="solve", ridge=1.0)):
        assert other.resolved_projection(apply_fn, params, data.inputs) == "dense"
    with pytest.raises(ValueError, match="resolved"):
        settings.resolved_proj_dim(10, "auto")


def test_factored_update_norms_are_those_of_the_unprojected_updates():
    structure = factored.find_dense_layers(APPLY, PARAMS, DATA.inputs)
    projection = factored.make_factored_projection(jax.random.key(0),
                                                   structure=structure, dims=3)
    w = jax.random.normal(jax.random.key(1), (4, projection.proj_dim))
    update = factored.factored_unproject(projection, w, PARAMS)
    expected = jnp.sqrt(sum(jnp.sum(leaf.reshape(4, -1) ** 2, axis=1)
                            for leaf in jax.tree.leaves(update)))
    np.testing.assert_allclose(factored.factored_update_norms(projection, w),
                               expected, rtol=1e-5)  # float32: sums of squares


def run_quick(script: str, out: Path) -> dict:
    """Runs ``benchmarks/<script> --quick --out <out>``; its JSON."""
    subprocess.run([sys.executable, script, "--quick", "--out", str(out)],
                   cwd=ROOT / "benchmarks", check=True, capture_output=True,
                   text=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_estimation_quick_writes_the_keys(tmp_path):
    result = run_quick("bench_estimation.py", tmp_path / "bench.json")
    assert isinstance(result["speedup_m1024"], float) and result["speedup_m1024"] > 0
    per_target = result["loo_spearman_per_target"]
    for name in ("kernel surrogate (estimated)", "kernel surrogate (exact)",
                 "influence"):
        assert -1 <= per_target[name] <= 1
    low, high = result["paired_interval_estimated_kernel_minus_influence"]
    assert -2 <= low <= high <= 2
    assert 0 < result["ceiling"]["loo_spearman_per_target"] <= 1
    assert result["peak_rss_gb"] > 0


@pytest.mark.slow
def test_bench_factored_quick_runs(tmp_path):
    assert run_quick("bench_factored.py", tmp_path / "factored.json")
