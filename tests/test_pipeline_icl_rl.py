"""The pipeline and the ``tasksurrogate`` command on the ICL and RL workloads.

ICL follows the ``"fixed_size"`` protocol (prompts of ``shots``
demonstrations; the truth is the exact effect of including each
demonstration, deterministic), RL the ``"loo"`` protocol (leave-one-out
fine-tuning with paired replicates). The end-to-end runs train a model each
(about a minute on 2 cores): the slow tier.
"""

import itertools
import json

import jax
import numpy as np
import pytest

from tasksurrogate_jax import pipeline
from tasksurrogate_jax.core.subsets import leave_one_out_masks, size_range_masks
from tasksurrogate_jax.core.surrogates import fit_kernel_surrogate
from tasksurrogate_jax.downstream import attribution
from tasksurrogate_jax.pipeline import cli, report
from tasksurrogate_jax.truth import reliability
from tasksurrogate_jax.workloads import icl_synthetic as icl
from tasksurrogate_jax.workloads import registry

PLOTS = ("loo_effects.png", "interactions.png", "heldout.png")
SURROGATES = {f"{kind} surrogate ({scores})" for kind in ("linear", "kernel")
              for scores in ("exact", "estimated")}


def all_masks_of_size(num_tasks, size):
    rows = list(itertools.combinations(range(num_tasks), size))
    masks = np.zeros((len(rows), num_tasks))
    for r, tasks in enumerate(rows):
        masks[r, list(tasks)] = 1.0
    return masks


def context_effects(num_tasks, size, score):
    """Brute force, the definition of ``attribution.fixed_size_effects`` with
    every context: for each context ``C`` of ``size - 1`` tasks, task i's
    effect is the mean of ``score(C + e_j)`` over ``j`` outside ``C`` minus
    ``score(C + e_i)``, averaged over the contexts without i.
    ``score(tuple of tasks) -> [T]``."""
    totals, counts = None, np.zeros(num_tasks)
    for context in itertools.combinations(range(num_tasks), size - 1):
        free = [j for j in range(num_tasks) if j not in context]
        values = {j: np.asarray(score(tuple(sorted(context + (j,)))), float)
                  for j in free}
        mean = np.mean(list(values.values()), axis=0)
        if totals is None:
            totals = np.zeros((num_tasks, mean.size))
        for i in free:
            totals[i] += mean - values[i]
            counts[i] += 1
    return totals / counts[:, None]


# -- fast: the definitions -----------------------------------------------------


def test_fixed_size_effects_from_scores_is_the_context_average_over_every_prompt():
    rng = np.random.default_rng(0)
    num_tasks, size = 7, 3
    masks = all_masks_of_size(num_tasks, size)
    table = {tuple(np.nonzero(row)[0]): rng.normal(size=2) for row in masks}
    scores = np.stack([table[tuple(np.nonzero(row)[0])] for row in masks])
    effects = attribution.fixed_size_effects_from_scores(masks, scores)
    np.testing.assert_allclose(effects, context_effects(num_tasks, size,
                                                        table.__getitem__),
                               rtol=1e-10, atol=1e-12)
    # Row order does not matter, and with-vs-without is what it measures.
    order = rng.permutation(len(masks))
    np.testing.assert_allclose(
        attribution.fixed_size_effects_from_scores(masks[order], scores[order]),
        effects, rtol=1e-12)


@pytest.mark.slow
def test_sampled_fixed_size_effects_of_a_surrogate_converge_to_the_exact_ones():
    rng = np.random.default_rng(1)
    num_tasks, size = 6, 3
    fit = all_masks_of_size(num_tasks, size)
    surrogate = fit_kernel_surrogate(fit, rng.normal(size=(len(fit), 2)), gamma=0.3,
                                     ridge=0.1)
    exact = attribution.fixed_size_effects_from_scores(
        fit, np.asarray(surrogate.predict(fit)))
    sampled = np.asarray(attribution.fixed_size_effects(
        surrogate, key=jax.random.key(0), size=size, num_samples=20_000))
    np.testing.assert_allclose(sampled, exact, atol=0.03 * np.abs(exact).max())


def test_fixed_size_effects_from_scores_rejects_what_it_cannot_measure():
    masks = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]], float)
    with pytest.raises(ValueError, match="same number of tasks"):
        attribution.fixed_size_effects_from_scores(masks, np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"tasks \[0, 3\] are in every subset or"):
        attribution.fixed_size_effects_from_scores(masks[:2], np.zeros((2, 1)))
    with pytest.raises(ValueError, match="rows"):
        attribution.fixed_size_effects_from_scores(masks[:2], np.zeros((3, 1)))


