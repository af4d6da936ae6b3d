"""The workload contracts: any implementation runs through ``run_pipeline``.

Two workloads written here as a user would write them, neither known to the
pipeline or the registry:

- a language model's demonstration attribution: a :class:`PromptScorer`
  over a randomly initialised ``tiny_gpt`` (the ``"fixed_size"`` contract);
- an RL-like workload: a softmax policy over a few actions, trained by
  sampled policy gradients on a mixture of the tasks' rewards (the ``"loo"``
  contract, no ``init_fn``, no baselines).

Each run's results are checked against the workload's own answers computed
independently here.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax import pipeline
from tasksurrogate_jax.downstream import attribution
from tasksurrogate_jax.pipeline import report
from tasksurrogate_jax.truth.fingerprint import array_digest
from tasksurrogate_jax.workloads import lm_icl_workload, nnx_causal_lm_scorer, tiny_gpt
from tasksurrogate_jax.workloads.base import LeaveOneOutWorkload

QUICK = {"bootstrap_resamples": 50, "value_samples": 64}


# -- a user's language model (fixed_size contract) ------------------------------


def lm_workload(num_demos=8, num_queries=3, seed=0):
    """8 demonstrations (2-4 tokens, one of two labels), 3 queries, and a
    random tiny GPT that reads the label off two verbalizer tokens."""
    rng = np.random.default_rng(seed)
    demos = [rng.integers(4, 40, rng.integers(2, 5)) for _ in range(num_demos)]
    queries = [rng.integers(4, 40, rng.integers(2, 4)) for _ in range(num_queries)]
    model = tiny_gpt(jax.random.key(seed), vocab_size=48, width=16, depth=1,
                     heads=2, max_length=40)
    scorer = nnx_causal_lm_scorer(model, label_token_ids=[2, 3])
    return lm_icl_workload(scorer, demos, queries, rng.integers(0, 2, num_queries),
                           demo_labels=rng.integers(0, 2, num_demos),
                           separator=[1], pad_id=0, max_length=40, chunk_size=16)


def test_a_users_language_model_runs_through_the_pipeline(tmp_path):
    workload = lm_workload()
    config = pipeline.PipelineConfig(workload="my_lm", shots=3, num_subsets=24,
                                     num_heldout=12, **QUICK)
    results = pipeline.run_pipeline(config, workload=workload, out_dir=tmp_path,
                                    log=lambda line: None, progress=False)
    assert results["protocol"] == "fixed_size" and not results["registered"]
    assert results["ceiling"]["deterministic"]  # all C(8, 3) = 56 prompts
    # Independent: the true effects from the workload's scores of every prompt.
    masks = np.zeros((56, 8), np.float32)
    for row, tasks in enumerate(itertools.combinations(range(8), 3)):
        masks[row, list(tasks)] = 1.0
    scores = np.asarray(workload.exact_scores(masks))
    truth = attribution.fixed_size_effects_from_scores(masks, scores)
    np.testing.assert_allclose(results["true_effects"], np.asarray(truth).mean(1),
                               rtol=1e-5, atol=1e-7)
    # Exact scores interpolated by the kernel surrogate: held-out prompts are
    # predicted better than by their mean.
    kernel = results["methods"]["kernel surrogate (exact)"]
    assert kernel["normalized_error"] < 1.0
    assert (tmp_path / "results.json").exists()


# -- a user's RL-like workload (loo contract) ------------------------------------


@dataclasses.dataclass(frozen=True)
class BanditSettings:
    """The bandit's estimation settings (a frozen dataclass, as the contract
    asks)."""

    step_scale: float = 1.0


class MixtureBandit(LeaveOneOutWorkload):
    """A softmax policy over ``A`` actions; task ``i`` rewards action ``a``
    with ``rewards[i, a]``. Training on a subset: ``steps`` of REINFORCE with
    ``samples`` sampled actions on the mixture of its tasks' rewards. The
    score of target ``t``: minus the expected reward ``targets[t]`` of the
    trained policy (exact)."""

    name = "mixture_bandit"
    pipeline_defaults = {"regime": "finetune", "num_subsets": 24,
                         "num_heldout": 12, "design": "uniform"}

    def __init__(self, num_tasks=6, num_actions=5, seed=0):
        rng = np.random.default_rng(seed)
        self.rewards = jnp.asarray(rng.normal(size=(num_tasks, num_actions)),
                                   jnp.float32)
        # Targets: mixtures of the tasks, so some tasks help and others hurt.
        self.targets = jnp.asarray(rng.dirichlet(np.ones(num_tasks), 3),
                                   jnp.float32) @ self.rewards
        self.steps, self.samples, self.lr = 40, 16, 0.5
        self.estimation = BanditSettings()

    task_names = property(lambda self: tuple(f"arm{i}" for i in
                                             range(self.rewards.shape[0])))
    num_targets = property(lambda self: self.targets.shape[0])
    target_description = "minus the expected reward of 3 mixtures of the tasks"

    def fingerprint(self):
        return {"workload": self.name, "rewards": array_digest(self.rewards),
                "targets": array_digest(self.targets),
                "training": [self.steps, self.samples, self.lr]}

    def params_like(self, *, key):
        del key
        return {"logits": jax.ShapeDtypeStruct((self.rewards.shape[1],),
                                               jnp.float32)}

    def _train(self, logits, mask, key, steps):
        reward = mask @ self.rewards / mask.sum()

        def step(logits, step_key):
            actions = jax.random.categorical(step_key, logits, shape=(self.samples,))
            advantage = reward[actions] - reward[actions].mean()
            grad = jax.grad(lambda z: (advantage * jax.nn.log_softmax(z)[actions])
                            .mean())(logits)
            return logits + self.lr * grad, None

        return jax.lax.scan(step, logits, jax.random.split(key, steps))[0]

    def _scores(self, logits):
        return -(jax.nn.softmax(logits) @ self.targets.T)

    def base_params(self, *, key):
        full = jnp.ones(self.num_tasks)
        return {"logits": self._train(jnp.zeros(self.rewards.shape[1]), full,
                                      jax.random.fold_in(key, 99), 3 * self.steps)}

    def replicate_scores(self, masks, *, key, regime, replicates, base_params,
                         chunk_size, store_dir, progress):
        del chunk_size, store_dir, progress  # small enough for one program
        start = (base_params["logits"] if regime == "finetune"
                 else jnp.zeros(self.rewards.shape[1]))
        masks = jnp.asarray(masks, jnp.float32)

        def one_replicate(r):
            train = jax.vmap(lambda m: self._train(start, m, jax.random.fold_in(
                key, r), self.steps))
            return jax.vmap(self._scores)(train(masks))

        return jnp.stack([one_replicate(r) for r in range(replicates)])

    def estimated_scores(self, masks, *, key, base_params):
        del key  # the expected gradient: no sampling
        logits = base_params["logits"]
        probs = jax.nn.softmax(logits)
        masks = jnp.asarray(masks, jnp.float32)
        rewards = masks @ self.rewards / masks.sum(1, keepdims=True)  # [m, A]
        # d/dz E_π[r] = π ⊙ (r − E_π[r]), taken for the whole training run.
        grads = probs * (rewards - (rewards @ probs)[:, None])
        moved = logits + self.estimation.step_scale * self.lr * self.steps * grads
        return jax.vmap(self._scores)(moved)


def test_a_users_rl_like_workload_runs_through_the_pipeline(tmp_path):
    workload = MixtureBandit()
    config = pipeline.PipelineConfig(workload="bandit", replicates=4, **QUICK)
    lines = []
    results = pipeline.run_pipeline(config, workload=workload, out_dir=tmp_path,
                                    log=lines.append, progress=False)
    assert results["protocol"] == "loo" and results["regime"] == "finetune"
    assert set(results["baseline_settings"]) == set()  # no baselines declared
    # Independent: the workload's own LOO ground truth from the stored θ*.
    run = pipeline.collect(config, workload=workload, out_dir=tmp_path,
                           log=lines.append, progress=False)
    assert sum("reused" in line for line in lines) == len(pipeline.STAGE_FIELDS)
    theta = workload.base_params(key=pipeline.stage_keys(0)["base"])
    np.testing.assert_allclose(run.theta["logits"], theta["logits"], rtol=1e-6)
    loo_masks = np.vstack([np.ones((1, 6)), 1 - np.eye(6)])
    truth = np.asarray(workload.replicate_scores(
        loo_masks, key=pipeline.stage_keys(0)["base"], regime="finetune",
        replicates=4, base_params=theta, chunk_size=64, store_dir=None,
        progress=False))
    effects = (truth[:, 1:] - truth[:, :1]).mean(0).mean(1)
    np.testing.assert_allclose(results["true_effects"], effects, rtol=1e-5,
                               atol=1e-7)
    # Replicates agree (the sampled gradients average out over 40 steps), and
    # the first-order estimate of this smooth problem orders the subsets.
    assert results["ceiling"]["loo_spearman_mean_target"] > 0.9
    assert results["estimation"]["spearman_across_subsets"] > 0.9
    assert results["estimation"]["settings"] == {"step_scale": 1.0}
    assert "estimated (the workload's own first-order estimate)" in report.summary(
        results)


def test_config_fields_reach_a_users_estimation_settings_or_are_refused():
    workload = MixtureBandit()
    with pytest.raises(ValueError, match="proj_dim does not apply to workload "
                                         "'bandit' \\(its BanditSettings has no"):
        pipeline.configured_workload(
            pipeline.PipelineConfig(workload="bandit", proj_dim=8), workload)
    with pytest.raises(ValueError, match="influence_damping does not apply"):
        pipeline.check_config(pipeline.PipelineConfig(
            workload="bandit", influence_damping=1.0), workload)
    with pytest.raises(TypeError, match="must implement a workload contract"):
        pipeline.check_config(pipeline.PipelineConfig(), object())
    # Defaults come from the workload; set fields win.
    config = pipeline.check_config(
        pipeline.PipelineConfig(workload="bandit", num_heldout=10), workload)
    assert (config.num_subsets, config.num_heldout, config.design, config.drop) == (
        24, 10, "uniform", None)
    with pytest.raises(ValueError, match="drop applies to design 'fixed' only"):
        pipeline.check_config(pipeline.PipelineConfig(workload="bandit", drop=2),
                              workload)


def test_a_supervised_workload_runs_its_factored_estimation_settings():
    """``EstimationSettings(projection="factored")`` reaches the estimator
    through the workload: with every side kept whole (``proj_dim = p``) the
    factored features are the exact Jacobian, so the estimates are the
    full-space ones; the record says what ran."""
    import dataclasses as dc

    from tasksurrogate_jax.estimate.estimation import EstimationSettings
    from tasksurrogate_jax.estimate.projection import num_parameters
    from tasksurrogate_jax.workloads import digits_workload

    workload = digits_workload("tiny")
    key = jax.random.key(0)
    theta = workload.base_params(key=key)
    p = num_parameters(theta)
    masks = np.asarray(1 - np.eye(workload.num_tasks)[:4], np.float32)
    full = workload.with_estimation(EstimationSettings(proj_dim="full", batch_orders=1))
    factored = workload.with_estimation(dc.replace(full.estimation, proj_dim=p,
                                                   projection="factored",
                                                   output_mode="logits"))
    estimates = {name: np.asarray(w.estimated_scores(masks, key=key,
                                                     base_params=theta))
                 for name, w in (("full", full), ("factored", factored))}
    np.testing.assert_allclose(estimates["factored"], estimates["full"], rtol=2e-4,
                               atol=1e-6)
    record = factored.estimation_record(theta)
    assert (record["projection"], record["output_mode"], record["proj_dim"]) == (
        "factored", "logits", p)
    # The default output mode ("auto") takes margins for factored features of
    # this classifier, logits in the full space.
    auto = workload.with_estimation(dc.replace(factored.estimation,
                                               output_mode="auto"))
    assert auto.estimation_record(theta)["output_mode"] == "margin"
    assert full.estimation_record(theta)["output_mode"] == "logits"
    assert full.estimation_record(theta)["projection"] == "dense"
