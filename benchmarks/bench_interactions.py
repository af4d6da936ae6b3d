"""Pairwise interactions of kernel surrogates against a pair-removal truth.

On the digits workload (``--preset interactions``: sources with planted
interactions of known sign; ``--preset cpu``: the main job's sources):

1. **Ground truth.** Real fine-tuning from ``θ*`` of the full set, the K
   leave-one-out sets and every pair-removed set
   (:func:`tasksurrogate_jax.downstream.interactions.pair_removal_masks`),
   ``--replicates`` (8) paired replicates; per replicate
   ``I_ij = F(−i−j) − F(−i) − F(−j) + F(full)``
   (:func:`~tasksurrogate_jax.downstream.interactions.pair_interactions`, positive =
   substitutes), averaged. Its *ceiling* is the split-half reliability of the
   interactions over the pairs (Spearman-Brown-corrected; per target and on
   the target-mean interactions), and the planted signs it recovers.
2. **Designs.** For each fitting design, ``--design-seeds`` (3) draws of
   ``--num-subsets`` (96) distinct subsets, each scored by real fine-tuning
   from the same ``θ*`` with ``--fit-replicates`` (4) replicates whose batch
   orders are independent of the truth's (another key), and optionally
   estimated by linearized fine-tuning (``--estimated``):

   - ``fixed (drop 4)``: every subset drops 4 tasks (the main job's design);
   - ``size range 1..K-2``: uniform over the subsets of 1 to K−2 tasks (the
     pipeline's ``drop=None``), sizes concentrated around K/2;
   - ``uniform size 1..K-1``: the size uniform over 1..K−1 (equal counts,
     cycled), then a uniform subset of that size;
   - ``bernoulli(0.7)``: each task kept with probability 0.7 (a quarter to a
     third of the 96 are then among the truth's full, leave-one-out and
     pair-removed subsets, scored by the fitting replicates);
   - ``bernoulli(0.7), sizes <= K-3``: the same conditioned on dropping at
     least 3 tasks, so none of the truth's subsets is fitted on (a control:
     how much of its agreement comes from scoring those subsets directly).

3. **Surrogates.** The pipeline's linear and kernel surrogates
   (:func:`tasksurrogate_jax.pipeline.fit_surrogates`: RBF, ``(γ, λ)`` by
   LOO-CV on Spearman). Reported per design (mean, min and max over draws):
   Spearman and Pearson of the kernel's pair interactions with the truth's over
   all pairs (per target averaged, and on the target mean, with the first
   draw's bootstrap intervals), the planted signs it gets right, the Banzhaf
   interaction indices' Spearman, and the pooled normalized error of the
   predicted losses of the pair-removal subsets (kernel and linear, and their
   difference with a paired bootstrap interval over the subsets; the fitting
   subsets may include some of them, whose scores then come from the fitting
   replicates, not the truth's).

Writes ``results/bench_interactions_<preset>.json`` (``_quick`` for
``--quick``, which runs tiny sizes in under a minute for CI: a small
model, 64 targets, 4 truth replicates, one draw of 32 subsets per design,
estimates for the first design only).

    python benchmarks/bench_interactions.py --preset interactions
    python benchmarks/bench_interactions.py --preset cpu
    python benchmarks/bench_interactions.py --preset interactions --quick
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np
from _common import REPO_ROOT, environment, format_table, parse_overrides, write_json

from tasksurrogate_jax.core.subsets import (
    bernoulli_masks,
    fixed_size_masks,
    size_range_masks,
    unique_masks,
)
from tasksurrogate_jax.downstream import interactions as ix
from tasksurrogate_jax.pipeline import fit_surrogates
from tasksurrogate_jax.workloads.digits import digits_workload

# Tiny sizes of --quick: a small model and 64 targets.
QUICK_OVERRIDES = {"hidden": 16, "num_targets": 64, "num_steps": 60,
                   "finetune_steps": 20}


def uniform_size_masks(key, num_subsets, num_tasks, *, min_size, max_size):
    """``num_subsets`` distinct subsets whose sizes cycle through
    ``min_size..max_size`` (equal counts, in draw order), each a uniform subset
    of its size."""
    sizes = np.arange(min_size, max_size + 1)
    rows = np.zeros((0, num_tasks), np.float32)
    for attempt in range(1000):
        uniforms = np.asarray(jax.random.uniform(jax.random.fold_in(key, attempt),
                                                 (4 * num_subsets, num_tasks)))
        ranks = uniforms.argsort(1).argsort(1)
        wanted = sizes[(rows.shape[0] + np.arange(4 * num_subsets)) % sizes.size]
        rows = np.asarray(unique_masks(np.concatenate(
            [rows, (ranks < wanted[:, None]).astype(np.float32)])))
        if rows.shape[0] >= num_subsets:
            return rows[:num_subsets]
    raise RuntimeError("could not draw enough distinct subsets.")


def design_masks(name, key, num_subsets, num_tasks):
    if name == "fixed (drop 4)":
        return fixed_size_masks(key, num_subsets, num_tasks,
                                subset_size=num_tasks - 4, unique=True)
    if name == "size range 1..K-2":
        return size_range_masks(key, num_subsets, num_tasks, min_size=1,
                                max_size=num_tasks - 2, unique=True)
    if name == "uniform size 1..K-1":
        return uniform_size_masks(key, num_subsets, num_tasks, min_size=1,
                                  max_size=num_tasks - 1)
    if name == "bernoulli(0.7)":
        masks = np.asarray(bernoulli_masks(key, num_subsets + 8, num_tasks, p=0.7,
                                           unique=True))
        return masks[masks.sum(1) > 0][:num_subsets]  # never the empty set
    if name == "bernoulli(0.7), sizes <= K-3":
        masks = np.asarray(bernoulli_masks(key, 3 * num_subsets, num_tasks, p=0.7,
                                           unique=True))
        sizes = masks.sum(1)
        masks = masks[(sizes > 0) & (sizes <= num_tasks - 3)]
        if masks.shape[0] < num_subsets:
            raise ValueError(f"too few subsets of <= K-3 tasks in {3 * num_subsets} "
                             "draws.")
        return masks[:num_subsets]
    raise ValueError(name)


DESIGNS = ("fixed (drop 4)", "size range 1..K-2", "uniform size 1..K-1",
           "bernoulli(0.7)", "bernoulli(0.7), sizes <= K-3")


def _summary(values):
    values = np.asarray(values, float)
    return {"mean": float(np.nanmean(values)), "min": float(np.nanmin(values)),
            "max": float(np.nanmax(values)), "values": values.tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="interactions", choices=("interactions", "cpu"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    ap.add_argument("--replicates", type=int, default=None,
                    help="replicates of the pair-removal truth (8; quick 4)")
    ap.add_argument("--fit-replicates", type=int, default=None,
                    help="replicates of the fitting subsets' scores (4; quick 2)")
    ap.add_argument("--num-subsets", type=int, default=None,
                    help="fitting subsets per design (96; quick 32)")
    ap.add_argument("--design-seeds", type=int, default=None,
                    help="draws of each design (3; quick 1)")
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    ap.add_argument("--estimated", action=argparse.BooleanOptionalAction,
                    default=True, help="also fit on linearized fine-tuning "
                    "estimates of the same subsets (quick: of the first design "
                    "only)")
    ap.add_argument("--value-samples", type=int, default=None,
                    help="contexts of the Banzhaf interaction indices (1000)")
    ap.add_argument("--bootstrap-resamples", type=int, default=None,
                    help="resamples per bootstrap interval (1000; quick 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="FIELD=VALUE", help="workload configuration field")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    quick = args.quick
    replicates = args.replicates or (4 if quick else 8)
    fit_replicates = args.fit_replicates or (2 if quick else 4)
    num_subsets = args.num_subsets or (32 if quick else 96)
    design_seeds = args.design_seeds or (1 if quick else 3)
    value_samples = args.value_samples or (100 if quick else 1000)
    overrides = {**(QUICK_OVERRIDES if quick else {}),
                 **parse_overrides(args.overrides)}
    resamples = args.bootstrap_resamples or (200 if quick else 1000)
    boot = {"num_resamples": resamples, "seed": args.seed}
    seconds = {}
    start = time.perf_counter()

    workload = digits_workload(args.preset, **overrides)
    num_tasks = workload.num_tasks
    planted = workload.planted_interactions
    key = jax.random.key(args.seed)
    key_truth, key_designs, key_fit, key_values = jax.random.split(key, 4)
    theta = workload.base_params(key=key_truth)
    seconds["base"] = time.perf_counter() - start

    # 1. The pair-removal ground truth.
    t = time.perf_counter()
    pairs = ix.all_pairs(num_tasks)
    truth_masks = ix.pair_removal_masks(num_tasks, pairs)
    truth_scores = np.asarray(workload.replicate_scores(
        truth_masks, key=key_truth, regime="finetune", replicates=replicates,
        base_params=theta, progress=False))
    seconds["truth"] = time.perf_counter() - t
    truth = ix.pair_interactions(truth_scores, pairs=pairs)
    ceiling = ix.interaction_ceiling(truth, seed=args.seed)
    truth_mean_scores = truth_scores.mean(0)
    truth_signs = (ix.planted_signs_correct(truth.mean, planted, pairs=pairs)
                   if planted else None)
    replicate_signs = ([ix.planted_signs_correct(r, planted, pairs=pairs)[0]
                        for r in truth.replicates] if planted else None)
    planted_values = {f"{i},{j}": float(truth.mean[pairs.tolist().index([i, j])]
                                        .mean()) for (i, j) in planted}

    # 2-3. Designs and surrogates.
    rows, records = [], {}
    truth_pair_set = {tuple(r) for r in np.asarray(truth_masks).astype(int).tolist()}
    for d, design in enumerate(args.designs):
        per_source = {"exact": [], "estimated": []}
        for draw in range(design_seeds):
            k_masks = jax.random.fold_in(jax.random.fold_in(key_designs, d), draw)
            masks = np.asarray(design_masks(design, k_masks, num_subsets, num_tasks),
                               np.float32)
            overlap = sum(tuple(r) in truth_pair_set
                          for r in masks.astype(int).tolist())
            k_fit = jax.random.fold_in(jax.random.fold_in(key_fit, d), draw)
            t = time.perf_counter()
            scored = {"exact": np.asarray(workload.exact_scores(
                masks, key=k_fit, regime="finetune", replicates=fit_replicates,
                base_params=theta, progress=False))}
            seconds[f"fit_scores {design} {draw}"] = time.perf_counter() - t
            if args.estimated and (not quick or d == 0):
                t = time.perf_counter()
                scored["estimated"] = np.asarray(workload.estimated_scores(
                    masks, key=key_truth, base_params=theta))
                seconds[f"estimated {design} {draw}"] = time.perf_counter() - t
            for source, scores in scored.items():
                fits = fit_surrogates(masks, scores, seed=args.seed)
                kernel, linear = fits["kernel"], fits["linear"]
                predicted = {
                    "kernel": np.asarray(ix.surrogate_pair_interactions(kernel,
                                                                        pairs)),
                    "kernel, Banzhaf": np.asarray(ix.banzhaf_interactions(
                        kernel, key=key_values, pairs=pairs,
                        num_samples=value_samples)),
                }
                compared = ix.compare_interactions(truth.mean, predicted, **boot)
                error = ix.normalized_error_difference(
                    truth_mean_scores, np.asarray(kernel.predict(truth_masks)),
                    np.asarray(linear.predict(truth_masks)), **boot)
                per_source[source].append({
                    "overlap_with_truth_subsets": int(overlap),
                    "mean_size": float(masks.sum(1).mean()),
                    "gamma": float(np.mean(np.asarray(fits["search"].gamma))),
                    "ridge": float(np.mean(np.asarray(fits["search"].ridge))),
                    "kernel": compared["kernel"],
                    "banzhaf": compared["kernel, Banzhaf"],
                    "planted_signs_correct": (ix.planted_signs_correct(
                        predicted["kernel"], planted, pairs=pairs)
                        if planted else None),
                    "planted_values": {f"{i},{j}": float(predicted["kernel"][
                        pairs.tolist().index([i, j])].mean()) for (i, j) in planted},
                    "normalized_error": error,
                })
        records[design] = {}
        for source, draws in per_source.items():
            if not draws:
                continue
            summary = {
                "spearman": _summary([r["kernel"]["spearman"] for r in draws]),
                "spearman_mean_target": _summary(
                    [r["kernel"]["spearman_mean_target"] for r in draws]),
                "pearson_mean_target": _summary(
                    [r["kernel"]["pearson_mean_target"] for r in draws]),
                "banzhaf_spearman_mean_target": _summary(
                    [r["banzhaf"]["spearman_mean_target"] for r in draws]),
                "normalized_error_kernel": _summary(
                    [r["normalized_error"]["a"] for r in draws]),
                "normalized_error_linear": _summary(
                    [r["normalized_error"]["b"] for r in draws]),
                "normalized_error_difference": _summary(
                    [r["normalized_error"]["difference"] for r in draws]),
            }
            if planted:
                summary["planted_signs_correct"] = [
                    int(sum(r["planted_signs_correct"][0] for r in draws)),
                    int(sum(r["planted_signs_correct"][1] for r in draws))]
            records[design][source] = {"summary": summary, "draws": draws}
            first = draws[0]
            rows.append({
                "design": design, "scores": source,
                "Spearman (per target)": summary["spearman"]["mean"],
                "range": "{:.2f}..{:.2f}".format(summary["spearman"]["min"],
                                                 summary["spearman"]["max"]),
                "Spearman (mean target)": summary["spearman_mean_target"]["mean"],
                "range ": "{:.2f}..{:.2f}".format(
                    summary["spearman_mean_target"]["min"],
                    summary["spearman_mean_target"]["max"]),
                "95% CI (draw 0)": "[{:.2f}, {:.2f}]".format(
                    *first["kernel"]["spearman_mean_target_interval"]),
                "Pearson (mean target)": summary["pearson_mean_target"]["mean"],
                "Banzhaf Spearman (mt)":
                    summary["banzhaf_spearman_mean_target"]["mean"],
                "planted signs": ("{}/{}".format(*summary["planted_signs_correct"])
                                  if planted else ""),
                "NE kernel": summary["normalized_error_kernel"]["mean"],
                "NE linear": summary["normalized_error_linear"]["mean"],
                "NE diff (draw 0) [95% CI]": "{:.3f} [{:.3f}, {:.3f}]".format(
                    first["normalized_error"]["difference"],
                    *first["normalized_error"]["difference_interval"]),
            })

    def best_design(source):
        scored = [(records[d][source]["summary"]["spearman_mean_target"]["mean"], d)
                  for d in records if source in records[d]]
        return max(scored)[1] if scored else None

    seconds["total"] = time.perf_counter() - start
    print(f"digits --preset {args.preset}{' --quick' if quick else ''}: K = "
          f"{num_tasks}, {pairs.shape[0]} pairs, {workload.num_targets} targets; "
          f"truth of {replicates} replicates ({truth_masks.shape[0]} subsets) in "
          f"{seconds['truth']:.0f} s")
    print(f"ceiling of the interactions over pairs: per target {ceiling.mean:.3f}, "
          f"mean target {ceiling.mean_target:.3f} (attainable "
          f"{math.sqrt(max(ceiling.mean, 0)):.3f} / "
          f"{math.sqrt(max(ceiling.mean_target, 0)):.3f})")
    if planted:
        print(f"planted signs recovered by the truth: {truth_signs[0]}/"
              f"{truth_signs[1]} (per replicate: {replicate_signs}); planted "
              f"values (mean target): {planted_values}")
    print(f"\nkernel surrogate interactions against the truth ({num_subsets} "
          f"subsets, {fit_replicates} replicates, {design_seeds} draws per design):")
    columns = ["design", "scores", "Spearman (per target)", "range",
               "Spearman (mean target)", "range ", "95% CI (draw 0)",
               "Pearson (mean target)", "Banzhaf Spearman (mt)", "planted signs",
               "NE kernel", "NE linear", "NE diff (draw 0) [95% CI]"]
    print(format_table(rows, columns))
    best = {source: best_design(source) for source in ("exact", "estimated")}
    print(f"\nbest design (mean-target Spearman): exact scores {best['exact']!r}"
          + (f", estimated {best['estimated']!r}" if best["estimated"] else ""))
    print(f"total {seconds['total']:.0f} s")

    suffix = "_quick" if quick else ""
    path = write_json(args.out or REPO_ROOT / f"results/bench_interactions_"
                      f"{args.preset}{suffix}.json", {
        "benchmark": "bench_interactions", "environment": environment(),
        "preset": args.preset, "quick": quick, "overrides": overrides,
        "num_tasks": num_tasks, "num_pairs": int(pairs.shape[0]),
        "num_targets": int(workload.num_targets), "replicates": replicates,
        "fit_replicates": fit_replicates, "num_subsets": num_subsets,
        "design_seeds": design_seeds, "seed": args.seed,
        "task_names": list(workload.task_names),
        "planted": {f"{i},{j}": s for (i, j), s in planted.items()},
        "ceiling": {"per_target": ceiling.mean, "mean_target": ceiling.mean_target,
                    "split_half_per_target": ceiling.split_half_mean,
                    "split_half_mean_target": ceiling.split_half_mean_target},
        "truth_planted_signs_correct": truth_signs,
        "truth_planted_signs_correct_per_replicate": replicate_signs,
        "truth_planted_values": planted_values,
        "truth_interactions_mean_target": ix.interactions_to_matrix(
            truth.mean.mean(1), pairs, num_tasks),
        "designs": records, "best_design": best, "seconds": seconds,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