@pytest.mark.slow
def test_size_range_masks_are_uniform_over_their_subsets():
    # Subsets of 4 tasks neither empty, full nor leave-one-out: 4 + 6 of them.
    every = np.asarray(size_range_masks(jax.random.key(0), 10, 4, min_size=1,
                                        max_size=2, unique=True))
    assert len({tuple(row) for row in every}) == 10
    assert set(every.sum(1)) == {1, 2}
    draws = np.asarray(size_range_masks(jax.random.key(1), 20_000, 4, min_size=1,
                                        max_size=2))
    _, counts = np.unique(draws, axis=0, return_counts=True)
    assert len(counts) == 10
    # Each subset has probability 1/10: 2000 ± 4.2 standard deviations (~57).
    assert np.abs(counts - 2000).max() < 240, counts
    with pytest.raises(ValueError, match="min_size <= max_size"):
        size_range_masks(jax.random.key(0), 3, 4, min_size=3, max_size=2)


def test_registered_protocols_and_their_defaults():
    entries = registry.WORKLOADS
    assert entries["icl"].protocol == entries["icl_regression"].protocol == "fixed_size"
    assert entries["rl"].protocol == entries["digits"].protocol == "loo"
    icl_defaults = {**entries["icl"].kind.pipeline_defaults,
                    **icl.PRESET_PIPELINE_DEFAULTS["tiny"]}
    assert {k: icl_defaults[k] for k in ("shots", "num_subsets", "num_heldout")} == {
        "shots": 4, "num_subsets": 30, "num_heldout": 30}
    tiny_rl = registry.make_workload("rl", "tiny")  # θ* trains on first use only
    rl = pipeline.check_config(pipeline.PipelineConfig(workload="rl", preset="tiny"),
                               tiny_rl)
    assert (rl.regime, rl.num_subsets, rl.num_heldout) == ("finetune", 7, 3)
    assert rl.drop is None and rl.baselines == () and rl.shots is None
    assert tiny_rl.estimation.proj_dim == 128
    # Set fields win over the defaults, and reach the workload's estimation.
    cpu_rl = registry.make_workload("rl", "cpu")
    config = pipeline.PipelineConfig(workload="rl", num_subsets=40, proj_dim=32)
    assert pipeline.check_config(config, cpu_rl).num_subsets == 40
    assert pipeline.configured_workload(config, cpu_rl).estimation.proj_dim == 32
    assert cpu_rl.estimation.proj_dim == 128  # the original is unchanged
    with pytest.raises(ValueError, match="output_mode does not apply to workload"):
        pipeline.configured_workload(
            pipeline.PipelineConfig(workload="rl", output_mode="margin"), cpu_rl)
    with pytest.raises(ValueError, match="influence_damping does not apply"):
        pipeline.check_config(pipeline.PipelineConfig(
            workload="rl", influence_damping=1.0), cpu_rl)
    digits = pipeline.check_config(pipeline.PipelineConfig(),
                                   registry.make_workload("digits", "cpu"))
    assert (digits.regime, digits.num_subsets, digits.num_heldout, digits.design,
            digits.keep, digits.drop, digits.baselines) == (
        "finetune", 96, 32, "bernoulli", 0.9, None, pipeline.BASELINES)
    fixed = pipeline.check_config(pipeline.PipelineConfig(design="fixed"),
                                  registry.make_workload("digits", "cpu"))
    assert (fixed.drop, fixed.keep) == (4, None)


@pytest.mark.slow
def test_fixed_size_ceiling_is_one_for_every_prompt_else_the_groups_reliability():
    rng = np.random.default_rng(2)
    exact = pipeline.fixed_size_ceiling(rng.normal(size=(1, 6, 3)), exhaustive=True)
    assert exact["deterministic"] and exact["num_replicates"] == 1
    assert exact["effect_spearman_mean_target"] == exact["heldout_spearman"] == 1.0
    assert exact["attainable"]["effect_spearman_per_target"] == 1.0
    groups = rng.normal(size=(4, 6, 3)) + rng.normal(size=(1, 6, 3))
    sampled = pipeline.fixed_size_ceiling(groups, exhaustive=False, seed=3)
    expected = reliability.subset_reliability(groups, seed=3)
    assert not sampled["deterministic"] and sampled["num_replicates"] == 4
    assert sampled["effect_spearman_per_target"] == expected.mean
    assert sampled["effect_spearman_mean_target"] == expected.mean_target
    assert sampled["heldout_spearman"] == 1.0  # held-out prompts: forward passes


class AdditivePrompts:
    """A stand-in prompt workload: a prompt's loss is the sum of its
    demonstrations' values ``v``, so over every k-prompt the mean loss with i
    is ``v_i + (k - 1) m_i`` and without it ``k m_i`` (``m_i``: the mean of the
    others' values), and i's effect is ``(K - k)/(K - k + 1) (m_i - v_i)``."""

    num_tasks = 9

    def __init__(self):
        self.values = np.random.default_rng(3).normal(size=(self.num_tasks, 2))

    def exact_scores(self, masks, *, key=None):
        return np.asarray(masks) @ self.values


