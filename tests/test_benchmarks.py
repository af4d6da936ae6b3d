"""The benchmark scripts at their ``--quick`` sizes, so that none can rot.

Each slow test runs one script as a subprocess (``--quick --out <tmp>/x.json``)
and checks the JSON it writes: the keys, and values in plausible ranges (a
timing positive, a correlation in [-1, 1], a check that must pass). The
subprocesses share pytest's compilation cache. The fast tests check
``device_check.py``'s argument errors and ratios without running JAX.
``bench_estimation.py`` and ``bench_factored.py`` at ``--quick`` sizes are
tested in ``test_shared_finetune.py``.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def run_quick(tmp_path, request):
    """``run_quick(script, *args)``: runs ``benchmarks/<script> --quick --out
    <tmp>/x.json *args`` (CPU, 10-minute limit) and returns the JSON."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cache = getattr(request.config, "cache", None)
    if cache is not None and "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache.mkdir("jax-compilation-cache"))
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

    def run(script, *args, out="x.json"):
        path = tmp_path / out
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(path),
             *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
            check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads(path.read_text())

    return run


def positive(*values):
    for value in values:
        assert isinstance(value, (int, float)) and value > 0, value


def correlation(*values):
    for value in values:
        assert isinstance(value, (int, float)) and -1.0 <= value <= 1.0, value


def finite(values):
    assert values and all(isinstance(v, (int, float)) and math.isfinite(v)
                          for v in values), values


@pytest.mark.slow
def test_bench_surrogates(run_quick):
    out = run_quick("bench_surrogates.py")
    assert [(r["m"], r["dtype"]) for r in out["fit"]] == [(100, "float32"),
                                                          (100, "float64")]
    for record in out["fit"]:
        assert record["agree"], record["rel_diff"]
        positive(record["ours"]["best"], record["sklearn"]["best"], record["ratio"],
                 record["compile_s"])
    for record in out["selection"]:
        for method in ("sklearn", "loo", "kfold"):
            assert any(math.isclose(record[method]["gamma"], gamma, rel_tol=1e-6)
                       for gamma in out["config"]["gammas"]), method
            positive(record[method]["best"])


@pytest.mark.slow
def test_bench_scale(run_quick):
    out = run_quick("bench_scale.py")
    assert [r["solver"] for r in out["surrogate"]] == ["exact", "nystrom"]
    for row in out["surrogate"]:
        assert row["num_subsets"] == 300
        positive(row["fit_s"], row["predict_s"], row["peak_rss_gb"])
        assert row["heldout_spearman"] > 0.8  # a smooth planted function
    est = out["estimation"]
    assert est["num_subsets"] == 64 and est["all_finite"]
    positive(est["seconds"], est["ms_per_subset"])
    shard = out["sharding"]
    for what, diff in shard["max_abs_diff"].items():
        assert diff <= 1e-4 * max(1.0, shard["max_abs_value"][what]), what
    positive(*shard["chunk64_mib_per_device"].values(), *shard["seconds"].values())


@pytest.mark.slow
def test_bench_retraining(run_quick):
    out = run_quick("bench_retraining.py")
    assert out["preset"] == "tiny" and out["num_subsets"] == 4
    positive(*out["seconds_vmap"], *out["seconds_loop"], out["seconds_compile_vmap"],
             out["speedup_loop_over_vmap"], out["peak_rss_bytes"])
    assert 0.5 <= out["accuracy_agreement"] <= 1.0
    # The two programs round differently; the mean target loss stays close.
    assert out["max_rel_mean_loss_diff"] < 0.5
    assert out["memory_vmap_program"]["total_bytes"] > 0


@pytest.mark.slow
def test_modular_cpu_preset(run_quick):
    out = run_quick("modular_cpu_preset.py")
    num_tasks, num_targets = out["num_tasks"], out["num_targets"]
    assert out["num_runs"] == num_tasks + 1 + 4
    assert len(out["loo_effect_mean_loss"]) == num_tasks
    finite(out["loo_effect_mean_loss"])
    # The accuracy of the full set alone: a multiple of 1 / T (0/1 per target).
    correct = out["full_test_accuracy"] * num_targets
    assert correct == pytest.approx(round(correct), abs=1e-6)
    for name in ("full_test_accuracy", "loo_accuracy_min",
                 "random_subsets_accuracy_mean"):
        assert 0.0 <= out[name] <= 1.0, name
    assert out["loo_effect_min"] <= out["loo_effect_max"]
    positive(out["full_mean_target_loss"], out["seconds_total_training"])


@pytest.mark.slow
def test_bench_gradients(run_quick):
    (result,) = run_quick("bench_gradients.py")["results"]
    assert result["proj_dim"] == 32 and result["num_examples"] == 64
    assert set(result["ours_by_batch_size"]) == {"16", "64"}
    for record in result["ours_by_batch_size"].values():
        assert record["agree_max_rel_diff_lt_1e-4"], record["max_rel_diff"]
        positive(record["examples_per_s"], record["compile_s"],
                 record["throughput_ratio_ours_over_loop"])
    positive(result["loop"]["examples_per_s"], result["dense_p_bytes"])


@pytest.mark.slow
def test_bench_icl_linearization(run_quick):
    out = run_quick("bench_icl_linearization.py")
    positive(out["seconds"], out["designs"]["probe"]["train_seconds"])
    rows = out["designs"]["probe"]["shots"]["3"]["rows"]
    assert {r["anchor"] for r in rows} == {"mean", "one", "nearest-8"}
    for row in rows:
        assert 0.0 <= row["median_relative_error"] < 10.0
        correlation(row["spearman"], row["spearman_mean_target"])


