"""First-order estimates of F(s) against the fine-tuning they stand for.

On one supervised workload (``modular`` or ``digits``, ``cpu`` preset), from
``θ*`` (trained on all tasks):

1. **Ground truth.** Real fine-tuning from ``θ*`` with the workload's
   ``finetune`` program on the all-tasks set, the K leave-one-out sets and
   ``--fit-subsets + --heldout-subsets`` random subsets (each drops the
   pipeline's number of tasks), ``--replicates`` paired replicates averaged;
   its split-half reliability is the *ceiling* of every agreement below.
2. **Estimators**, each an ``EstimationSettings`` (:data:`ESTIMATORS`; by
   default the library's default, linearized fine-tuning in the full parameter
   space and, where the fine-tuning optimizer is an ``estimation.Adam``, the
   Adam-preconditioned program; ``--estimators`` adds margin outputs, other
   projections and the convex solve), each also in its difference form, on the
   all-tasks, LOO and first ``--fit-subsets`` (256) random subsets.
   Errors: mean relative error of the mean-target score, the same per target
   column, Spearman across subsets (mean target and per target), Spearman of
   the estimated LOO effects with the fine-tuned ones (mean target), each
   Spearman with its bootstrap interval.
3. **Speed.** Each estimator on the fitting subsets against vmapped
   fine-tuning of them (one replicate, same chunk size), both compiled on a
   first call; the default estimator also at every other ``--num-subsets``
   (256: digits has only 140 fitting subsets; ``--num-subsets 256 1024`` for
   the larger sweep).
4. **Downstream.** Kernel (and linear) surrogates fitted to the estimated and
   to the fine-tuned scores of those subsets (the pipeline's
   cross-validated fit); LOO Spearman against the fine-tuned LOO effects and
   Spearman on ``--heldout-subsets`` (128) others, mean target.

Writes ``results/bench_estimation_<workload>.json`` (top-level
``relative_error_mean``, ``spearman_subsets``, ``loo_spearman``, ``speedup`` for
the default estimator) and prints them last.

    python benchmarks/bench_estimation.py --workload modular
    python benchmarks/bench_estimation.py --workload digits
    python benchmarks/bench_estimation.py --workload modular --estimators all
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time

import jax
import numpy as np
from _common import (
    REPO_ROOT,
    environment,
    format_table,
    parse_overrides,
    write_json,
)

from tasksurrogate_jax import attribution, metrics, reliability
from tasksurrogate_jax.chunking import pad_rows
from tasksurrogate_jax.estimation import Adam, EstimationSettings, difference_form
from tasksurrogate_jax.pipeline import WORKLOADS, fit_surrogates
from tasksurrogate_jax.subsets import fixed_size_masks, leave_one_out_masks

# Each also in its difference form, from the same run: ``EstimationSettings(
# difference=True)`` anchors at the workload's fine-tuning on all tasks with the
# run's key, which is replicate 0's all-tasks row of the ground truth here.
ESTIMATORS = {
    "linearized fine-tuning, d=512": EstimationSettings(proj_dim=512),
    "full space": EstimationSettings(proj_dim=None),
    "Adam-preconditioned, d=512": EstimationSettings(proj_dim=512,
                                                     preconditioner="adam"),
    "linearized fine-tuning, margin": EstimationSettings(output_mode="margin"),
    "linearized fine-tuning, d=128": EstimationSettings(proj_dim=128),
    "linearized fine-tuning, d=2048": EstimationSettings(proj_dim=2048),
    "Adam-preconditioned, d=2048": EstimationSettings(proj_dim=2048,
                                                      preconditioner="adam"),
    "convex solve, margin, ridge auto": EstimationSettings(
        method="solve", output_mode="margin"),
}
DEFAULT_RUN = ["linearized fine-tuning, d=512", "full space",
               "Adam-preconditioned, d=512"]
# The headline: the library's default settings.
DEFAULT = next(name for name, settings in ESTIMATORS.items()
               if settings == EstimationSettings())


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def interval(x, y, seed: int) -> list[float]:
    """Bootstrap 95% interval of Spearman(x, y) over the paired rows."""
    return list(reliability.loo_spearman_interval(x, y, num_resamples=1000,
                                                  seed=seed))


def errors(estimated, truth, num_loo: int, seed: int) -> dict:
    """Errors of ``estimated`` ``[1 + K + m, T]`` (all tasks, LOO, subsets)."""
    full, loo, subsets = 0, slice(1, 1 + num_loo), slice(1 + num_loo, None)
    est_mean, true_mean = estimated.mean(1), truth.mean(1)
    relative = np.abs(est_mean - true_mean) / np.abs(true_mean)
    effects_est = est_mean[loo] - est_mean[full]
    effects_true = true_mean[loo] - true_mean[full]
    return {
        "relative_error_mean": float(relative[subsets].mean()),
        "relative_error_max": float(relative[subsets].max()),
        # Median: a target the model fits perfectly has F = 0 in float32.
        "relative_error_columns": float(np.nanmedian(
            metrics.relative_error(true=truth[subsets], predicted=estimated[subsets]))),
        "spearman_subsets": float(metrics.spearman(true_mean[subsets],
                                                   est_mean[subsets])),
        "spearman_subsets_interval": interval(true_mean[subsets], est_mean[subsets],
                                              seed),
        "spearman_subsets_per_target": float(metrics.mean_spearman(
            truth[subsets], estimated[subsets])),
        "loo_spearman": float(metrics.spearman(effects_true, effects_est)),
        "loo_spearman_interval": interval(effects_true, effects_est, seed),
    }


def downstream(fit_masks, fit_scores, heldout_masks, heldout_true, true_effects,
               seed: int) -> dict:
    """Surrogates of ``(fit_masks, fit_scores)`` against the fine-tuned truth."""
    fits = fit_surrogates(fit_masks, fit_scores, seed=seed)
    out = {}
    for kind in ("kernel", "linear"):
        surrogate = fits[kind]
        effects = np.asarray(attribution.loo_scores(surrogate)).mean(1)
        predicted = np.asarray(surrogate.predict(heldout_masks)).mean(1)
        out[kind] = {
            "loo_spearman": float(metrics.spearman(true_effects, effects)),
            "loo_spearman_interval": interval(true_effects, effects, seed),
            "heldout_spearman": float(metrics.spearman(heldout_true, predicted)),
            "heldout_spearman_interval": interval(heldout_true, predicted, seed),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, choices=("modular", "digits"))
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--num-subsets", type=int, nargs="+", default=[256],
                    help="subset counts timed (e.g. 256 1024)")
    ap.add_argument("--fit-subsets", type=int, default=256,
                    help="subsets the errors and the surrogates are measured on")
    ap.add_argument("--heldout-subsets", type=int, default=128)
    ap.add_argument("--replicates", type=int, default=2,
                    help="paired fine-tuning replicates of the ground truth (>= 2)")
    ap.add_argument("--estimators", nargs="+", default=DEFAULT_RUN,
                    choices=[*ESTIMATORS, "all"], metavar="NAME",
                    help=f"'all' or names of {list(ESTIMATORS)} (default: "
                         f"{DEFAULT_RUN}); the Adam-preconditioned ones run where "
                         "the workload fine-tunes with estimation.Adam")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="FIELD=VALUE",
                    help="change a workload configuration field, e.g. hidden=1024 "
                         "(a bigger model: the speed ratio grows with its size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="default results/bench_estimation_<workload>.json")
    args = ap.parse_args()
    start = time.perf_counter()
    if "all" in args.estimators:
        args.estimators = list(ESTIMATORS)
    if args.replicates < 2:
        ap.error("--replicates must be >= 2 (the ceiling is their agreement)")
    entry = WORKLOADS[args.workload]
    workload = entry.factory(args.preset, **parse_overrides(args.overrides))
    num_tasks = workload.num_tasks
    key = jax.random.key(args.seed)
    size = num_tasks - entry.drop
    fit, held = args.fit_subsets, args.heldout_subsets
    distinct = math.comb(num_tasks, size)
    if fit + held > distinct:  # e.g. digits: C(10, 6) = 210 subsets in all
        fit, held = distinct * 2 // 3, distinct - distinct * 2 // 3
        print(f"only {distinct} distinct subsets drop {entry.drop} of {num_tasks} "
              f"tasks: {fit} to fit, {held} held out.")
    subsets = np.asarray(fixed_size_masks(jax.random.fold_in(key, 7), fit + held,
                                          num_tasks, subset_size=size, unique=True))
    loo = np.asarray(leave_one_out_masks(num_tasks))  # all tasks, then each dropped
    theta, base_seconds = timed(lambda: workload.base_params(key=key))
    print(f"{args.workload} {args.preset}: {num_tasks} tasks, θ* in "
          f"{base_seconds:.1f} s; fine-tuning {workload.finetune_spec.num_steps} "
          f"steps (batch {workload.finetune_spec.batch_size}).", flush=True)

    def finetune(masks, replicates):
        return np.asarray(workload.replicate_scores(
            masks, key=key, regime="finetune", replicates=replicates,
            base_params=theta, chunk_size=args.chunk_size, progress=False))

    def estimate(masks, settings):
        return np.asarray(workload.estimate(
            masks, key=key, base_params=theta, settings=settings,
            chunk_size=args.chunk_size).scores)

    # Ground truth with its ceiling (the sets the errors and surrogates use).
    all_rows = np.concatenate([loo, subsets])
    replicate_scores, truth_s = timed(lambda: finetune(all_rows, args.replicates))
    truth = replicate_scores.mean(0)
    num_loo = num_tasks
    subset_rows = slice(1 + num_loo, 1 + num_loo + fit)
    subset_ceiling = reliability.subset_reliability(replicate_scores[:, subset_rows],
                                                    seed=args.seed)
    loo_ceiling = reliability.loo_reliability(replicate_scores[:, :1 + num_loo],
                                              seed=args.seed)
    ceiling = {"spearman_subsets": subset_ceiling.mean_target,
               "loo_spearman": loo_ceiling.mean_target,
               "num_replicates": args.replicates}
    print(f"ground truth: {all_rows.shape[0]} sets x {args.replicates} replicates in "
          f"{truth_s:.0f} s; ceiling (agreement of two such truths): Spearman "
          f"across subsets {ceiling['spearman_subsets']:.3f}, LOO "
          f"{ceiling['loo_spearman']:.3f}", flush=True)
    truth_scored = truth[:1 + num_loo + fit]

    # Speed: every program compiled on a first call of whole chunks, then timed
    # on the fitting subsets (one replicate of fine-tuning).
    finetune(subsets[:args.chunk_size], 1)
    _, tune_s = timed(lambda: finetune(subsets[:fit], 1))
    print(f"  fine-tuning of the {fit} fitting subsets: {tune_s:.1f} s", flush=True)
    loo_chunks = pad_rows(loo, -(-len(loo) // args.chunk_size) * args.chunk_size)

    rows, estimates, speed = [], {}, []
    measured_all = replicate_scores[0, 0]  # the difference form's anchor run
    adam = isinstance(workload.finetune_spec.optimizer, Adam)
    for name in args.estimators:
        settings = ESTIMATORS[name]
        if settings.preconditioner == "adam" and not adam:
            print(f"  {name}: skipped (the workload does not fine-tune with "
                  "estimation.Adam)", flush=True)
            continue
        at_loo = estimate(loo_chunks, settings)[:len(loo)]  # compiles the chunk
        at_fit, seconds = timed(lambda settings=settings: estimate(subsets[:fit],
                                                                   settings))
        speed.append({"estimator": name, "num_subsets": fit, "finetune_s": tune_s,
                      "estimate_s": seconds, "speedup": tune_s / seconds})
        result = np.concatenate([at_loo, at_fit])
        anchored = np.asarray(difference_form(result, result[0], measured_all))
        for label, values in ((name, result), (f"{name}, difference form", anchored)):
            estimates[label] = values
            rows.append({"estimator": label, "seconds": seconds,
                         **errors(values, truth_scored, num_loo, args.seed)})
        print(f"  {name}: {seconds:.1f} s for the {fit} fitting subsets", flush=True)

    # Other subset counts: the default estimator on subsets drawn with repeats.
    timing_subsets = np.asarray(fixed_size_masks(
        jax.random.fold_in(key, 8), max(args.num_subsets), num_tasks,
        subset_size=size))
    sweep = sorted(set(args.num_subsets) - {fit})
    if sweep and DEFAULT not in estimates:  # compile it first
        estimate(timing_subsets[:args.chunk_size], ESTIMATORS[DEFAULT])
    for m in sweep:
        _, m_tune_s = timed(lambda m=m: finetune(timing_subsets[:m], 1))
        _, est_s = timed(lambda m=m: estimate(timing_subsets[:m],
                                              ESTIMATORS[DEFAULT]))
        speed.append({"estimator": DEFAULT, "num_subsets": m,
                      "finetune_s": m_tune_s, "estimate_s": est_s,
                      "speedup": m_tune_s / est_s})
        print(f"  m={m}: fine-tuning {m_tune_s:.1f} s, {DEFAULT} {est_s:.1f} s",
              flush=True)

    fit_masks = subsets[:fit]
    heldout = slice(1 + num_loo + fit, 1 + num_loo + fit + held)
    true_effects = truth[1:1 + num_loo].mean(1) - truth[0].mean()
    surrogate_args = (subsets[fit:fit + held],
                      truth[heldout].mean(1), true_effects, args.seed)
    downstream_rows = {"fine-tuned scores": downstream(
        fit_masks, truth[subset_rows], *surrogate_args)}
    for name, values in estimates.items():
        downstream_rows[f"estimated: {name}"] = downstream(
            fit_masks, values[1 + num_loo:], *surrogate_args)

    headline = next((r for r in rows if r["estimator"] == DEFAULT), rows[0])
    # The headline speed: the headline estimator's, at the count nearest 256.
    at_fit = min((row for row in speed if row["estimator"] == headline["estimator"]),
                 key=lambda row: abs(row["num_subsets"] - 256))
    kernel_gap = (downstream_rows["fine-tuned scores"]["kernel"]["loo_spearman"]
                  - downstream_rows[f"estimated: {headline['estimator']}"]["kernel"]
                  ["loo_spearman"])

    print(f"\nEstimates against fine-tuning from θ* ({args.replicates} replicates "
          f"averaged; first {fit} subsets and the {num_loo} LOO sets):\n")
    print(format_table(rows, ["estimator", "seconds", "relative_error_mean",
                              "relative_error_max", "relative_error_columns",
                              "spearman_subsets", "spearman_subsets_per_target",
                              "loo_spearman"]))
    print("\nSpeed against vmapped fine-tuning (both compiled first; fine-tuning "
          "one replicate):\n")
    print(format_table(speed, ["estimator", "num_subsets", "finetune_s",
                               "estimate_s", "speedup"]))
    print(f"\nSurrogates fitted to {fit} subsets, against the fine-tuned truth "
          f"(mean target; held out: {held} subsets):\n")
    print(format_table(
        [{"scores": name, "surrogate": kind, **values}
         for name, by_kind in downstream_rows.items()
         for kind, values in by_kind.items()],
        ["scores", "surrogate", "loo_spearman", "heldout_spearman"]))

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    wall_s = time.perf_counter() - start
    path = write_json(args.out or REPO_ROOT / f"results/bench_estimation_"
                      f"{args.workload}.json", {
        "benchmark": "bench_estimation", "environment": environment(),
        "workload": args.workload, "preset": args.preset, "config": vars(args),
        "finetune_steps": workload.finetune_spec.num_steps,
        "base_train_s": base_seconds, "ground_truth_s": truth_s,
        "ceiling": ceiling, "estimators": rows, "speed": speed,
        "downstream": downstream_rows, "peak_rss_gb": peak_gb, "wall_s": wall_s,
        "default_estimator": headline["estimator"],
        "kernel_loo_spearman_gap": kernel_gap,
        "relative_error_mean": headline["relative_error_mean"],
        "spearman_subsets": headline["spearman_subsets"],
        "loo_spearman": headline["loo_spearman"],
        "speedup": at_fit["speedup"],
    })
    print(f"\nwall time {wall_s:.0f} s, peak memory {peak_gb:.2f} GB (load "
          f"average {os.getloadavg()[0]:.1f}); wrote {path}")
    print(f"default estimator: {headline['estimator']}")
    print(f"ceiling: spearman_subsets {ceiling['spearman_subsets']:.3f}, "
          f"loo_spearman {ceiling['loo_spearman']:.3f}")
    print(f"kernel surrogate LOO Spearman, fine-tuned minus estimated scores: "
          f"{kernel_gap:+.3f}")
    print(f"relative_error_mean {headline['relative_error_mean']:.4f}")
    print(f"spearman_subsets {headline['spearman_subsets']:.3f} "
          f"{headline['spearman_subsets_interval']}")
    print(f"loo_spearman {headline['loo_spearman']:.3f} "
          f"{headline['loo_spearman_interval']}")
    print(f"speedup {at_fit['speedup']:.2f} (m={at_fit['num_subsets']})")


if __name__ == "__main__":
    main()
