"""Multi-objective RL: task attribution and task selection with surrogates.

On the RL workload (``tasksurrogate_jax.workloads.rl``: CartPole variants with
different physics and target cart positions, one policy for all), evaluated
by the pipeline's ``"loo"`` protocol (``tasksurrogate_jax.pipeline``; the same
evaluation as ``tasksurrogate run rl``):

1. Train ``θ*`` on all variants; its returns against an untrained policy.
2. Ground truth: fine-tune ``θ*`` on the full set and on each leave-one-out
   set, in ``--replicates`` paired replicates (other training keys): their
   split-half agreement is the ground truth's ceiling.
3. Random subsets (uniform over those neither empty, full nor leave-one-out,
   or each dropping ``--drop`` variants): exact scores (fine-tuning, the same
   replicates) and first-order estimates (projected policy gradient); the
   estimate's error.
4. LOO correlation of the surrogates (linear and kernel, on exact and on
   estimated scores, and the kernel surrogate's Banzhaf values), of the
   first-order estimate of the LOO sets themselves and of gradient alignment
   at ``θ*`` (TracIn-style), each with a bootstrap interval beside the
   ceiling; held-out Spearman.
5. Selection, for each target variant: the subset with the best predicted
   target score under each surrogate (exhaustive over all non-empty subsets),
   fine-tuned on for real (the replicates of the ground truth); its target
   return beside training on all variants, on random subsets, and on the best
   sampled subset. Improvement of kernel over linear selection.

    python benchmarks/bench_rl_selection.py            # cpu preset, ~15 min
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from _common import REPO_ROOT, environment, format_table, parse_overrides, write_json

from tasksurrogate_jax import pipeline, report, selection
from tasksurrogate_jax.subsets import leave_one_out_masks
from tasksurrogate_jax.workloads.rl import policy_gradients, rl_workload


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def extra_methods(workload, run, config) -> dict:
    """LOO-effect predictions ``{name: [K, T]}`` beyond the pipeline's: the
    first-order estimate of the LOO sets, and gradient alignment at ``θ*``."""
    key = pipeline.stage_keys(config.seed)["estimated"]  # the estimate's key
    loo = np.asarray(leave_one_out_masks(workload.num_tasks))
    estimate = np.asarray(pipeline.WORKLOADS["rl"].estimate(
        workload, loo, key=key, base_params=run.theta, config=config))
    examples, task, adv, _ = workload.linearized_rollouts(
        key=key, base_params=run.theta, proj_dim=config.proj_dim)
    grads = np.asarray(policy_gradients(examples, adv))
    per_variant = np.stack([grads[task == i].mean(0)
                            for i in range(workload.num_tasks)])  # [K, d]
    # Removing variant i removes its share of the update; for target t the
    # first-order change of minus the return is <g_t, g_i> (TracIn at θ*).
    return {"first-order estimate of the LOO sets": estimate[1:] - estimate[0],
            "gradient alignment (TracIn at θ*)":
                per_variant @ per_variant[list(workload.targets)].T}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="FIELD=VALUE", help="RLConfig field to override")
    ap.add_argument("--num-fit", type=int, default=None,
                    help="subsets to fit on (default: the pipeline's)")
    ap.add_argument("--num-heldout", type=int, default=None)
    ap.add_argument("--drop", type=int, default=None,
                    help="variants each random subset drops (default: subsets of "
                         "any size but empty, full and leave-one-out)")
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--proj-dim", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None,
                    help="store the pipeline's stages here (a rerun resumes)")
    ap.add_argument("--out", default=str(REPO_ROOT / "results/bench_rl_selection.json"))
    args = ap.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"preset {args.preset}")
    overrides = parse_overrides(args.overrides)
    config = pipeline.check_config(pipeline.PipelineConfig(
        workload="rl", preset=args.preset, seed=args.seed, replicates=args.replicates,
        num_subsets=args.num_fit, num_heldout=args.num_heldout, drop=args.drop,
        proj_dim=args.proj_dim, overrides=tuple(overrides.items())))
    w = rl_workload(args.preset, **overrides)
    k, m, replicates = w.num_tasks, config.num_subsets, config.replicates
    run = pipeline.collect(config, workload=w, out_dir=args.out_dir)
    trained = -np.asarray(w.evaluate(run.theta))
    untrained = -np.asarray(w.evaluate(w.init_fn(jax.random.key(args.seed + 100))))
    print(f"\nθ* trained in {run.seconds['base']:.1f} s "
          f"({w.config.iterations} iterations)\n")
    print(format_table(
        [{"variant": n, "θ* return": float(a), "untrained return": float(b)}
         for n, a, b in zip(w.task_names, trained, untrained, strict=True)],
        ["variant", "θ* return", "untrained return"]))

    results = pipeline.evaluate(config, run._replace(
        baselines={**run.baselines, **extra_methods(w, run, config)}))
    est = results["estimation"]
    masks = run.masks
    exact_s, estimate_s = run.seconds["subsets"], run.seconds["estimated"]
    print(f"\n{masks.shape[0]} random subsets: fine-tuning {exact_s:.1f} s "
          f"({replicates} replicates), first-order estimate {estimate_s:.1f} s; "
          f"estimate median relative error {est['median_relative_error']:.2%}, "
          f"Spearman across subsets {est['spearman_across_subsets']:.3f}")
    print("\nAttribution: agreement with leave-one-out fine-tuning")
    print(report.format_table(results))

    # Selection per target: exhaustive over the 2^K - 1 subsets, under the
    # surrogates the evaluation fit (same scores, settings and seed).
    exact = np.asarray(run.exact).mean(0)
    fits = pipeline.fit_surrogates(masks[:m], exact[:m], seed=config.seed)
    chosen = {}
    for kind in ("linear", "kernel"):
        for t in range(w.num_targets):
            weights = np.eye(w.num_targets)[t]
            objective = selection.surrogate_objective(fits[kind],
                                                      target_weights=weights)
            chosen[(kind, t)] = selection.select_subset(objective, k).mask
    picks = np.stack([chosen[(kind, t)] for kind in ("linear", "kernel")
                      for t in range(w.num_targets)])
    # Fine-tuned as the ground truth is: the mean of the same replicates.
    picked_scores, select_s = _timed(lambda: np.asarray(w.replicate_scores(
        picks, key=pipeline.stage_keys(config.seed)["base"], regime=config.regime,
        replicates=replicates, base_params=run.theta,
        chunk_size=config.chunk_size)).mean(0))
    sel_rows, returns = [], {}
    for i, kind in enumerate(("linear", "kernel")):
        per_target = picked_scores[i * w.num_targets:(i + 1) * w.num_targets]
        returns[kind] = -np.diagonal(per_target)
    returns["all variants"] = -np.asarray(run.loo_scores)[:, 0].mean(0)
    returns["random subsets (mean)"] = -exact.mean(0)
    returns[f"best of the {m} fitting subsets"] = -exact[:m].min(0)
    for t, target in enumerate(w.targets):
        row = {"target": w.task_names[target]}
        row.update({name: float(r[t]) for name, r in returns.items()})
        row["linear pick"] = "".join(str(int(b)) for b in chosen[("linear", t)])
        row["kernel pick"] = "".join(str(int(b)) for b in chosen[("kernel", t)])
        sel_rows.append(row)
    mean_row = {"target": "mean"}
    mean_row.update({name: float(np.mean(r)) for name, r in returns.items()})
    sel_rows.append(mean_row)
    print(f"\nSelection: target return after fine-tuning on the chosen subset "
          f"({select_s:.1f} s)")
    print(format_table(sel_rows, ["target", *returns, "linear pick", "kernel pick"]))
    gain = {kind: returns[kind] - returns["all variants"] for kind in ("linear",
                                                                      "kernel")}
    linear_gain, kernel_gain = float(np.mean(gain["linear"])), float(
        np.mean(gain["kernel"]))
    improvement = (kernel_gain - linear_gain) / abs(linear_gain) if linear_gain else (
        np.nan)
    print(f"\nmean gain over training on all variants: linear {linear_gain:+.2f}, "
          f"kernel {kernel_gain:+.2f} return; kernel over linear {improvement:+.0%}; "
          f"kernel better on {int(np.sum(gain['kernel'] > gain['linear']))} of "
          f"{w.num_targets} targets, worse on "
          f"{int(np.sum(gain['kernel'] < gain['linear']))}")

    path = write_json(args.out, {
        "args": vars(args), "environment": environment(),
        "config": w.store_config(), "pipeline_config": config.to_json(),
        "seconds": run.seconds, "theta_star_returns": trained,
        "untrained_returns": untrained, "estimation": est,
        "ceiling": results["ceiling"], "methods": results["methods"],
        "selection": sel_rows, "improvement_kernel_over_linear": improvement,
        "true_effects": pipeline.loo_effects(run.loo_scores), "masks": masks,
        "exact": np.asarray(run.exact), "estimated": run.estimated,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