def test_fixed_size_truth_over_every_prompt_or_over_groups_of_random_ones():
    workload = AdditivePrompts()
    masks = all_masks_of_size(9, 3)  # 84 prompts
    exact = attribution.fixed_size_effects_from_scores(
        masks, workload.exact_scores(masks))
    every = pipeline.fixed_size_truth(workload, shots=3, max_prompts=84, groups=4,
                                      key=jax.random.key(0))
    assert every["exhaustive"] and every["num_prompts"] == 84
    assert every["effects"].shape == (1, 9, 2)
    np.testing.assert_allclose(every["effects"][0], exact, rtol=1e-12)
    others = (workload.values.sum(0) - workload.values) / 8
    np.testing.assert_allclose(exact, 6 / 7 * (others - workload.values),
                               rtol=1e-10)
    sampled = pipeline.fixed_size_truth(workload, shots=3, max_prompts=82, groups=4,
                                        key=jax.random.key(0))
    assert not sampled["exhaustive"] and sampled["num_prompts"] == 80
    assert sampled["effects"].shape == (4, 9, 2)
    # Each group estimates the same effects (additive scores: exactly, up to
    # which prompts each group holds); their mean is close to the truth.
    assert np.corrcoef(sampled["effects"].mean(0).ravel(), exact.ravel())[0, 1] > 0.9


