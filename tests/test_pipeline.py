"""The pipeline, its report and the ``tasksurrogate`` command on the tiny preset."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from tasksurrogate_jax import pipeline
from tasksurrogate_jax.pipeline import cli, report
from tasksurrogate_jax.truth import reliability

TINY = ["run", "digits", "--preset", "tiny", "--num-subsets", "16",
        "--num-heldout", "8", "--value-samples", "50", "--proj-dim", "16",
        "--trak-proj-dim", "32", "--quiet"]
TINY_CONFIG = pipeline.PipelineConfig(
    workload="digits", preset="tiny", num_subsets=16, num_heldout=8,
    value_samples=50, proj_dim=16, trak_proj_dim=32)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main([*TINY, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_cli_runs_end_to_end_and_writes_the_report(first_run, capsys):
    results = json.loads((first_run / "results.json").read_text())
    for name in ("loo_effects.png", "interactions.png", "heldout.png"):
        assert (first_run / name).stat().st_size > 1000
    num_tasks = len(results["task_names"])
    assert num_tasks == 8
    assert results["regime"] == "finetune" and results["config"]["replicates"] == 4
    expected = {f"{kind} surrogate ({scores})" for kind in ("linear", "kernel")
                for scores in ("exact", "estimated")}
    expected |= {"influence", "tracin", "trak", "kernel surrogate (exact), Banzhaf"}
    assert set(results["methods"]) == expected
    for key in ("loo_spearman_mean_target", "loo_spearman_per_target",
                "heldout_spearman"):
        assert 0 < results["ceiling"][key] <= 1, key
    for name, values in results["methods"].items():
        assert len(values["effects"]) == num_tasks
        low, high = values["loo_spearman_interval"]
        assert low <= values["loo_spearman"] <= high, name
        assert len(values["loo_spearman_mean_target_interval"]) == 2, name
        if "surrogate" in name and "Banzhaf" not in name:
            low, high = values["heldout_spearman_interval"]
            assert low <= values["heldout_spearman"] <= high, name
    assert np.asarray(results["interaction_matrix"]).shape == (num_tasks, num_tasks)
    assert "interactions" not in results  # no pair-removal truth asked for
    assert len(results["heldout"]["true"]) == 8
    assert set(results["seconds"]) >= set(pipeline.STAGE_FIELDS)
    printed = report.summary(results)
    assert "| ceiling (4 replicates) |" in printed and "finetune regime" in printed


@pytest.mark.slow
def test_ceiling_is_the_reliability_of_the_stored_replicates(first_run):
    run = pipeline.collect(TINY_CONFIG, out_dir=first_run, log=lambda line: None,
                           progress=False)  # every stage read back
    assert run.loo_scores.shape == (4, 9, 64) and run.exact.shape == (4, 24, 64)
    results = pipeline.evaluate(TINY_CONFIG, run)
    loo = reliability.loo_reliability(run.loo_scores, seed=0)
    assert results["ceiling"]["loo_spearman_mean_target"] == loo.mean_target
    assert results["ceiling"]["loo_spearman_per_target"] == loo.mean
    truth = (run.loo_scores[:, 1:] - run.loo_scores[:, :1]).mean(0)
    np.testing.assert_allclose(results["true_effects"], truth.mean(1), rtol=1e-6)


@pytest.mark.slow
def test_rerun_reuses_every_stored_stage_and_gives_the_same_results(first_run):
    before = json.loads((first_run / "results.json").read_text())
    lines = []
    config = TINY_CONFIG
    results = pipeline.run_pipeline(config, out_dir=first_run, log=lines.append,
                                    progress=False)
    assert sum("reused" in line for line in lines) == len(pipeline.STAGE_FIELDS)
    for name, values in before["methods"].items():
        np.testing.assert_allclose(results["methods"][name]["effects"],
                                   values["effects"], rtol=1e-6, atol=1e-9)
    # Another damping: only the baselines stage is recomputed.
    lines.clear()
    other = dataclasses.replace(config, influence_damping=3.0)
    results = pipeline.run_pipeline(other, out_dir=first_run, log=lines.append,
                                    progress=False)
    recomputed = [line for line in lines if line.endswith("...")]
    assert recomputed == ["[baselines] ..."], lines
    assert not np.allclose(results["methods"]["influence"]["effects"],
                           before["methods"]["influence"]["effects"])


@pytest.mark.slow
def test_a_folder_of_another_workload_or_seed_is_refused(first_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*TINY, "--out", str(first_run), "--seed", "1"])
    assert exit_info.value.code == 2
    assert "different configuration" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["run", "nope"],
     "workload must be one of ['digits', 'icl', 'icl_regression', 'modular', 'rl']"),
    (["run", "modular", "--preset", "huge"], "preset must be one of"),
    (["run", "digits", "--replicates", "1"],
     "replicates must be >= 2 (a ceiling needs at least 2 replicates), got 1"),
    (["run", "digits", "--regime", "pretrain"], "invalid choice: 'pretrain'"),
    (["run", "modular", "--num-subsets", "2"], "num_subsets must be >= 4"),
    (["run", "modular", "--num-heldout", "1"], "num_heldout must be >= 3"),
    (["run", "modular", "--preset", "tiny", "--drop", "16"],
     "drop must be < the workload's 16 tasks"),
    (["run", "modular", "--set", "widht=3"], "unknown ModularConfig fields"),
    (["run", "modular", "--set", "width"], "expected FIELD=VALUE"),
    # ICL (fixed_size protocol) and RL: options that do not apply, bad sizes.
    (["run", "icl", "--regime", "scratch"],
     "regime does not apply to workload 'icl' (fixed_size protocol)"),
    (["run", "icl", "--drop", "3"], "drop does not apply to workload 'icl'"),
    (["run", "icl", "--proj-dim", "64"], "proj_dim does not apply to workload 'icl'"),
    (["run", "icl", "--chunk-size", "8"], "chunk_size does not apply to workload"),
    (["run", "icl", "--baselines", "tracin"],
     "workload 'icl' has no baselines, got ['tracin']"),
    (["run", "icl", "--shots", "1"], "shots must be >= 2"),
    (["run", "icl", "--value-samples", "0"],
     "value_samples must be >= 1 for the fixed_size protocol"),
    (["run", "icl", "--preset", "tiny", "--set", "widht=3"],
     "unknown ICLConfig fields ['widht']"),
    (["run", "rl", "--shots", "4"],
     "shots does not apply to workload 'rl' (loo protocol)"),
    (["run", "rl", "--estimation-method", "solve"],
     "estimation settings (estimation_method): method must be one of ('pg', "
     "'awr'), got 'solve'"),
    (["run", "rl", "--influence-damping", "3"],
     "influence_damping does not apply to workload 'rl'"),
    (["run", "rl", "--baselines", "influence"], "workload 'rl' has no baselines"),
    (["run", "rl", "--preset", "huge"],
     "preset must be one of ['cpu', 'paper', 'tiny'] for workload 'rl'"),
    (["run", "rl", "--replicates", "1"], "a ceiling needs at least 2 replicates"),
    (["run", "rl", "--preset", "tiny", "--set", "gamma=0.9"],
     "unknown RLConfig fields ['gamma']"),
    (["run", "rl", "--preset", "tiny", "--num-subsets", "8"],
     "num_subsets + num_heldout = 11 distinct subsets of 4 tasks neither empty, "
     "full nor leave-one-out were asked for, but only 10 exist"),
    (["run", "rl", "--preset", "tiny", "--drop", "4"],
     "drop applies to design 'fixed' only, got drop=4 with design 'uniform'"),
    (["run", "rl", "--preset", "tiny", "--design", "fixed", "--drop", "4"],
     "drop must be < the workload's 4 tasks"),
    (["run", "digits", "--design", "fixed", "--keep", "0.5"],
     "keep applies to design 'bernoulli' only"),
    (["run", "digits", "--drop", "3"],
     "drop applies to design 'fixed' only, got drop=3 with design 'bernoulli'"),
    (["run", "digits", "--design", "bernoulli", "--keep", "1.0"],
     "keep must be in (0, 1)"),
])
def test_bad_arguments_exit_with_status_2_and_a_message(args, message, capsys,
                                                        tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_list_and_the_installed_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "tasksurrogate_jax.pipeline.cli", "list"],
        capture_output=True, text=True, check=True)
    assert "modular: presets paper, cpu, tiny" in done.stdout
    assert "digits: presets cpu, random, tiny" in done.stdout


# Random masks repeat rows here: the search's duplicate warning is expected.
@pytest.mark.filterwarnings("ignore::tasksurrogate_jax.core.surrogates.DuplicateMasksWarning")
def test_ridge_grid_follows_the_dtype_the_fit_computes_in():
    """float64 scores are fit in float32 without x64: no ridge below float32's
    rounding error is searched (the search would warn and could pick it)."""
    import warnings

    import jax

    rng = np.random.default_rng(0)
    masks = (rng.random((240, 10)) < 0.5).astype(np.float64)
    scores = (masks @ rng.normal(size=10))[:, None] + 0.1 * rng.normal(size=(240, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fits = pipeline.fit_surrogates(masks, scores)
    eps = np.finfo(jax.dtypes.canonicalize_dtype(np.float64)).eps
    assert float(fits["search"].ridges.min()) >= 10 * eps * 240


@pytest.mark.filterwarnings("ignore::tasksurrogate_jax.core.surrogates.DuplicateMasksWarning")
def test_large_fits_use_the_nystrom_surrogate_and_a_holdout_search(monkeypatch):
    from tasksurrogate_jax.core import surrogates

    rng = np.random.default_rng(0)
    masks = (rng.random((120, 8)) < 0.5).astype(np.float64)
    scores = np.stack([masks @ rng.normal(size=8) + np.sin(masks.sum(1)),
                       (masks[:, 0] * masks[:, 1]) + 0.1 * rng.normal(size=120)], 1)
    small = pipeline.fit_surrogates(masks, scores)
    assert small["search"].method == "loo"
    monkeypatch.setattr(surrogates, "AUTO_EXACT_MAX_SUBSETS", 50)
    large = pipeline.fit_surrogates(masks, scores)
    assert large["search"].method == "holdout"
    # Below the default number of centres every distinct mask is a centre: the
    # Nyström fit is the exact fit with the same hyperparameters.
    exact = surrogates.fit_kernel_surrogate(
        masks, scores, gamma=float(large["search"].gamma),
        ridge=float(large["search"].ridge), solver="exact")
    # In float32: conjugate gradients stopped at sqrt(eps32) = 3.5e-4 against
    # a Cholesky solve (see tests/test_nystrom.py's AGREE).
    np.testing.assert_allclose(large["kernel"].predict(masks), exact.predict(masks),
                               rtol=1e-3, atol=1e-3 * np.abs(scores).max())


@pytest.mark.slow
def test_pairs_protocol_compares_interactions_with_a_pair_removal_truth(tmp_path):
    """``protocol="pairs"``: every pair's ``F(full − i − j)`` in the run's
    paired replicates, the interactions from them (checked against the
    workload's own retraining here), their ceiling, and each method's
    agreement; the stages are reused by a rerun."""
    from tasksurrogate_jax.downstream import interactions

    # 4 replicates (the pairs protocol's default is 8): the check below
    # retrains them.
    config = dataclasses.replace(TINY_CONFIG, protocol="pairs", replicates=4)
    tiny = pipeline.make_workload(config)
    assert pipeline.check_config(dataclasses.replace(
        TINY_CONFIG, protocol="pairs"), tiny).replicates == 8
    assert pipeline.check_config(TINY_CONFIG, tiny).replicates == 4
    lines = []
    results = pipeline.run_pipeline(config, out_dir=tmp_path, log=lines.append,
                                    progress=False)
    inter = results["interactions"]
    assert len(inter["pairs"]) == 28  # all pairs of 8 tasks
    run = pipeline.collect(config, out_dir=tmp_path, log=lines.append,
                           progress=False)
    assert sum("reused" in line for line in lines) == len(pipeline.PAIRS_STAGE_FIELDS)
    masks = interactions.pair_removal_masks(8)
    scores = run.workload.replicate_scores(
        masks, key=pipeline.stage_keys(0)["base"], regime="finetune", replicates=4,
        base_params=run.theta, chunk_size=64, store_dir=None, progress=False)
    truth = interactions.pair_interactions(scores)
    np.testing.assert_allclose(inter["true"], truth.mean.mean(1), rtol=1e-4,
                               atol=1e-6)
    assert inter["ceiling"] == pytest.approx(
        interactions.interaction_ceiling(truth, seed=0).mean_target, abs=1e-6)
    assert {"kernel surrogate (exact)", "kernel surrogate (estimated)",
            "kernel surrogate (exact), Banzhaf"} <= set(inter["spearman"])
    # A linear surrogate has no interactions: only its pair-removal error.
    assert not any("linear" in name for name in inter["spearman"])
    for name in ("kernel surrogate (exact)", "kernel surrogate (estimated)"):
        assert -1 <= inter["spearman"][name] <= 1
    for name in ("linear surrogate (exact)", "kernel surrogate (exact)"):
        assert 0 <= inter["pair_removal_error"][name]
    gain = inter["kernel_minus_linear_pair_removal_error"]["exact"]
    low, high = gain["difference_interval"]
    assert low <= gain["difference"] <= high
    assert "kernel minus linear normalized error of F(-i-j)" in report.summary(results)
    printed = report.summary(results)
    assert "interactions against the pair-removal truth (28 pairs" in printed
    assert "| ceiling (4 replicates) |" in printed
    # The held-out subsets: the same kernel-minus-linear comparison, whose two
    # errors are the methods' held-out normalized errors.
    for scores in ("exact", "estimated"):
        held = results["heldout"]["kernel_minus_linear_error"][scores]
        for kind, side in (("kernel", "a"), ("linear", "b")):
            assert held[side] == pytest.approx(
                results["methods"][f"{kind} surrogate ({scores})"]["normalized_error"],
                rel=1e-5)
        assert held["difference"] == pytest.approx(held["a"] - held["b"])
        low, high = held["difference_interval"]
        assert low <= held["difference"] <= high
    assert "normalized error on the held-out subsets" in printed


def test_pairs_protocol_needs_a_leave_one_out_workload():
    from tasksurrogate_jax.workloads import registry

    with pytest.raises(ValueError, match="protocol 'pairs' does not apply to "
                                         "workload 'icl'"):
        pipeline.check_applies(pipeline.PipelineConfig(workload="icl",
                                                       protocol="pairs"),
                               registry.registered("icl").kind)
    with pytest.raises(ValueError, match="max_pairs does not apply"):
        pipeline.check_applies(pipeline.PipelineConfig(max_pairs=10),
                               registry.registered("digits").kind)
    with pytest.raises(ValueError, match="protocol must be None or one of"):
        pipeline.PipelineConfig(protocol="triples")


def test_cli_options_are_the_config_fields_with_their_docstring_help():
    parser = cli.build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    options = {a.dest: a for a in run._actions}
    for field in dataclasses.fields(pipeline.PipelineConfig):
        assert field.name in options, field.name
        assert options[field.name].help, field.name
    helps = cli.field_help()
    assert helps["max_pairs"].startswith("the \"pairs\" protocol retrains every pair")
    assert "``" not in helps["design"] and ":class:" not in helps["estimation_method"]
    args = parser.parse_args(["run", "digits", "--bootstrap-resamples", "50",
                              "--design", "bernoulli", "--keep", "0.6",
                              "--proj-dim", "full", "--baselines", "influence",
                              "--set", "num_steps=3", "--estimation-difference"])
    config = cli._config(args)
    assert (config.bootstrap_resamples, config.design, config.keep, config.proj_dim,
            config.baselines, config.overrides, config.estimation_difference) == (
        50, "bernoulli", 0.6, "full", ("influence",), (("num_steps", 3),), True)
    assert cli._config(parser.parse_args(["run", "rl"])) == pipeline.PipelineConfig(
        workload="rl")


def test_estimation_overrides_leave_the_path_points_where_they_do_not_apply():
    # The modular workload re-linearizes along the fine-tuning path (full
    # space); an override to the convex solve or to a projection linearizes at
    # θ* only, and one that keeps full-space fine-tuning keeps the points.
    def points(**fields):
        config = pipeline.PipelineConfig(workload="modular", preset="tiny", **fields)
        workload = pipeline.make_workload(config)
        config = pipeline.check_config(config, workload)
        return pipeline.configured_workload(config, workload).estimation

    assert points().linearization_points == 5
    assert points(output_mode="logits").linearization_points == 5
    solve = points(estimation_method="solve", proj_dim=32)
    assert (solve.method, solve.proj_dim) == ("solve", 32)
    assert solve.linearization_points == 1
    assert points(proj_dim=64).linearization_points == 1
