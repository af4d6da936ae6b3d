"""First-order estimates of F(s) against the fine-tuning they stand for, and
against influence functions, on the LOO effects the pipeline reports.

On one supervised workload (``digits`` or ``modular``; ``--preset``), from
``θ*`` (trained on all tasks):

1. **Ground truth** (the pipeline's ``"loo"`` protocol): real fine-tuning from
   ``θ*`` with the workload's ``finetune`` program on the all-tasks set, the
   K leave-one-out sets and ``--fit-subsets + --heldout-subsets`` random
   subsets that each drop the pipeline's number of tasks, ``--replicates``
   (4) paired batch orders averaged. ``ceiling`` is ``pipeline.ceiling``: the
   agreement of two such truths (split-half reliability), per target and on
   the mean target.
2. **Estimators** (:data:`ESTIMATORS`, ``--estimators``; by default
   ``"default"``, the workload's own settings ``workload.estimation``, as the
   pipeline runs it), each run on the LOO sets and the fitting subsets
   with batch orders other than the truth's (``key`` ``fold_in(seed, 11)``,
   as the pipeline's estimation stage has its own key). Linearized
   fine-tuning runs ``finetune.linearized_finetune_scores`` with the
   settings' resolved projection (``resolved_projection``: ``dense`` or
   ``factored``) and dimension. Per estimator: LOO Spearman of its LOO
   effects read directly (per target and mean target), and of the kernel and
   linear surrogates fitted to its scores on the fitting subsets (the
   pipeline's ``fit_surrogates``), its one-time feature seconds and its
   per-subset seconds.
3. **Influence** at the pipeline's defaults (``baselines.influence_scores``,
   damping ``"auto"``, Gauss-Newton) and the surrogates on the exact scores.
   ``paired_interval_estimated_kernel_minus_influence``: the 95% bootstrap
   interval over targets of the per-target difference of LOO Spearman,
   kernel surrogate on the headline estimator's scores (``--headline``,
   default ``"default"``) minus influence.
4. **Speed**: fine-tuning (``--speed-finetune`` subsets, one replicate,
   vmapped in chunks of ``--chunk-size``, compiled first) against the
   headline estimator on ``--speed-subsets`` (1,024) subsets, one replicate,
   in chunks of ``--estimation-chunk-size`` (default: the library's,
   ``finetune.SHARED_CHUNK_SIZE`` for the factored projection), compiled
   first, features included; both per subset (the fine-tuning's figure scaled
   linearly: a chunk's cost does not depend on the number of chunks).
   ``speedup_m1024`` is their ratio; ``p_over_Cd`` is its flop bound
   ``p / (C d)`` (a fine-tuning step costs about ``6 B p`` flops, a shared
   linearized step about ``4 K C d`` with ``K`` a little over ``B``).

Writes ``--out`` (default ``results/bench_estimation_<workload>_<preset>
.json``) with top-level ``speedup_m1024``, ``loo_spearman_per_target``
(method -> value: ``"kernel surrogate (estimated)"``, ``"kernel surrogate
(exact)"``, ``"linear surrogate (...)"``, ``"LOO estimates (direct)"``,
``"influence"``), ``loo_spearman_mean_target`` (the same),
``paired_interval_estimated_kernel_minus_influence``, ``ceiling``,
``peak_rss_gb`` (and ``peak_rss_gb_after`` each phase), ``p_over_Cd``,
``feature_s`` and ``per_subset_s`` (estimation) beside
``finetune_per_subset_s``, and the tables.

    python benchmarks/bench_estimation.py --workload digits --preset wide
    python benchmarks/bench_estimation.py --workload digits --preset cpu
    python benchmarks/bench_estimation.py --workload digits --preset wide \\
        --estimators default "factored, d=1024" "factored, d=8192"
    python benchmarks/bench_estimation.py --quick      # CI: digits tiny, < 60 s

``--store-dir`` keeps the ground truth's chunks, so that a rerun (other
estimators) reads it back; its ``ground_truth_s`` is then the reading.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import time

import jax
import numpy as np
from _common import REPO_ROOT, environment, format_table, parse_overrides, write_json

from tasksurrogate_jax.core import metrics
from tasksurrogate_jax.core.subsets import fixed_size_masks, leave_one_out_masks
from tasksurrogate_jax.downstream import attribution
from tasksurrogate_jax.estimate import baselines
from tasksurrogate_jax.estimate.estimation import EstimationSettings
from tasksurrogate_jax.estimate.finetune import (
    Adam,
    default_chunk_size,
    linearized_finetune_scores,
)
from tasksurrogate_jax.estimate.projection import num_parameters
from tasksurrogate_jax.pipeline import ceiling, fit_surrogates
from tasksurrogate_jax.truth import reliability
from tasksurrogate_jax.workloads.digits import digits_workload
from tasksurrogate_jax.workloads.modular import modular_workload

# Factories and tasks dropped per random subset (the pipeline's defaults).
WORKLOADS = {"digits": (digits_workload, 4), "modular": (modular_workload, 3)}

ESTIMATORS = {
    "default": None,  # the workload's own (workload.estimation)
    "full space": EstimationSettings(proj_dim="full"),
    "dense, d=512": EstimationSettings(proj_dim=512, projection="dense"),
    "factored, d=1024": EstimationSettings(proj_dim=1024, projection="factored",
                                          output_mode="logits"),
    "factored, d=2048": EstimationSettings(proj_dim=2048, projection="factored",
                                          output_mode="logits"),
    "factored, d=4096": EstimationSettings(proj_dim=4096, projection="factored",
                                          output_mode="logits"),
    "factored, d=8192": EstimationSettings(proj_dim=8192, projection="factored",
                                          output_mode="logits"),
    "factored, d=4096, 1 batch order": EstimationSettings(
        proj_dim=4096, projection="factored", output_mode="logits", batch_orders=1),
    "factored, d=4096, margin": EstimationSettings(
        proj_dim=4096, projection="factored", output_mode="margin"),
    "factored, d=8192, margin": EstimationSettings(
        proj_dim=8192, projection="factored", output_mode="margin"),
    "factored, d=16384, margin": EstimationSettings(
        proj_dim=16384, projection="factored", output_mode="margin"),
    "factored, d=32768, margin": EstimationSettings(
        proj_dim=32768, projection="factored", output_mode="margin"),
    "Adam-preconditioned, d=512": EstimationSettings(proj_dim=512,
                                                     preconditioner="adam"),
    "convex solve, margin, ridge auto": EstimationSettings(
        method="solve", output_mode="margin"),
}
DEFAULT_RUN = ["default"]
KERNEL_ESTIMATED = "kernel surrogate (estimated)"


def resolved(settings: EstimationSettings, workload, theta) -> tuple[str, str, object]:
    """``(projection, output_mode, proj_dim)`` the settings run with on this
    workload (its estimation record)."""
    record = workload.with_estimation(settings).estimation_record(theta)
    proj_dim = None if record["proj_dim"] == "full" else record["proj_dim"]
    return record["projection"], record["output_mode"], proj_dim


def estimate(workload, masks, settings: EstimationSettings, *, key, theta,
             chunk_size: int):
    """``(scores [m, T], seconds {"features", "subsets"} or None)``.

    Linearized fine-tuning as ``SupervisedWorkload.estimate`` runs it (the
    projection's key ``fold_in(key, 1)``, the batches of ``key``), with the
    settings' resolved projection; the convex solve through the workload."""
    if settings.method != "finetune":
        return np.asarray(workload.estimate(masks, key=key, base_params=theta,
                                            settings=settings,
                                            chunk_size=chunk_size).scores), None
    projection, output_mode, proj_dim = resolved(settings, workload, theta)
    result = linearized_finetune_scores(
        workload.apply_fn, theta, workload.data, workload.target, masks,
        finetune=workload.finetune_spec, key=jax.random.fold_in(key, 1),
        batch_key=key, proj_dim=proj_dim, output_mode=output_mode,
        projection=projection, preconditioner=settings.preconditioner,
        batch_orders=settings.batch_orders, chunk_size=chunk_size,
        linearization_points=settings.linearization_points)
    return np.asarray(jax.block_until_ready(result.scores)), result.seconds


def rss_gb() -> float:
    """Peak resident memory of this process so far, GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def loo_agreement(effects, true_effects) -> dict:
    """Per-target and mean-target LOO Spearman of ``[K, T]`` effects."""
    corr = metrics.loo_correlation(true_effects=true_effects,
                                   predicted_effects=effects)
    return {"per_target": float(corr.mean), "mean_target": float(corr.mean_target),
            "_per_target_values": np.asarray(corr.per_target)}


def surrogate_agreement(fit_masks, fit_scores, true_effects, seed) -> dict:
    """LOO agreement of the kernel and linear surrogates of the scores."""
    fits = fit_surrogates(fit_masks, fit_scores, seed=seed)
    return {kind: loo_agreement(np.asarray(attribution.loo_scores(fits[kind])),
                                true_effects) for kind in ("kernel", "linear")}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default=None, choices=("modular", "digits"))
    ap.add_argument("--preset", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke test: digits tiny, few subsets (< 60 s)")
    ap.add_argument("--fit-subsets", type=int, default=None,
                    help="random subsets the surrogates are fitted on (96)")
    ap.add_argument("--heldout-subsets", type=int, default=None,
                    help="random subsets of the ceiling's held-out part (32)")
    ap.add_argument("--replicates", type=int, default=None,
                    help="paired fine-tuning replicates of the ground truth (4)")
    ap.add_argument("--estimators", nargs="+", default=None,
                    choices=[*ESTIMATORS, "all"], metavar="NAME",
                    help=f"'all' or names of {list(ESTIMATORS)} (default "
                         f"{DEFAULT_RUN}); the Adam-preconditioned one runs where "
                         "the workload fine-tunes with finetune.Adam")
    ap.add_argument("--headline", default="default", choices=list(ESTIMATORS),
                    metavar="NAME",
                    help="the estimator whose scores the methods table, the "
                         "paired interval and the speed use (default: 'default',"
                         " the workload's own settings)")
    ap.add_argument("--speed-subsets", type=int, default=None,
                    help="subsets the headline estimator is timed on (1024)")
    ap.add_argument("--speed-finetune", type=int, default=None,
                    help="subsets fine-tuning is timed on (64)")
    ap.add_argument("--no-influence", action="store_true",
                    help="leave out the influence baseline")
    ap.add_argument("--chunk-size", type=int, default=64,
                    help="subsets per compiled call of fine-tuning (64)")
    ap.add_argument("--estimation-chunk-size", type=int, default=None,
                    help="subsets per compiled call of the estimators (default: "
                         "the library's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="FIELD=VALUE",
                    help="change a workload configuration field, e.g. hidden=512")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store-dir", default=None,
                    help="keep the ground truth's fine-tuning chunks here (a "
                         "rerun with the same sizes reads them back)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    full = {"workload": "digits", "preset": "cpu", "fit_subsets": 96,
            "heldout_subsets": 32, "replicates": 4, "speed_subsets": 1024,
            "speed_finetune": 64, "estimators": DEFAULT_RUN}
    quick = {"preset": "tiny", "fit_subsets": 24, "heldout_subsets": 8,
             "replicates": 2, "speed_subsets": 64, "speed_finetune": 16}
    for field, value in {**full, **(quick if args.quick else {})}.items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    if "all" in args.estimators:
        args.estimators = list(ESTIMATORS)
    if args.headline not in args.estimators:
        args.estimators = [args.headline, *args.estimators]
    if args.replicates < 2:
        ap.error("--replicates must be >= 2 (the ceiling is their agreement)")
    if args.out is None:
        args.out = str(REPO_ROOT / "results" / (
            f"bench_estimation_{args.workload}_{args.preset}"
            f"{'_quick' if args.quick else ''}.json"))
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    factory, drop = WORKLOADS[args.workload]
    workload = factory(args.preset, **parse_overrides(args.overrides))
    num_tasks = workload.num_tasks
    key = jax.random.key(args.seed)
    estimation_key = jax.random.fold_in(key, 11)  # other batch orders
    size = num_tasks - drop
    fit, held = args.fit_subsets, args.heldout_subsets
    distinct = math.comb(num_tasks, size)
    if fit + held > distinct:
        fit, held = distinct * 3 // 4, distinct - distinct * 3 // 4
        print(f"only {distinct} distinct subsets drop {drop} of {num_tasks} "
              f"tasks: {fit} to fit, {held} held out.")
    subsets = np.asarray(fixed_size_masks(jax.random.fold_in(key, 7), fit + held,
                                          num_tasks, subset_size=size, unique=True))
    loo = np.asarray(leave_one_out_masks(num_tasks))  # all tasks, then each dropped
    theta = workload.base_params(key=key)
    p = num_parameters(theta)
    spec = workload.finetune_spec
    print(f"{args.workload} {args.preset}: {num_tasks} tasks, p = {p:,}; fine-tuning "
          f"{spec.num_steps} steps (batch {spec.batch_size}).", flush=True)

    def finetune(masks, replicates, store_dir=None):
        return np.asarray(workload.replicate_scores(
            masks, key=key, regime="finetune", replicates=replicates,
            base_params=theta, chunk_size=args.chunk_size, progress=False,
            store_dir=store_dir))

    # 1. Ground truth and its ceiling.
    t0 = time.perf_counter()
    truth_reps = finetune(np.concatenate([loo, subsets]), args.replicates,
                          None if args.store_dir is None else os.path.join(
                              args.store_dir, f"truth_{args.workload}_{args.preset}"
                              f"_{fit}_{held}_{args.replicates}_{args.seed}"))
    truth_s = time.perf_counter() - t0
    loo_reps, subset_reps = truth_reps[:, :1 + num_tasks], truth_reps[:, 1 + num_tasks:]
    truth = subset_reps.mean(0)
    true_effects = loo_reps.mean(0)[1:] - loo_reps.mean(0)[:1]  # [K, T]
    reliable = ceiling(loo_reps, subset_reps[:, fit:], seed=args.seed)
    print(f"ground truth: {1 + num_tasks + fit + held} sets x {args.replicates} "
          f"replicates in {truth_s:.0f} s; ceiling LOO per target "
          f"{reliable['loo_spearman_per_target']:.3f}, mean target "
          f"{reliable['loo_spearman_mean_target']:.3f}", flush=True)
    fit_masks = subsets[:fit]

    # 2. Estimators.
    adam = isinstance(spec.optimizer, Adam)
    rows, agreements = [], {}
    for name in args.estimators:
        settings = ESTIMATORS[name] or workload.estimation
        if settings.preconditioner == "adam" and not adam:
            print(f"  {name}: skipped (not an finetune.Adam fine-tuning)")
            continue
        projection, output_mode, proj_dim = resolved(settings, workload, theta)
        t0 = time.perf_counter()
        scores, seconds = estimate(workload, np.concatenate([loo, fit_masks]),
                                   settings, key=estimation_key, theta=theta,
                                   chunk_size=args.estimation_chunk_size)
        total_s = time.perf_counter() - t0
        direct = loo_agreement(scores[1:1 + num_tasks] - scores[:1], true_effects)
        surr = surrogate_agreement(fit_masks, scores[1 + num_tasks:], true_effects,
                                   args.seed)
        agreements[name] = {"direct": direct, **surr}
        rows.append({
            "estimator": name, "projection": projection, "output_mode": output_mode,
            "proj_dim": "full" if proj_dim is None else proj_dim,
            "batch_orders": settings.batch_orders, "seconds": total_s,
            "feature_s": None if seconds is None else seconds["features"],
            "direct_loo": direct["per_target"],
            "direct_loo_mean_target": direct["mean_target"],
            "kernel_loo": surr["kernel"]["per_target"],
            "kernel_loo_mean_target": surr["kernel"]["mean_target"],
            "linear_loo": surr["linear"]["per_target"]})
        print(f"  {name} ({projection}, d={rows[-1]['proj_dim']}): {total_s:.1f} s; "
              f"LOO per target direct {direct['per_target']:.3f}, kernel "
              f"{surr['kernel']['per_target']:.3f}", flush=True)

    peak_gb = {"ground truth and estimators": rss_gb()}

    # 3. Surrogates on the exact scores, influence.
    exact = surrogate_agreement(fit_masks, truth[:fit], true_effects, args.seed)
    headline = agreements[args.headline]
    methods = {KERNEL_ESTIMATED: headline["kernel"],
               "kernel surrogate (exact)": exact["kernel"],
               "linear surrogate (estimated)": headline["linear"],
               "linear surrogate (exact)": exact["linear"],
               "LOO estimates (direct)": headline["direct"]}
    influence_s = None
    if not args.no_influence:
        t0 = time.perf_counter()
        effects = np.asarray(baselines.influence_scores(
            workload.apply_fn, theta, workload.data, workload.target,
            loss_fn=workload.loss_fn))
        influence_s = time.perf_counter() - t0
        methods["influence"] = loo_agreement(effects, true_effects)
        peak_gb["influence"] = rss_gb()
    interval = None
    if "influence" in methods:
        diff = (methods[KERNEL_ESTIMATED]["_per_target_values"]
                - methods["influence"]["_per_target_values"])
        interval = list(reliability.interval_over_targets(diff, seed=args.seed))

    # 4. Speed: one replicate each, per subset.
    speed_masks = np.asarray(fixed_size_masks(
        jax.random.fold_in(key, 8), max(args.speed_subsets, args.speed_finetune),
        num_tasks, subset_size=size))
    finetune(speed_masks[:args.chunk_size], 1)  # compiles
    t0 = time.perf_counter()
    finetune(speed_masks[:args.speed_finetune], 1)
    finetune_per_subset = (time.perf_counter() - t0) / args.speed_finetune
    one_order = dataclasses.replace(ESTIMATORS[args.headline] or workload.estimation,
                                    batch_orders=1)
    projection, output_mode, proj_dim = resolved(one_order, workload, theta)
    estimation_chunk = args.estimation_chunk_size or default_chunk_size(projection)
    estimate(workload, speed_masks[:min(estimation_chunk, args.speed_subsets)],
             one_order, key=estimation_key, theta=theta,
             chunk_size=estimation_chunk)  # compiles
    t0 = time.perf_counter()
    _, seconds = estimate(workload, speed_masks[:args.speed_subsets], one_order,
                          key=estimation_key, theta=theta,
                          chunk_size=estimation_chunk)
    estimate_s = time.perf_counter() - t0
    per_subset = estimate_s / args.speed_subsets
    feature_s = None if seconds is None else seconds["features"]
    num_outputs = 1 if output_mode == "margin" else int(
        np.asarray(workload.apply_fn(theta, workload.data.inputs[:1])).shape[-1])
    bound = None if proj_dim is None else p / (num_outputs * proj_dim)
    speed = {"num_subsets": args.speed_subsets, "finetune_subsets": args.speed_finetune,
             "finetune_chunk_size": args.chunk_size,
             "estimation_chunk_size": estimation_chunk,
             "finetune_per_subset_s": finetune_per_subset,
             "estimate_s": estimate_s, "feature_s": feature_s,
             "per_subset_s": per_subset,
             "per_subset_s_without_features": None if seconds is None
             else seconds["subsets"] / args.speed_subsets,
             "speedup": finetune_per_subset / per_subset,
             "projection": projection, "output_mode": output_mode,
             "proj_dim": "full" if proj_dim is None
             else proj_dim, "p_over_Cd": bound}
    print(f"speed: fine-tuning {finetune_per_subset:.3f} s per subset, estimation "
          f"{per_subset:.4f} s per subset at m={args.speed_subsets} (features "
          f"{feature_s if feature_s is None else round(feature_s, 1)} s included): "
          f"{speed['speedup']:.1f}x; p/(C d) = {bound}", flush=True)

    peak_gb["speed"] = rss_gb()
    wall_s = time.perf_counter() - start
    public = {name: {k: v for k, v in m.items() if not k.startswith("_")}
              for name, m in methods.items()}
    path = write_json(args.out, {
        "benchmark": "bench_estimation", "environment": environment(),
        "workload": args.workload, "preset": args.preset, "config": vars(args),
        "num_params": p, "finetune_steps": spec.num_steps,
        "finetune_batch_size": spec.batch_size, "ground_truth_s": truth_s,
        "ceiling": reliable,
        "loo_spearman_per_target": {k: v["per_target"] for k, v in public.items()},
        "loo_spearman_mean_target": {k: v["mean_target"] for k, v in public.items()},
        "paired_interval_estimated_kernel_minus_influence": interval,
        "influence_s": influence_s,
        "estimators": rows, "headline": args.headline, "speed": speed,
        "speedup_m1024": speed["speedup"], "p_over_Cd": bound,
        "feature_s": feature_s, "per_subset_s": per_subset,
        "finetune_per_subset_s": finetune_per_subset,
        "peak_rss_gb": peak_gb["speed"], "peak_rss_gb_after": peak_gb,
        "wall_s": wall_s,
    })
    print("\nEstimators (LOO Spearman against the truth; per target unless "
          "said):\n")
    print(format_table(rows, ["estimator", "projection", "proj_dim", "replicates",
                              "seconds", "feature_s", "direct_loo",
                              "direct_loo_mean_target", "kernel_loo",
                              "kernel_loo_mean_target", "linear_loo"]))
    print(f"\nMethods (headline estimator: {args.headline}):\n")
    print(format_table([{"method": k, **v} for k, v in public.items()],
                       ["method", "per_target", "mean_target"]))
    print(f"\nceiling: per target {reliable['loo_spearman_per_target']:.3f}, mean "
          f"target {reliable['loo_spearman_mean_target']:.3f} "
          f"({args.replicates} replicates)")
    print(f"paired interval, kernel (estimated) minus influence: {interval}")
    print(f"speedup_m1024 {speed['speedup']:.2f} (p/(C d) = {bound})")
    print(f"wall time {wall_s:.0f} s, peak memory after each phase {peak_gb} GB "
          f"(load average {os.getloadavg()[0]:.1f}); wrote {path}")


if __name__ == "__main__":
    main()