def test_list_shows_each_workload_with_its_protocol(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "icl: presets cpu, paper, tiny (fixed_size protocol)" in out
    assert "rl: presets cpu, paper, tiny (loo protocol)" in out
    assert "digits: presets cpu, random, tiny, interactions, wide (loo protocol)" in out


# -- slow: end-to-end runs -------------------------------------------------------


def check_results(out, protocol, num_tasks):
    """``results.json`` and the plots of a finished run; returns the results."""
    results = json.loads((out / "results.json").read_text())
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000, name
    assert results["protocol"] == protocol
    assert len(results["task_names"]) == num_tasks
    prefix = "effect" if protocol == "fixed_size" else "loo"
    ceiling = results["ceiling"]
    for key in (f"{prefix}_spearman_per_target", f"{prefix}_spearman_mean_target",
                "heldout_spearman"):
        assert -1 <= ceiling[key] <= 1, key
        assert ceiling["attainable"][key] == pytest.approx(
            np.sqrt(max(ceiling[key], 0.0)))
    assert SURROGATES <= set(results["methods"])
    for name, values in results["methods"].items():
        assert len(values["effects"]) == num_tasks
        for key in (f"{prefix}_spearman", f"{prefix}_spearman_mean_target",
                    "heldout_spearman"):
            if key not in values:
                continue
            interval = values[f"{key}_interval"]
            assert len(interval) == 2, (name, key)
            if None not in interval:  # NaN (a degenerate bootstrap) is null
                assert interval[0] <= values[key] <= interval[1], (name, key)
    return results


def run_tiny(tmp_path_factory, workload: str):
    """The CLI's run of ``workload``'s tiny preset; its output folder."""
    out = tmp_path_factory.mktemp(workload)
    assert cli.main(["run", workload, "--preset", "tiny", "--out", str(out),
                     "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def icl_run(tmp_path_factory):
    return run_tiny(tmp_path_factory, "icl")


@pytest.mark.slow
def test_icl_cli_run_reports_a_deterministic_truth_and_intervals(icl_run, capsys):
    results = check_results(icl_run, "fixed_size", num_tasks=20)
    ceiling = results["ceiling"]
    assert ceiling["deterministic"] and ceiling["num_replicates"] == 1
    assert ceiling["effect_spearman_mean_target"] == 1.0
    assert set(results["methods"]) == SURROGATES
    assert results["shots"] == 4 and results["config"]["regime"] is None
    assert results["truth"] == "forward passes of all 4845 4-prompts"
    assert len(results["heldout"]["true"]) == 30
    printed = report.summary(results)
    assert "| ceiling (deterministic truth) | 1.000 | 1.000 | 1.000 | - |" in printed
    assert "effect Spearman (mean target)" in printed


@pytest.mark.slow
def test_icl_resumed_run_reuses_its_stages_and_its_truth_is_the_exact_one(icl_run):
    before = json.loads((icl_run / "results.json").read_text())
    config = pipeline.PipelineConfig(workload="icl", preset="tiny")
    lines = []
    run = pipeline.collect(config, out_dir=icl_run, log=lines.append,
                           progress=False)  # the workload trains again (~20 s)
    assert sum("reused" in line for line in lines) == len(
        pipeline.FIXED_SIZE_STAGE_FIELDS), lines
    results = pipeline.evaluate(config, run)
    for name, values in before["methods"].items():
        np.testing.assert_allclose(results["methods"][name]["effects"],
                                   values["effects"], rtol=1e-6, atol=1e-9)
    # Independent: every 4-prompt scored by the workload, the effects by the
    # context-average definition (brute force over every 3-context).
    workload = run.workload
    masks = all_masks_of_size(workload.num_tasks, 4)
    scores = np.asarray(workload.exact_scores(masks), np.float64)
    table = {tuple(np.nonzero(row)[0]): s for row, s in zip(masks, scores,
                                                            strict=True)}
    truth = context_effects(workload.num_tasks, 4, table.__getitem__)
    np.testing.assert_allclose(run.truth_effects[0], truth, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(before["true_effects"], truth.mean(1), rtol=1e-5,
                               atol=1e-7)
    # The held-out truth is the forward passes of the held-out prompts.
    heldout = np.asarray(workload.exact_scores(run.masks[30:])).mean(1)
    np.testing.assert_allclose(before["heldout"]["true"], heldout, rtol=1e-6)
    assert (run.masks.sum(1) == 4).all() and len({tuple(r) for r in run.masks}) == 60


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    return run_tiny(tmp_path_factory, "rl")


@pytest.mark.slow
def test_rl_cli_run_reports_the_replicates_ceiling_and_intervals(rl_run):
    results = check_results(rl_run, "loo", num_tasks=4)
    assert results["regime"] == "finetune"
    assert results["ceiling"]["num_replicates"] == 4
    assert set(results["methods"]) == SURROGATES | {
        "kernel surrogate (exact), Banzhaf"}
    assert len(results["heldout"]["true"]) == 3
    printed = report.summary(results)
    assert "| ceiling (4 replicates) |" in printed and "LOO Spearman" in printed


@pytest.mark.slow
def test_rl_resumed_run_reuses_its_stages_and_replicates_follow_their_keys(rl_run):
    before = json.loads((rl_run / "results.json").read_text())
    config = pipeline.PipelineConfig(workload="rl", preset="tiny")
    lines = []
    run = pipeline.collect(config, out_dir=rl_run, log=lines.append, progress=False)
    assert sum("reused" in line for line in lines) == len(pipeline.STAGE_FIELDS)
    results = pipeline.evaluate(config, run)
    for name, values in before["methods"].items():
        np.testing.assert_allclose(results["methods"][name]["effects"],
                                   values["effects"], rtol=1e-6, atol=1e-9)
    assert run.loo_scores.shape == (4, 5, 4) and run.exact.shape == (4, 10, 4)
    loo = reliability.loo_reliability(run.loo_scores, seed=0)
    assert before["ceiling"]["loo_spearman_mean_target"] == pytest.approx(
        loo.mean_target)
    np.testing.assert_allclose(before["true_effects"],
                               (run.loo_scores[:, 1:] - run.loo_scores[:, :1])
                               .mean(0).mean(1), rtol=1e-6)
    # The random subsets: distinct, neither empty, full nor leave-one-out.
    assert set(run.masks.sum(1)) <= {1, 2} and len({tuple(r) for r in run.masks}) == 10
    # Independent: replicate r fine-tunes the stored θ* with the training
    # stream of fold_in(k_base, r) (k_base itself for r = 0), then evaluates.
    workload, theta = run.workload, run.theta
    k_base = pipeline.stage_keys(0)["base"]
    c = workload.config
    full = leave_one_out_masks(4)[:1]
    for r in (0, 2):
        stream = k_base if r == 0 else jax.random.fold_in(k_base, r)
        tuned = workload.train(theta, full[0], jax.random.fold_in(stream, 5),
                               iterations=c.finetune_iterations,
                               learning_rate=c.finetune_learning_rate)[0]
        np.testing.assert_allclose(run.loo_scores[r, 0], workload.evaluate(tuned),
                                   rtol=1e-4, atol=1e-2)
    # A folder of another seed is refused before any training.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "rl", "--preset", "tiny", "--seed", "1", "--out",
                  str(rl_run), "--quiet"])
    assert exit_info.value.code == 2


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--shots", "9"], "shots must be <= 8, the most demonstrations a prompt fits"),
    (["--num-subsets", "4000", "--num-heldout", "1000"],
     "5000 distinct prompts of 4 of 20 demonstrations were asked for, but only "
     "4845 exist"),
])
def test_icl_arguments_the_built_workload_refuses(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # two training steps: quick
        cli.main(["run", "icl", "--preset", "tiny", "--set", "num_steps=2",
                  "--set", "warmup_steps=1", *args,
                  "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
