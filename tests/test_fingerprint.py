"""Stored results are keyed on everything that determines them.

Each ingredient of a supervised run is changed one at a time (data, target,
initial parameters, model function, loss, an optimizer hyperparameter, the
schedule, steps, batch size, dtype, masks, key): the workload's fingerprint
changes, and a store folder written before the change is refused, naming what
differs. An unchanged program keeps its digest, in another process too.
"""

import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasksurrogate_jax as ts
from tasksurrogate_jax.truth.fingerprint import program_digest
from tasksurrogate_jax.truth.store import StoreMismatchError

K = 4


def _data(seed=0, n=48, noise=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x[:, 0] + noise * rng.normal(size=n) > 0).astype(np.int32)
    return x, y


def _init(key, hidden=8):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (5, hidden)) * 0.3,
            "w2": jax.random.normal(k2, (hidden, 2)) * 0.3}


def _apply(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def _apply_relu(params, x):
    return jax.nn.relu(x @ params["w1"]) @ params["w2"]


def _squared_hinge(outputs, labels):
    margin = jnp.take_along_axis(outputs, labels[:, None], 1)[:, 0] - outputs.mean(1)
    return jnp.square(jnp.maximum(0.0, 1.0 - margin))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One supervised program; every field is an ingredient the test varies."""

    data_seed: int = 0
    target_seed: int = 1
    apply_fn: object = _apply
    init_fn: object = _init
    loss_fn: object = ts.losses.softmax_cross_entropy
    learning_rate: float = 1e-2
    schedule: bool = False
    num_steps: int = 3
    batch_size: int | None = 16
    precision: str = "float32"
    num_tasks: int = K

    def build(self) -> ts.SupervisedWorkload:
        x, y = _data(self.data_seed)
        tx, ty = _data(self.target_seed, n=6)
        lr = (optax.linear_schedule(self.learning_rate, 0.0, self.num_steps)
              if self.schedule else self.learning_rate)
        return ts.SupervisedWorkload(
            apply_fn=self.apply_fn, init_fn=self.init_fn,
            data=ts.make_task_data(x, y, np.arange(len(y)) % self.num_tasks,
                                   num_classes=2),
            target=ts.make_target_data(tx, ty, num_classes=2),
            train=ts.TrainSettings(optax.adam(1e-2), num_steps=3, batch_size=16),
            finetune=ts.TrainSettings(optax.sgd(lr), num_steps=self.num_steps,
                                      batch_size=self.batch_size),
            loss_fn=self.loss_fn, name="recipe", precision=self.precision)


CHANGES = {
    "data": {"data_seed": 5},
    "target": {"target_seed": 7},
    "model function": {"apply_fn": _apply_relu},
    "initialisation": {"init_fn": lambda key: _init(key, hidden=9)},
    "loss": {"loss_fn": _squared_hinge},
    "learning rate": {"learning_rate": 3e-2},
    "schedule": {"schedule": True},
    "steps": {"num_steps": 4},
    "batch size": {"batch_size": 8},
    "dtype": {"precision": "float64"},
}


@pytest.mark.float64  # builds precision='float64' workloads
def test_every_ingredient_changes_the_fingerprint():
    base = Recipe().build().fingerprint()
    assert Recipe().build().fingerprint() == base  # rebuilt: the same digests
    for name, change in CHANGES.items():
        changed = Recipe(**change).build().fingerprint()
        assert changed != base, name


def test_fingerprint_names_the_part_that_changed():
    base = Recipe().build().fingerprint()
    expected = {"data": {"data"}, "target": {"target"},
                "learning rate": {"finetune"}, "steps": {"finetune"},
                "schedule": {"finetune"}, "batch size": {"finetune"},
                "model function": {"train", "finetune"},
                "loss": {"train", "finetune"}, "initialisation": {"init", "train",
                                                                  "finetune"}}
    for name, keys in expected.items():
        changed = Recipe(**CHANGES[name]).build().fingerprint()
        differ = {k for k in base if base[k] != changed[k]}
        assert differ == keys, name


@pytest.mark.parametrize("name", [  # "dtype" builds a precision='float64' workload
    pytest.param(name, marks=pytest.mark.float64) if name == "dtype" else name
    for name in sorted(CHANGES)])
def test_a_store_of_another_program_is_refused(tmp_path, name):
    masks = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
    key = jax.random.key(0)
    workload = Recipe().build()
    theta = workload.init_fn(key)
    workload.replicate_scores(masks, key=key, regime="finetune", base_params=theta,
                              store_dir=tmp_path, progress=False)
    changed = Recipe(**CHANGES[name]).build()
    theta_changed = changed.init_fn(key)
    with pytest.raises(StoreMismatchError, match="different configuration"):
        changed.replicate_scores(masks, key=key, regime="finetune",
                                 base_params=theta_changed, store_dir=tmp_path,
                                 progress=False)


def test_store_refuses_other_masks_key_and_initial_parameters(tmp_path):
    masks = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
    key = jax.random.key(0)
    workload = Recipe().build()
    theta = workload.init_fn(key)
    run = dict(regime="finetune", store_dir=tmp_path, progress=False)
    first = workload.replicate_scores(masks, key=key, base_params=theta, **run)
    again = workload.replicate_scores(masks, key=key, base_params=theta, **run)
    np.testing.assert_array_equal(first, again)  # the same program: reused
    for change, match in (
            ({"masks": masks[::-1]}, "masks"),
            ({"key": jax.random.key(1)}, "key"),
            ({"base_params": jax.tree.map(lambda x: x + 1e-3, theta)}, "init")):
        call = {"masks": masks, "key": key, "base_params": theta, **change}
        with pytest.raises(StoreMismatchError, match=match):
            workload.replicate_scores(call.pop("masks"), **call, **run)


def test_program_digest_sees_literals_constants_and_ignores_names():
    x = jax.ShapeDtypeStruct((3,), jnp.float32)
    w = np.ones(3, np.float32)

    def scaled(v):
        return v * 1e-3

    def renamed(u):
        return u * 1e-3

    assert program_digest(scaled, x) == program_digest(renamed, x)
    assert program_digest(scaled, x) != program_digest(lambda v: v * 1.0001e-3, x)
    assert (program_digest(lambda v: v @ w, x)
            != program_digest(lambda v: v @ (2 * w), x))
    assert (program_digest(scaled, x)
            != program_digest(scaled, jax.ShapeDtypeStruct((4,), jnp.float32)))


def test_fingerprint_is_the_same_in_another_process():
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from test_fingerprint import Recipe
        import json
        print(json.dumps(Recipe(schedule=True).build().fingerprint(),
                         sort_keys=True))
    """)
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    outputs = [subprocess.run([sys.executable, "-c", script, tests_dir],
                              capture_output=True, text=True, check=True,
                              env={**__import__("os").environ,
                                   "JAX_PLATFORMS": "cpu"}).stdout
               for _ in range(2)]
    assert outputs[0] == outputs[1] and outputs[0].strip()


@pytest.mark.slow
def test_pipeline_refuses_a_run_folder_of_another_program(tmp_path):
    config = ts.PipelineConfig(workload="recipe", replicates=2, num_subsets=8,
                               num_heldout=4, drop=2, baselines=(),
                               value_samples=0, bootstrap_resamples=50)
    run = dict(out_dir=tmp_path, log=lambda line: None, progress=False)
    first = ts.run_pipeline(config, workload=Recipe(num_tasks=8).build(), **run)
    written = __import__("json").loads((tmp_path / "results.json").read_text())
    assert written["full_set_loss"] == pytest.approx(first["full_set_loss"])
    again = ts.run_pipeline(config, workload=Recipe(num_tasks=8).build(), **run)
    assert again["full_set_loss"] == first["full_set_loss"]  # reused
    for change, part in (({"learning_rate": 3e-2}, "fingerprint.finetune"),
                         ({"target_seed": 9}, "fingerprint.target")):
        with pytest.raises(StoreMismatchError, match=part):
            ts.run_pipeline(config, workload=Recipe(num_tasks=8, **change).build(),
                            **run)