@pytest.mark.slow
def test_bench_icl_selection(run_quick):
    out = run_quick("bench_icl_selection.py", "--family", "smooth")
    assert len(out["draws"]) == 2
    for draw in out["draws"]:
        correlation(draw["estimate_spearman"])
        for method in draw["methods"].values():
            correlation(method["effect_spearman"], method["heldout_spearman"])
    choosers = out["summary"]["choosers"]
    assert {"linear (exact)", "kernel (exact)", "random prompt"} <= set(choosers)
    for chooser in choosers.values():
        loss = chooser["target_loss"]
        assert math.isfinite(loss["mean"]) and loss["low"] <= loss["high"]


@pytest.mark.slow
def test_bench_rl_selection(run_quick):
    out = run_quick("bench_rl_selection.py")
    assert len(out["draws"]) == 2 and "summary" in out
    positive(out["total_seconds"])
    for method in out["methods"].values():
        correlation(method["loo_spearman"])
    for draw in out["draws"]:
        finite(list(draw["mean_return"].values()))


@pytest.mark.slow
def test_modular_attribution_study(run_quick):
    out = run_quick("modular_attribution_study.py")
    (ceiling,) = out["ceilings"]
    correlation(ceiling["loo_spearman"], ceiling["heldout_spearman"])
    assert {r["num_fit"] for r in out["rows"]} == {6, 12}
    for row in out["rows"]:
        correlation(row["loo_spearman"], row["heldout_spearman"])


@pytest.mark.slow
def test_parity_reference(run_quick):
    out = run_quick("parity_reference.py")
    checked = [r for r in out["fixed"] if r["expected"] is not None]
    assert len(checked) == 2 and all(r["check"] == "PASS" for r in checked)
    (selected,) = out["selected"]
    correlation(selected["spearman"])
    positive(out["seconds"])


@pytest.mark.slow
def test_bench_defaults(run_quick):
    out = run_quick("bench_defaults.py")
    assert out["results"]
    for result in out["results"]:
        for summary in result["summary"].values():
            correlation(summary["default"], summary["best"])
            assert summary["gap"] == pytest.approx(summary["default"]
                                                   - summary["best"])
    positive(out["wall_s"])


@pytest.mark.slow
def test_bench_interactions(run_quick):
    out = run_quick("bench_interactions.py")
    assert out["quick"] and out["num_pairs"] == math.comb(out["num_tasks"], 2)
    correlation(out["ceiling"]["per_target"], out["ceiling"]["mean_target"])
    positive(*out["seconds"].values())


@pytest.mark.slow
def test_device_check_quick(run_quick):
    out = run_quick("device_check.py")
    assert out["failed"] == [], {p: out["parts"][p].get("output_tail")
                                 for p in out["failed"]}
    device = out["device"]
    assert device["platform"] == "cpu" and device["device_count"] >= 1
    assert set(device["versions"]) >= {"python", "jax", "jaxlib", "flax", "optax"}
    parts = out["parts"]
    for part in parts.values():
        positive(part["wall_s"])
    assert parts["tests"]["figures"]["passed"] > 0
    assert "failed" not in parts["tests"]["figures"]
    correlation(parts["main_job"]["figures"]["ceiling_loo_spearman"],
                *parts["main_job"]["figures"]["loo_spearman"].values())
    positive(parts["retraining"]["figures"]["vmap_s"],
             parts["estimation"]["figures"]["per_subset_s"])


def _device_check():
    spec = importlib.util.spec_from_file_location("device_check",
                                                  BENCHMARKS / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_check_ratios_against_a_cpu_reference():
    check = _device_check()
    mine = {"retraining": {"figures": {"vmap_s": 1.0, "loop_s": 4.0}},
            "estimation": {"figures": {"per_subset_s": 0.5}}}
    cpu = {"parts": {"retraining": {"figures": {"vmap_s": 4.0, "loop_s": 4.0}},
                     "estimation": {"figures": {"per_subset_s": None}}}}
    assert check.ratios(mine, cpu) == {"retraining.vmap_s": 0.25,
                                       "retraining.loop_s": 1.0}


def test_device_check_pytest_counts():
    counts = _device_check()._pytest_counts("...\n3 failed, 120 passed, "
                                            "2 skipped in 61.2s\n")
    assert counts == {"failed": 3, "passed": 120, "skipped": 2}


@pytest.mark.parametrize("args, message", [
    (["--cpu-reference", "no/such.json"], "--cpu-reference no/such.json"),
    (["--timeout-scale", "0"], "--timeout-scale must be positive"),
    (["--parts", "nonsense"], "invalid choice"),
])
def test_device_check_bad_input(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _device_check().main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("quick", [False, True])
def test_device_check_commands_name_files_that_exist(quick, tmp_path):
    commands = _device_check().commands(quick, tmp_path, "2")
    assert set(commands) == {"environment", "tests", "main_job", "retraining",
                             "estimation", "scale"}
    scripts = [arg for command in commands.values() for arg in command
               if arg.endswith(".py")]
    assert len(scripts) >= 3 + 3 * quick  # the benchmarks, the quick test files
    for script in scripts:
        assert (ROOT / script).is_file(), script
